#!/usr/bin/env python3
"""Metadata load: file-system look-ups of one trivial job, dask-mpi-launch vs dask-mpi.

On a parallel file system every ``open``/``stat`` of a Python file is a request to one
metadata server, from every rank at once (the "import storm"). This counts them for one
run of each variant, ``mpiexec -n N`` with the same trivial job as ``bin/bench``
(``Client().submit(lambda x: x + 1, 1)``), under ``strace -f -c -e trace=%file``: every
system call that takes a file name (openat, newfstatat/statx, access, readlink, execve,
...) of mpiexec and everything it starts, failed look-ups (ENOENT along ``sys.path``)
included. ``floor`` is ``python -c "import mpi4py.MPI, distributed"`` on every rank.
strace slows the processes down: only the counts mean something, not the times.

Writes results/metadata.{md,json}.  Usually run through ``bin/bench-metadata``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import (VARIANTS, _load, build_argv, machine_facts, machine_lines,  # noqa: E402
                     make_env, parse_markers, run_once)

DEFAULT_VARIANTS = ["floor", "dask-mpi", "ours-script"]
OPEN = {"open", "openat", "openat2", "creat", "open_by_handle_at"}
STAT = {"stat", "lstat", "newfstatat", "fstatat64", "statx", "access", "faccessat",
        "faccessat2", "readlink", "readlinkat", "statfs"}


def parse_strace_summary(text: str) -> dict[str, dict[str, int]]:
    """``{syscall: {"calls": n, "errors": m}}`` from ``strace -c`` output.

    >>> parse_strace_summary('''% time     seconds  usecs/call     calls    errors syscall
    ... ------ ----------- ----------- --------- --------- ----------------
    ...  60.00    0.000600           3       200       150 openat
    ...  40.00    0.000400           2       100           newfstatat
    ... ------ ----------- ----------- --------- --------- ----------------
    ... 100.00    0.001000           3       300       150 total''')
    {'openat': {'calls': 200, 'errors': 150}, 'newfstatat': {'calls': 100, 'errors': 0}}
    """
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) not in (5, 6) or parts[-1] == "total" or parts[-1] == "syscall":
            continue
        try:
            float(parts[0])
            calls = int(parts[3])
            errors = int(parts[4]) if len(parts) == 6 else 0
        except ValueError:
            continue
        out[parts[-1]] = {"calls": calls, "errors": errors}
    return out


def totals(calls: dict[str, dict[str, int]], ranks: int) -> dict:
    """Per job and per rank: all file-name calls, opens, stat family, failed ones.

    >>> t = totals({"openat": {"calls": 200, "errors": 150},
    ...             "newfstatat": {"calls": 100, "errors": 0},
    ...             "execve": {"calls": 4, "errors": 0}}, 2)
    >>> t["all"], t["open"], t["stat"], t["failed"], t["all_per_rank"]
    (304, 200, 100, 150, 152.0)
    """
    t = {
        "all": sum(c["calls"] for c in calls.values()),
        "open": sum(c["calls"] for k, c in calls.items() if k in OPEN),
        "stat": sum(c["calls"] for k, c in calls.items() if k in STAT),
        "failed": sum(c["errors"] for c in calls.values()),
    }
    t.update({f"{k}_per_rank": round(v / ranks, 1) for k, v in list(t.items())})
    return t


def render_markdown(meta: dict, rows: list[dict], command: str) -> str:
    by = {r["variant"]: r for r in rows}
    ref = by.get("dask-mpi")
    lines = [
        "# Metadata load: file-system look-ups of one trivial job",
        "",
        *machine_lines(meta, command),
        "",
        "One run each of `mpiexec -n N <variant>` under `strace -f -c -e trace=%file` "
        "(every system call taking a file name, of mpiexec and all it starts; failed "
        "look-ups included). **open**: open/openat; **stat**: stat family, access, "
        "readlink; **failed**: calls that returned an error (mostly ENOENT along "
        "`sys.path`); **× dask-mpi**: all look-ups against dask-mpi's.",
        "",
        "| variant | ranks | status | all | per rank | open | stat | failed | × dask-mpi |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r.get("totals")
        if not t:
            lines.append(f"| {r['variant']} | {r['n']} | **{r['status']}** | – | – | – | – "
                         "| – | – |")
            continue
        ratio = (f"{t['all'] / ref['totals']['all']:.2f}×"
                 if ref and ref.get("totals") else "–")
        lines.append(f"| {r['variant']} | {r['n']} | {r['status']} | {t['all']:,} "
                     f"| {t['all_per_rank']:,.0f} | {t['open']:,} | {t['stat']:,} "
                     f"| {t['failed']:,} | {ratio} |")
    lines += ["", "Top system calls per variant:", ""]
    for r in rows:
        top = sorted((r.get("calls") or {}).items(), key=lambda kv: -kv[1]["calls"])[:6]
        lines.append(f"- {r['variant']}: " + ", ".join(
            f"{k} {v['calls']:,} ({v['errors']:,} failed)" for k, v in top))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=16, help="ranks of the job (mpiexec -n)")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                    choices=sorted(VARIANTS), help="variants of bin/bench to count")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="bound on one traced run, seconds (strace slows it down)")
    ap.add_argument("--venv", type=Path, default=Path(sys.prefix),
                    help="venv with mpiexec, the package and dask-mpi (MPICH)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                    help="directory for metadata.md/.json (default benchmarks/results)")
    args = ap.parse_args(argv)
    strace = shutil.which("strace")
    if strace is None:
        ap.error("needs strace: apt-get install strace")
    venv = args.venv.absolute()
    meta = machine_facts(venv)
    mpi = "openmpi" if "Open MPI" in meta.get("mpi_library", "") else "mpich"
    env = make_env(venv, mpi)
    command = " ".join([Path(sys.argv[0]).name, *argv])
    rows = []
    with tempfile.TemporaryDirectory(prefix="dml-bench-metadata-") as tmp:
        for name in args.variants:
            v = VARIANTS[name]
            script = None
            if v.script is not None:
                script = str(Path(tmp) / f"bench_{name.replace('-', '_')}.py")
                Path(script).write_text(v.script)
            trace = Path(tmp) / f"{name}.strace"
            cmd = [strace, "-f", "-c", "-e", "trace=%file", "-o", str(trace),
                   *build_argv(v, args.ranks, venv, script, mpi)]
            load = _load()
            raw = run_once(cmd, env, tmp, args.timeout)
            ok = raw["rc"] == 0 and not raw["timed_out"] and (
                v.script is None or parse_markers(raw["stdout"]).get("RESULT") == "2")
            calls = parse_strace_summary(trace.read_text()) if trace.exists() else {}
            row = {"variant": name, "n": args.ranks, "rc": raw["rc"], "load": load,
                   "status": "ok" if ok else ("timeout" if raw["timed_out"] else "error"),
                   "calls": calls, "totals": totals(calls, args.ranks) if calls else None}
            if not ok:
                row["stderr_tail"] = raw["stderr"].splitlines()[-5:]
            rows.append(row)
            t = row["totals"] or {}
            print(f"  {name:>12s} n={args.ranks} {row['status']}: {t.get('all', '–')} "
                  f"file look-ups, {t.get('all_per_rank', '–')} per rank (load {load})",
                  file=sys.stderr)
    meta["load_end"] = _load()
    md = render_markdown(meta, rows, command)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metadata.md").write_text(md)
    (args.out / "metadata.json").write_text(json.dumps(
        {"meta": meta, "command": command, "rows": rows}, indent=1) + "\n")
    print(md)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
