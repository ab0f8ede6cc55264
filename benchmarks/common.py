"""What the benchmarks share: machine facts and load, the environment of an MPI run, a child run
with a timeout that ends its whole process group, median/min/max statistics and the Markdown
header every results file starts with. Only the standard library: the pure tests import it
without MPI."""
from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# --- machine and environment ----------------------------------------------------------------

# Open MPI as root and oversubscribed (see /work/shared/ANCHORS.md).
OPENMPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
}


def _load() -> str:
    """1/5/15-minute load averages: other work on the machine skews the timings."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_facts(venv: Path) -> dict:
    """Machine, MPI library and package versions (the latter asked of the venv's python)."""
    probe = r"""
import json, importlib.metadata as md
info = {}
try:
    from mpi4py import MPI
    lines = [l.strip() for l in MPI.Get_library_version().splitlines() if l.strip()]
    info["mpi_library"] = "; ".join(lines[:2])
except Exception as e:
    info["mpi_library"] = f"unavailable ({e.__class__.__name__}: {e})"
pk = {}
for name in ["dask-mpi-launch", "dask-mpi", "dask", "distributed", "mpi4py", "mpich",
             "openmpi", "tornado", "numpy"]:
    try:
        pk[name] = md.version(name)
    except md.PackageNotFoundError:
        pass
info["packages"] = pk
print(json.dumps(info))
"""
    try:
        res = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True,
                             text=True, timeout=60, cwd=tempfile.gettempdir())
        info = json.loads(res.stdout)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError) as e:
        info = {"mpi_library": f"unavailable ({e})", "packages": {}}
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(), "os": f"{platform.system()} {platform.release()}",
        "cores": os.cpu_count(), "memory": mem,
        "python": platform.python_version(), "load_start": _load(), **info,
    }


def make_env(venv: Path, mpi: str) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    if mpi == "openmpi":
        env.update(OPENMPI_ENV)
    return env


def load1() -> float:
    """The 1-minute load average, recorded with each run (other work skews its timings)."""
    return os.getloadavg()[0]


def mpi_of(meta: dict) -> str:
    """The MPI library the venv's mpi4py reports (machine_facts): openmpi or mpich."""
    return "openmpi" if "Open MPI" in meta.get("mpi_library", "") else "mpich"


def pick_mpi(meta: dict, mpi: str) -> str:
    """--mpi auto: the MPI library the venv's mpi4py reports; recorded in ``meta``.

    >>> meta = {"mpi_library": "Open MPI v5.0.3"}
    >>> pick_mpi(meta, "auto"), meta["mpi_kind"]
    ('openmpi', 'openmpi')
    >>> pick_mpi({"mpi_library": "MPICH Version: 4.2"}, "auto")
    'mpich'
    """
    if mpi == "auto":
        mpi = mpi_of(meta)
    meta["mpi_kind"] = mpi
    return mpi


def command_line(argv: list[str] | None) -> str:
    """The command as recorded in the results: the script's name and its arguments."""
    return " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])


def results_dir() -> Path:
    """The default --out: benchmarks/results."""
    return Path(__file__).resolve().parent / "results"


# --- running a child -----------------------------------------------------------------------

def run_once(argv: list[str], env: dict, cwd: str, timeout: float) -> dict:
    """Run one command in its own session; kill the whole group on timeout."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        timed_out = threading.Event()
        t0 = time.time()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=cwd,
                                stdin=subprocess.DEVNULL, start_new_session=True)

        def kill() -> None:
            timed_out.set()
            _killpg(proc.pid)

        timer = threading.Timer(timeout, kill)
        timer.start()
        rc = proc.wait()
        t1 = time.time()
        timer.cancel()
        _killpg(proc.pid)  # leftovers of a finished run must not slow the next one
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    return {"t0": t0, "t1": t1, "rc": rc, "timed_out": timed_out.is_set(),
            "stdout": stdout, "stderr": stderr}


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --- statistics and rendering (pure) ------------------------------------------------------

def _stats(values: list[float]) -> dict | None:
    """Median, min and max; None for no values.

    >>> _stats([3.0, 1.0, 2.0])
    {'median': 2.0, 'min': 1.0, 'max': 3.0}
    """
    if not values:
        return None
    return {"median": round(statistics.median(values), 4), "min": min(values), "max": max(values)}


def fmt_stat(s: dict | None, digits: int = 2) -> str:
    """Median (min–max) with fixed digits.

    >>> fmt_stat({"median": 1.234, "min": 1.1, "max": 1.5})
    '1.23 (1.10–1.50)'
    >>> fmt_stat(None)
    '–'
    """
    if not s:
        return "–"
    if s["min"] == s["max"]:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def machine_lines(meta: dict, command: str | None = None, load_note: str = "") -> list[str]:
    """The Markdown header lines every benchmark's results start with."""
    pk = ", ".join(f"{k} {v}" for k, v in meta.get("packages", {}).items())
    lines = [
        f"- date: {meta.get('date')}; host: {meta.get('host')} ({meta.get('os')})",
        f"- cores: {meta.get('cores')}; memory: {meta.get('memory')}; "
        f"Python {meta.get('python')}; load average at start {meta.get('load_start')}, "
        f"at end {meta.get('load_end')}{load_note}",
    ]
    if meta.get("mpi_library"):
        lines.append(f"- MPI: {meta.get('mpi_library')}")
    lines.append(f"- packages: {pk or '?'}")
    if command is not None:
        lines.append(f"- command: `{command}`")
    return lines


# --- results files ---------------------------------------------------------------------------

def args_record(args) -> dict:
    """The parsed options as recorded in a results JSON (paths as strings).

    >>> import argparse
    >>> args_record(argparse.Namespace(out=Path("/tmp/r"), repeat=3))
    {'out': '/tmp/r', 'repeat': 3}
    """
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def write_results(out: Path, name: str, md: str, record: dict) -> tuple[Path, Path]:
    """Write ``name``.md and ``name``.json (indent 1, one final newline) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out / f"{name}.md", out / f"{name}.json"
    md_path.write_text(md)
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    return md_path, json_path


def interleave(rounds: int, variants: list[str], run, label: str = "round") -> dict[str, list]:
    """Run every variant once per round, in turn, so that load drifts hit all alike.

    ``run(variant)`` returns a result dict; its 1-minute load is added. A variant whose last
    result says ``skip`` (it cannot work here) is not run again. Progress goes to stderr.
    """
    results: dict[str, list[dict]] = {}
    for rnd in range(rounds):
        for v in variants:
            if results.get(v) and results[v][-1].get("skip"):
                continue
            t = time.time()
            res = run(v)
            res["load1"] = load1()
            results.setdefault(v, []).append(res)
            print(f"[{label} {rnd + 1}/{rounds}] {v}: {time.time() - t:.1f} s "
                  f"{res.get('note') or 'ok'}; load {_load()}", file=sys.stderr)
    return results
