#!/usr/bin/env python3
"""Startup/teardown benchmark: dask-mpi-launch side by side with dask-mpi and the import floor.

Every variant is a command run as ``mpiexec -n N <command>``; variants are interleaved
(A B C A B C ...) for each rank count.  Per run we measure, with ``time.time()``:

* wall      launch -> launcher exit (the launch time is taken just before ``Popen``);
* first     launch -> the user script's first line (the script prints ``T_FIRST=<time>``;
            for ``initialize()`` scripts that is the line right after ``initialize()``);
* client    launch -> ``Client()`` returned (``T_CLIENT=``);
* teardown  script end (``T_END=``, printed just before the script ends or raises) -> exit;
* workers   workers the client saw at its first result (``WORKERS=``).

Standard library only; matplotlib is used for the plot when it imports.
Writes results/startup.{md,json,png}.  Usually run through ``bin/bench``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (_load, _stats, args_record, command_line, fmt_stat, load1,  # noqa: E402
                    machine_facts, machine_lines, make_env, pick_mpi, results_dir, run_once,
                    write_results)


# --- variants (adjust here) ------------------------------------------------------------
# argv after `mpiexec -n N`; {python}, {bin} (the venv's bin/) and {script} (a temp file
# holding `script`) are filled in.  fails=True: the script raises on purpose, so a
# non-zero exit is the expected outcome and a zero exit counts as an error.

class Variant(NamedTuple):
    argv: list[str]
    script: str | None = None
    fails: bool = False
    ranks: Callable[[int], int] | None = None  # ranks to start for the nominal n


FIRST = 'import time; print(f"T_FIRST={time.time()!r}", flush=True)\n'
CLIENT = """\
from distributed import Client
c = Client()
print(f"T_CLIENT={time.time()!r}", flush=True)
r = c.submit(lambda x: x + 1, 1).result()
print(f"WORKERS={len(c.scheduler_info()['workers'])}", flush=True)
print(f"RESULT={r}", flush=True)
print(f"T_END={time.time()!r}", flush=True)
"""
CLIENT_FAIL = """\
from distributed import Client
c = Client()
print(f"T_CLIENT={time.time()!r}", flush=True)
print(f"T_END={time.time()!r}", flush=True)
raise RuntimeError("benchmark: deliberate failure in the client script")
"""
DASK_MPI_INIT = """\
from dask_mpi import initialize
initialize(interface="lo", nthreads=1, dashboard=False)
"""
OURS_INIT = """\
from dask_mpi_launch import initialize
initialize(interface="lo", nthreads=1, dashboard=False)
"""
PY_SCRIPT = ["{python}", "{script}"]
OURS_CLI = ["{bin}/dask-mpi-launch", "--interface", "lo", "--nthreads", "1",
            "--no-dashboard", "{script}"]

VARIANTS: dict[str, Variant] = {
    "floor": Variant(["{python}", "-c", "import mpi4py.MPI, distributed"]),
    "dask-mpi": Variant(PY_SCRIPT, DASK_MPI_INIT + FIRST + CLIENT),
    "dask-mpi-fail": Variant(PY_SCRIPT, DASK_MPI_INIT + FIRST + CLIENT_FAIL, fails=True),
    "ours-script": Variant(OURS_CLI, FIRST + CLIENT),
    "ours-initialize": Variant(PY_SCRIPT, OURS_INIT + FIRST + CLIENT),
    "ours-fail": Variant(OURS_CLI, FIRST + CLIENT_FAIL, fails=True),
    "ours-notls": Variant(OURS_CLI[:1] + ["--no-tls"] + OURS_CLI[1:], FIRST + CLIENT),
    "ours-compact": Variant(OURS_CLI[:1] + ["--layout", "compact"] + OURS_CLI[1:], FIRST + CLIENT),
    "ours-full": Variant(OURS_CLI[:1] + ["--layout", "full"] + OURS_CLI[1:], FIRST + CLIENT),
    # one zygote (one import of distributed) per rank instead of one per node
    "ours-per-rank": Variant(OURS_CLI[:1] + ["--no-share-imports"] + OURS_CLI[1:],
                             FIRST + CLIENT),
    # the same n-2 workers as ours-script, as 4 worker processes per rank
    "ours-k4": Variant(OURS_CLI[:1] + ["--worker-processes", "4"] + OURS_CLI[1:], FIRST + CLIENT,
                       ranks=lambda n: 2 + max(1, (n - 2) // 4)),
}

# An earlier version of the package side by side (a checkout or worktree of it), e.g.
# DML_BENCH_BEFORE=/tmp/before bin/bench --variants floor before-script ours-script
if os.environ.get("DML_BENCH_BEFORE"):
    VARIANTS["before-script"] = Variant(
        ["env", f"PYTHONPATH={os.environ['DML_BENCH_BEFORE']}"] + OURS_CLI, FIRST + CLIENT)

MARKER = re.compile(r"\b(T_FIRST|T_CLIENT|T_END|WORKERS|RESULT)=(\S+)")


# --- running ------------------------------------------------------------------------------

def parse_markers(stdout: str) -> dict[str, str]:
    """First value of each ``NAME=value`` marker in the output.

    >>> parse_markers("noise\\nT_FIRST=1.5\\nRESULT=2\\nT_FIRST=9\\n")
    {'T_FIRST': '1.5', 'RESULT': '2'}
    """
    found: dict[str, str] = {}
    for m in MARKER.finditer(stdout):
        found.setdefault(m.group(1), m.group(2))
    return found


def measure(raw: dict, fails: bool, has_script: bool) -> dict:
    """Turn one raw run into the recorded numbers and a status: ok, error or timeout.

    >>> r = {"t0": 100.0, "t1": 103.0, "rc": 0, "timed_out": False, "stderr": "a\\nb\\n",
    ...      "stdout": "T_FIRST=101.0\\nT_CLIENT=101.5\\nWORKERS=2\\nRESULT=2\\nT_END=102.5\\n"}
    >>> m = measure(r, fails=False, has_script=True)
    >>> m["status"], m["wall"], m["first"], m["client"], m["teardown"], m["workers"]
    ('ok', 3.0, 1.0, 1.5, 0.5, 2)
    >>> measure(dict(r, rc=1), fails=False, has_script=True)["status"]
    'error'
    >>> measure(dict(r, rc=1), fails=True, has_script=True)["status"]
    'ok'
    """
    mk = parse_markers(raw["stdout"])
    t0, t1 = raw["t0"], raw["t1"]

    def since(name: str, origin: float, sign: int = 1) -> float | None:
        try:
            return round(sign * (float(mk[name]) - origin), 4)
        except (KeyError, ValueError):
            return None

    if raw["timed_out"]:
        status = "timeout"
    elif fails:
        status = "ok" if raw["rc"] != 0 and "T_END" in mk else "error"
    else:
        status = "ok" if raw["rc"] == 0 and (not has_script or mk.get("RESULT") == "2") else "error"
    stderr_lines = raw["stderr"].splitlines()
    result = {
        "status": status, "rc": raw["rc"], "wall": round(t1 - t0, 4),
        "first": since("T_FIRST", t0), "client": since("T_CLIENT", t0),
        "teardown": since("T_END", t1, -1),
        "workers": int(mk["WORKERS"]) if mk.get("WORKERS", "").isdigit() else None,
        "stderr_lines": len(stderr_lines),
    }
    if status != "ok":
        result["stderr_tail"] = stderr_lines[-8:]
        result["stdout_tail"] = raw["stdout"].splitlines()[-4:]
    return result


def write_script(tmp: str, name: str) -> str | None:
    """The variant's script as a file in ``tmp`` (named so that it shadows no module)."""
    if VARIANTS[name].script is None:
        return None
    path = str(Path(tmp) / f"bench_{name.replace('-', '_')}.py")
    Path(path).write_text(VARIANTS[name].script)
    return path


def build_argv(variant: Variant, n: int, venv: Path, script: str | None, mpi: str) -> list[str]:
    fill = {"python": str(venv / "bin" / "python"), "bin": str(venv / "bin"),
            "script": script or ""}
    extra = ["--bind-to", "none"] if mpi == "openmpi" and "SLURM_JOB_ID" in os.environ else []
    if variant.ranks is not None:
        n = variant.ranks(n)
    return [str(venv / "bin" / "mpiexec"), "-n", str(n), *extra,
            *(a.format(**fill) for a in variant.argv)]


# --- statistics and rendering (pure) ------------------------------------------------------

def summarize(runs: list[dict], timeout: float) -> list[dict]:
    """One row per (variant, n), in first-seen order, with ratios of medians."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["variant"], r["n"]), []).append(r)
    rows = []
    for (variant, n), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        row = {"variant": variant, "n": n, "runs": len(rs), "ok": len(ok),
               "errors": sum(r["status"] == "error" for r in rs),
               "timeouts": sum(r["status"] == "timeout" for r in rs), "timeout": timeout}
        for key in ("wall", "first", "client", "teardown"):
            row[key] = _stats([r[key] for r in ok if r[key] is not None])
        workers = [r["workers"] for r in ok if r["workers"] is not None]
        row["workers"] = [min(workers), max(workers)] if workers else None
        row["stderr_lines"] = _stats([r["stderr_lines"] for r in rs])
        rows.append(row)
    medians = {(r["variant"], r["n"]): r["wall"]["median"] for r in rows if r["wall"]}
    for row in rows:
        for ref in ("floor", "dask-mpi"):
            mine, theirs = medians.get((row["variant"], row["n"])), medians.get((ref, row["n"]))
            row[f"x_{ref}"] = round(mine / theirs, 3) if mine and theirs else None
    return rows


def fmt_wall(row: dict) -> str:
    """Wall-time cell: the statistic, or why there is none, plus failed-run counts.

    >>> fmt_wall({"wall": None, "errors": 0, "timeouts": 2, "timeout": 60})
    '> 60 s'
    >>> fmt_wall({"wall": None, "errors": 3, "timeouts": 0, "timeout": 60})
    'error'
    >>> fmt_wall({"wall": {"median": 1.0, "min": 1.0, "max": 1.0}, "errors": 1, "timeouts": 0,
    ...           "timeout": 60})
    '1.00 · 1 error'
    """
    if row["wall"] is None:
        return f"> {row['timeout']:g} s" if row["timeouts"] else "error"
    cell = fmt_stat(row["wall"])
    if row["errors"]:
        cell += f" · {row['errors']} error"
    if row["timeouts"]:
        cell += f" · {row['timeouts']} × > {row['timeout']:g} s"
    return cell


def _ratio(x: float | None) -> str:
    return f"{x:.2f}×" if x else "–"


def render_markdown(meta: dict, rows: list[dict], command: str) -> str:
    head = [
        "# Startup/teardown benchmark",
        "",
        *machine_lines(meta, command),
        "",
        "Seconds, median (min–max) over the successful runs; variants interleaved. "
        "**wall**: launch → launcher exit. **first**: launch → first line of the user script "
        "(after `initialize()` for initialize scripts). **Client()**: launch → `Client()` "
        "returned. **teardown**: script's last line → launcher exit. **workers**: workers "
        "the client saw at its first result (min–max). For `*-fail` variants the script "
        "raises on purpose; a run counts as ok when the exit code is non-zero.",
        "",
        "| variant | ranks | ok/runs | wall s | ×floor | ×dask-mpi | first s | Client() s "
        "| teardown s | workers | stderr lines |",
        "|---|---:|---:|---|---:|---:|---|---|---|---|---|",
    ]
    body = []
    for r in rows:
        w = r["workers"]
        workers = "–" if not w else (str(w[0]) if w[0] == w[1] else f"{w[0]}–{w[1]}")
        body.append(
            f"| {r['variant']} | {r['n']} | {r['ok']}/{r['runs']} | {fmt_wall(r)} "
            f"| {_ratio(r['x_floor'])} | {_ratio(r['x_dask-mpi'])} | {fmt_stat(r['first'])} "
            f"| {fmt_stat(r['client'])} | {fmt_stat(r['teardown'])} | {workers} "
            f"| {fmt_stat(r['stderr_lines'], 0)} |")
    return "\n".join(head + body) + "\n"


def plot(rows: list[dict], path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib does not import"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        pts = [(r["n"], r["wall"]) for r in rows if r["variant"] == variant and r["wall"]]
        if not pts:
            continue
        ns = [n for n, _ in pts]
        med = [s["median"] for _, s in pts]
        err = [[s["median"] - s["min"] for _, s in pts], [s["max"] - s["median"] for _, s in pts]]
        ax.errorbar(ns, med, yerr=err, marker="o", capsize=3, label=variant,
                    linestyle="--" if variant == "floor" else "-")
    ax.set_xlabel("MPI ranks")
    ax.set_ylabel("launch → exit, s (median, min–max)")
    ax.set_xticks(sorted({r["n"] for r in rows}))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written: {path}"


# --- main ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=60.0, help="per run, seconds")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--venv", type=Path, default=Path(".venv/bench"),
                    help="venv whose bin/ has mpiexec, python, dask-mpi-launch")
    ap.add_argument("--mpi", choices=["auto", "mpich", "openmpi"], default="auto")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed runs of each variant at the smallest rank count")
    ap.add_argument("--out", type=Path, default=results_dir())
    args = ap.parse_args(argv)

    venv = args.venv.absolute()
    meta = machine_facts(venv)
    mpi = pick_mpi(meta, args.mpi)
    env = make_env(venv, mpi)
    command = command_line(argv)
    print(f"MPI: {meta['mpi_library']} ({mpi}); venv {venv}", file=sys.stderr)

    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="dml-bench-") as tmp:
        scripts = {}
        for name in args.variants:
            if VARIANTS[name].script is not None:
                scripts[name] = write_script(tmp, name)

        def one(name: str, n: int) -> dict:
            v = VARIANTS[name]
            raw = run_once(build_argv(v, n, venv, scripts.get(name), mpi), env, tmp, args.timeout)
            return measure(raw, v.fails, v.script is not None)

        for _ in range(args.warmup):
            for name in args.variants:
                m = one(name, min(args.ranks))
                print(f"warm-up {name:16s} n={min(args.ranks):3d} {m['wall']:7.2f} s "
                      f"{m['status']}", file=sys.stderr)
        for n in args.ranks:
            hung: set[str] = set()  # after a timeout, skip the variant's other repeats at this n
            for rep in range(args.repeat):
                for name in args.variants:
                    if name in hung:
                        continue
                    m = one(name, n)
                    runs.append({"variant": name, "n": n, "rep": rep, "load1": load1(),
                                 **m})
                    print(f"[n={n} {rep + 1}/{args.repeat}] {name:16s} {m['wall']:7.2f} s "
                          f"{m['status']}" + (f" rc={m['rc']}" if m["status"] != "ok" else ""),
                          file=sys.stderr)
                    if m["status"] == "timeout":
                        hung.add(name)

    meta["load_end"] = _load()
    rows = summarize(runs, args.timeout)
    md = render_markdown(meta, rows, command)
    md_path, json_path = write_results(args.out, "startup", md, {
        "meta": meta, "command": command, "args": args_record(args),
        "summary": rows, "runs": runs})
    note = plot(rows, args.out / "startup.png")
    print(md)
    print(f"wrote {md_path}, {json_path}; {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
