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

By default (``--by-process``) every call is logged (``strace -f -o``, prctl and clone
traced too) to tell which kind of process made it (the name our processes give
themselves: dml-rank, dml-zygote, dml-scheduler, dml-worker, dml-script; else the program:
python, mpiexec...), and to tell look-ups that reach a file system ("files": a path
outside /proc, /sys, /dev) from MPI_Init's hardware scan and fstat of open files.

Writes results/metadata.{md,json}.  Usually run through ``bin/bench-metadata``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (_load, machine_facts, machine_lines, make_env, mpi_of,  # noqa: E402
                    results_dir, run_once, write_results)
from startup import VARIANTS, build_argv, parse_markers, write_script  # noqa: E402

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


FORKS = {"clone", "clone3", "fork", "vfork"}


def strace_calls(lines):
    """``(pid, syscall, line)`` of every complete call in a ``strace -f -o`` log, an
    interrupted call's two lines (``<unfinished ...>``, ``<... resumed>``) joined.

    >>> list(strace_calls(['7 openat(AT_FDCWD, "/a", <unfinished ...>',
    ...                    '8 stat("/b", 0x1) = -1 ENOENT (No such file)',
    ...                    '7 <... openat resumed>O_RDONLY) = 3', '8 +++ exited with 0 +++'])
    ...      )  # doctest: +NORMALIZE_WHITESPACE
    [('8', 'stat', '8 stat("/b", 0x1) = -1 ENOENT (No such file)'),
     ('7', 'openat', '7 openat(AT_FDCWD, "/a", O_RDONLY) = 3')]
    """
    import re

    call = re.compile(r"^(\d+)\s+(?:<\.\.\. (\w+) resumed>|(\w+)\()")
    pending: dict[str, str] = {}
    for line in lines:
        line = line.rstrip("\n")
        m = call.match(line)
        if not m:
            continue
        pid, resumed, name = m.groups()
        if resumed:
            head = pending.pop(pid, f"{pid} {resumed}(")
            line = head + line[m.end():]
            name = resumed
        elif line.endswith("<unfinished ...>"):
            pending[pid] = line[: -len("<unfinished ...>")]
            continue
        yield pid, name, line


def _result(line: str) -> str:
    """What a call returned (strace pads before the ``=``).

    >>> _result('9 openat(AT_FDCWD, "/a = b", O_RDONLY)      = -1 ENOENT (No such file)')
    '-1 ENOENT (No such file)'
    """
    import re

    m = re.search(r"\)\s+=\s+(-?\d+.*|\?.*)$", line)
    return m.group(1) if m else ""


NODE_LOCAL = ("/proc/", "/sys/", "/dev/")


def on_file_system(line: str) -> bool:
    """Whether a call looks a name up in a real file system: it has a path (not an
    ``fstat`` of an open file, ``AT_EMPTY_PATH``) outside the kernel's node-local
    /proc, /sys, /dev (MPI_Init's hardware scan: ~1,900 per rank, never a metadata server).

    >>> on_file_system('9 openat(AT_FDCWD, "/venv/lib/x.py", O_RDONLY) = 3')
    True
    >>> on_file_system('9 readlink("/sys/class/net/lo", 0x1, 4096) = -1 EINVAL')
    False
    >>> on_file_system('9 newfstatat(3, "", {st_mode=S_IFREG}, AT_EMPTY_PATH) = 0')
    False
    """
    parts = line.split('"', 2)
    if len(parts) < 3 or not parts[1]:
        return False
    path = parts[1]
    return not (path + "/").startswith(NODE_LOCAL)


def parse_strace_log(lines) -> dict:
    """Per kind of process: file-name calls (and failed ones) from a ``strace -f -o`` log
    traced with ``%file,prctl,clone,clone3,fork,vfork``. A process's kind is the name it
    gave itself last (``dml-rank``, ``dml-zygote``, ``dml-worker``...: PR_SET_NAME), else
    the program it ran last (execve), else its parent's; all its calls count for it.

    >>> log = [
    ...   '10 execve("/v/bin/mpiexec", ["mpiexec"], 0x1 /* 3 vars */) = 0',
    ...   '10 clone(child_stack=NULL, flags=SIGCHLD) = 11',
    ...   '11 execve("/v/bin/python", ["python"], 0x1 /* 3 vars */ <unfinished ...>',
    ...   '11 <... execve resumed>) = 0',
    ...   '11 openat(AT_FDCWD, "/x.py", O_RDONLY) = -1 ENOENT (No such file)',
    ...   '11 newfstatat(AT_FDCWD, "/y", <unfinished ...>',
    ...   '11 <... newfstatat resumed>{st_mode=S_IFREG}, 0) = 0',
    ...   '11 prctl(PR_SET_NAME, "dml-rank") = 0',
    ...   '11 clone3({flags=CLONE_VM, ...} <unfinished ...>',
    ...   '11 <... clone3 resumed> => {parent_tid=[12]}, 88) = 12',
    ...   '12 openat(AT_FDCWD, "/z", O_RDONLY) = 3',
    ...   '10 +++ exited with 0 +++']
    >>> by = parse_strace_log(log)
    >>> by["dml-rank"]["calls"], by["dml-rank"]["errors"], by["dml-rank"]["processes"]
    (4, 1, 2)
    >>> by["dml-rank"]["fs"]
    4
    >>> by["mpiexec"]["calls"]
    1
    """
    import re

    parent: dict[str, str] = {}
    named: dict[str, str] = {}
    ran: dict[str, str] = {}
    counts: dict[str, list[int]] = {}
    for pid, name, line in strace_calls(lines):
        ret = _result(line)
        if name in FORKS:
            child = ret.split()[0] if ret else ""
            if child.isdigit():
                parent[child] = pid
            continue
        if name == "prctl":
            n = re.search(r'PR_SET_NAME, "([^"]*)"', line)
            if n:
                named[pid] = n.group(1)
            continue
        if name == "execve" and ret.startswith("0"):
            ran[pid] = os.path.basename(line.split('"', 2)[1])
        c = counts.setdefault(pid, [0, 0, 0])
        c[0] += 1
        c[1] += ret.startswith("-1")
        c[2] += on_file_system(line)

    def kind(pid: str, depth: int = 0) -> str:
        if pid in named:
            return named[pid]
        if pid in ran:
            return ran[pid]
        if pid in parent and depth < 50:
            return kind(parent[pid], depth + 1)
        return "?"

    by: dict[str, dict[str, int]] = {}
    for pid in set(counts) | set(named) | set(ran):
        k = by.setdefault(kind(pid), {"calls": 0, "errors": 0, "fs": 0, "processes": 0})
        calls, errors, fs = counts.get(pid, (0, 0, 0))
        k["calls"] += calls
        k["errors"] += errors
        k["fs"] += fs
        k["processes"] += 1
    return by


def calls_from_log(path: Path) -> dict[str, dict[str, int]]:
    """``{syscall: {"calls", "errors"}}`` of the file-name calls in a ``strace -f -o`` log
    (what ``strace -c`` would have summed), without the prctl/clone calls traced for
    :func:`parse_strace_log`."""
    out: dict[str, dict[str, int]] = {}
    with path.open(errors="replace") as f:
        for _, name, line in strace_calls(f):
            if name in FORKS or name == "prctl":
                continue
            c = out.setdefault(name, {"calls": 0, "errors": 0, "fs": 0})
            c["calls"] += 1
            c["errors"] += _result(line).startswith("-1")
            c["fs"] += on_file_system(line)
    return out


def totals(calls: dict[str, dict[str, int]], ranks: int) -> dict:
    """Per job and per rank: all file-name calls, opens, stat family, failed ones.

    >>> t = totals({"openat": {"calls": 200, "errors": 150},
    ...             "newfstatat": {"calls": 100, "errors": 0},
    ...             "execve": {"calls": 4, "errors": 0}}, 2)
    >>> t["all"], t["open"], t["stat"], t["failed"], t["all_per_rank"]
    (304, 200, 100, 150, 152.0)
    >>> "fs" in t, totals({"stat": {"calls": 3, "errors": 0, "fs": 2}}, 1)["fs"]
    (False, 2)
    """
    t = {
        "all": sum(c["calls"] for c in calls.values()),
        "open": sum(c["calls"] for k, c in calls.items() if k in OPEN),
        "stat": sum(c["calls"] for k, c in calls.items() if k in STAT),
        "failed": sum(c["errors"] for c in calls.values()),
    }
    if all("fs" in c for c in calls.values()):  # from a full log (--by-process)
        t["fs"] = sum(c["fs"] for c in calls.values())
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
        "`sys.path`); **× dask-mpi**: all look-ups against dask-mpi's; **files**: the "
        "look-ups of a path outside /proc, /sys and /dev (what reaches a parallel file "
        "system's metadata server: MPI_Init's hardware scan of /sys and an fstat of an "
        "open file do not), per job, per rank and against dask-mpi's.",
        "",
        "| variant | ranks | status | all | per rank | open | stat | failed | × dask-mpi "
        "| files | files per rank | files × dask-mpi |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r.get("totals")
        if not t:
            lines.append(f"| {r['variant']} | {r['n']} | **{r['status']}** | – | – | – | – "
                         "| – | – | – | – | – |")
            continue
        rt = ref.get("totals") if ref else None
        ratio = f"{t['all'] / rt['all']:.2f}×" if rt else "–"
        fs = (f"{t['fs']:,} | {t['fs_per_rank']:,.0f} | "
              + (f"{t['fs'] / rt['fs']:.2f}×" if rt and rt.get("fs") else "–")
              if "fs" in t else "– | – | –")
        lines.append(f"| {r['variant']} | {r['n']} | {r['status']} | {t['all']:,} "
                     f"| {t['all_per_rank']:,.0f} | {t['open']:,} | {t['stat']:,} "
                     f"| {t['failed']:,} | {ratio} | {fs} |")
    if any(r.get("by_process") for r in rows):
        lines += ["", "By kind of process (the name it gave itself, else the program it ran): "
                  "all look-ups (files) / processes of that kind / files per process:", ""]
        for r in rows:
            by = r.get("by_process") or {}
            top = sorted(by.items(), key=lambda kv: -kv[1]["calls"])
            lines.append(f"- {r['variant']}: " + ", ".join(
                f"{k} {v['calls']:,} ({v.get('fs', 0):,}) / {v['processes']} / "
                f"{v.get('fs', 0) / max(1, v['processes']):,.0f}" for k, v in top))
    lines += ["", "Top system calls per variant:", ""]
    for r in rows:
        top = sorted((r.get("calls") or {}).items(), key=lambda kv: -kv[1]["calls"])[:6]
        lines.append(f"- {r['variant']}: " + ", ".join(
            f"{k} {v['calls']:,} ({v['errors']:,} failed)" for k, v in top))
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=16, help="ranks of the job (mpiexec -n)")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                    choices=sorted(VARIANTS), help="variants of bin/bench to count")
    ap.add_argument("--by-process", action=argparse.BooleanOptionalAction, default=True,
                    help="also count by kind of process (dml-rank, dml-zygote, dml-worker, "
                         "mpiexec...: a full strace log instead of strace -c's summary)")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="bound on one traced run, seconds (strace slows it down)")
    ap.add_argument("--venv", type=Path, default=Path(sys.prefix),
                    help="venv with mpiexec, the package and dask-mpi (MPICH)")
    ap.add_argument("--out", type=Path, default=results_dir(),
                    help="directory for metadata.md/.json (default benchmarks/results)")
    args = ap.parse_args(argv)
    args.strace = shutil.which("strace")
    if args.strace is None:
        ap.error("needs strace: apt-get install strace")
    return args


def strace_argv(args, job: list[str], trace: Path, log: Path) -> list[str]:
    """strace -c sums the calls; --by-process logs every call instead, to tell which kind of
    process made them (and sums the log the same way)."""
    if args.by_process:
        return [args.strace, "-f", "-qq", "-e", "trace=%file,prctl,clone,clone3,fork,vfork",
                "-s", "256", "-o", str(log), *job]
    return [args.strace, "-f", "-c", "-e", "trace=%file", "-o", str(trace), *job]


def counted_calls(args, trace: Path, log: Path) -> tuple[dict, dict | None]:
    """(calls by name and result, calls by kind of process or None) of one traced run."""
    if not args.by_process:
        return (parse_strace_summary(trace.read_text()) if trace.exists() else {}), None
    if not log.exists():
        return {}, {}
    return calls_from_log(log), parse_strace_log(log.open(errors="replace"))


def trace_one(name: str, args, venv: Path, env: dict, mpi: str, tmp: str) -> dict:
    """One traced run of a variant: its status and its file look-ups."""
    v = VARIANTS[name]
    script = write_script(tmp, name)
    trace, log = Path(tmp) / f"{name}.strace", Path(tmp) / f"{name}.log"
    cmd = strace_argv(args, build_argv(v, args.ranks, venv, script, mpi), trace, log)
    load = _load()
    raw = run_once(cmd, env, tmp, args.timeout)
    ok = raw["rc"] == 0 and not raw["timed_out"] and (
        v.script is None or parse_markers(raw["stdout"]).get("RESULT") == "2")
    calls, by_process = counted_calls(args, trace, log)
    row = {"variant": name, "n": args.ranks, "rc": raw["rc"], "load": load,
           "status": "ok" if ok else ("timeout" if raw["timed_out"] else "error"),
           "calls": calls, "totals": totals(calls, args.ranks) if calls else None,
           "by_process": by_process}
    if not ok:
        row["stderr_tail"] = raw["stderr"].splitlines()[-5:]
    return row


def print_row(row: dict) -> None:
    t = row["totals"] or {}
    print(f"  {row['variant']:>12s} n={row['n']} {row['status']}: {t.get('all', '–')} "
          f"file look-ups, {t.get('all_per_rank', '–')} per rank; outside "
          f"/proc, /sys, /dev: {t.get('fs', '–')}, {t.get('fs_per_rank', '–')} per "
          f"rank (load {row['load']})",
          file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    venv = args.venv.absolute()
    meta = machine_facts(venv)
    mpi = mpi_of(meta)
    env = make_env(venv, mpi)
    command = " ".join([Path(sys.argv[0]).name, *argv])
    rows = []
    with tempfile.TemporaryDirectory(prefix="dml-bench-metadata-") as tmp:
        for name in args.variants:
            rows.append(trace_one(name, args, venv, env, mpi, tmp))
            print_row(rows[-1])
    meta["load_end"] = _load()
    md = render_markdown(meta, rows, command)
    write_results(args.out, "metadata", md, {"meta": meta, "command": command, "rows": rows})
    print(md)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
