"""A batch job's end, measured (issue 23): how long a job takes from the time-limit warning
to its exit, and what ``--record`` costs a job.

    python benchmarks/job_end.py [--venv .venv/mpich] [--ranks 16] [--rounds 3]

1. **Time limit.** ``mpiexec -n RANKS dask-mpi-launch --time-limit LIMIT --time-grace GRACE``
   with a script that computes until it is warned, in two variants run in turn: ``ends``
   (the script lets ``TimeLimitReached`` end it: status 124 at once) and ``ignores`` (it
   catches the warning and computes on, so the job is stopped at ``end - teardown``, as on
   SIGTERM). The script prints the allocation's end (``time.time() + time_left()``) and the
   moment it was warned; we give the time from the warning to ``mpiexec``'s exit, and how
   long before the limit the job had ended.
2. **The record.** A 4-rank job (a 2000x2000 matrix product) with and without ``--record``,
   interleaved: the median wall time of each and their difference.

Results go to ``benchmarks/results/job-end.{md,json}`` with the machine's load.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

WARNED = """\
import sys, time
import dask_mpi_launch
from distributed import Client

client = Client()
print(f"end={time.time() + dask_mpi_launch.time_left():.3f}", flush=True)
ignore = sys.argv[1] == "ignores"
while True:
    try:
        while True:
            client.submit(sum, range(10_000), pure=False).result()
            time.sleep(0.05)
    except dask_mpi_launch.TimeLimitReached:
        print(f"warned={time.time():.3f}", flush=True)
        if not ignore:
            raise
"""

PRODUCT = """\
import dask.array as da
from distributed import Client

client = Client()
x = da.random.random((2000, 2000), chunks=500)
print(float((x @ x.T).sum().compute()) > 0)
"""


def values(out: str) -> dict:
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def time_limit_run(args, env, work: Path, variant: str) -> dict:
    limit = f"{args.limit // 60}:{args.limit % 60:02d}"  # MM:SS (a bare number is minutes)
    argv = ["mpiexec", "-n", str(args.ranks), "dask-mpi-launch", "--time-limit", limit, "--time-grace",
            str(args.grace), str(work / "warned.py"), variant]
    res = common.run_once(argv, env, str(work), timeout=args.limit + 60)
    v = values(res["stdout"])
    try:
        res["warn_to_exit"] = res["t1"] - float(v["warned"])
        res["before_limit"] = float(v["end"]) - res["t1"]
    except (KeyError, ValueError):
        res["note"] = f"status {res['rc']}: {res['stderr'][-300:]!r}"
    return res


def record_run(args, env, work: Path, variant: str) -> dict:
    extra = ["--record", tempfile.mkdtemp(dir=work)] if variant == "record" else []
    argv = ["mpiexec", "-n", "4", "dask-mpi-launch", *extra, str(work / "product.py")]
    res = common.run_once(argv, env, str(work), timeout=120)
    res["wall"] = res["t1"] - res["t0"]
    if res["rc"] != 0:
        res["note"] = f"status {res['rc']}"
    return res


def median(results: list[dict], key: str) -> float | None:
    xs = [r[key] for r in results if key in r]
    return round(statistics.median(xs), 2) if xs else None


def render(meta: dict, limit: dict, record: dict, args) -> str:
    lines = ["# A batch job's end: time-limit warning to exit, and the record's cost", "",
             *common.machine_lines(meta, common.command_line(None)), "",
             f"## Time limit: {args.ranks} ranks, --time-limit {args.limit} --time-grace "
             f"{args.grace}, {args.rounds} rounds", "",
             "| script | status | warning -> exit (s) | ended before the limit (s) |",
             "|---|---|---|---|"]
    for variant, rs in limit.items():
        lines.append(f"| {variant} | {sorted({r['rc'] for r in rs})} | "
                     f"{common.fmt_stat(common._stats([r['warn_to_exit'] for r in rs if 'warn_to_exit' in r]))} | "
                     f"{common.fmt_stat(common._stats([r['before_limit'] for r in rs if 'before_limit' in r]))} |")
    plain, rec = median(record["plain"], "wall"), median(record["record"], "wall")
    lines += ["", f"## --record: a 4-rank job, {args.rounds * 2} rounds, wall time (s)", "",
              "| without | with --record | difference |", "|---|---|---|",
              f"| {common.fmt_stat(common._stats([r['wall'] for r in record['plain']]))} | "
              f"{common.fmt_stat(common._stats([r['wall'] for r in record['record']]))} | "
              f"{(rec - plain) if None not in (rec, plain) else '-':+.2f} |", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--venv", type=Path, default=Path(".venv/mpich"))
    p.add_argument("--ranks", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--limit", type=int, default=60, help="--time-limit, seconds")
    p.add_argument("--grace", type=int, default=30, help="--time-grace, seconds")
    p.add_argument("--out", type=Path, default=common.results_dir())
    args = p.parse_args(argv)
    venv = args.venv.resolve()
    meta = common.machine_facts(venv)
    meta.update(date=datetime.datetime.now().isoformat(timespec="seconds"),
                host=platform.node(), load_start=common._load())
    mpi = common.pick_mpi(meta, "auto")
    env = common.make_env(venv, mpi)
    with tempfile.TemporaryDirectory(prefix="dml-job-end-") as tmp:
        work = Path(tmp)
        (work / "warned.py").write_text(WARNED)
        (work / "product.py").write_text(PRODUCT)
        limit = common.interleave(args.rounds, ["ends", "ignores"],
                                  lambda v: time_limit_run(args, env, work, v), "time limit")
        record = common.interleave(args.rounds * 2, ["plain", "record"],
                                   lambda v: record_run(args, env, work, v), "record")
    meta["load_end"] = common._load()
    md = render(meta, limit, record, args)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("stdout", "stderr")} for r in rs]  # noqa: E731
    common.write_results(args.out, "job-end", md, {
        "meta": meta, "args": common.args_record(args),
        "time_limit": {k: strip(v) for k, v in limit.items()},
        "record": {k: strip(v) for k, v in record.items()}})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
