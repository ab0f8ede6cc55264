#!/usr/bin/env python3
"""Scaling by simulation: one real Dask scheduler, 1,000+ lightweight workers on one machine.

One process runs a ``distributed.Scheduler`` (defaults, on 127.0.0.1, port 0, no dashboard).
--procs processes each run their share of N ``distributed.Worker`` objects in one asyncio loop
(nthreads=1, memory_limit=0, no nanny, no dashboard, 127.0.0.1).  Every process imports
first and reports READY; then all get GO at once and start all their workers concurrently --
the burst an MPI job produces when every rank reaches ``Worker()`` at about the same time.

Measured per trial (times from GO):
* all       until the scheduler has seen N workers (a SchedulerPlugin timestamps every
            ``add_worker``); throughput = N / all, in workers/s; also 50 % and 90 %;
* peak      best registrations/s over a 1-s window;
* sched cpu scheduler CPU seconds / wall seconds during the registration (1.0 = one core);
* unresp.   "Event loop was unresponsive" warnings of the scheduler (its tick, 3 s limit);
* lat p50/p99/max  each worker's own ``await Worker(...)`` (connect + handshake + register);
* retries   worker-side connect retries ("Could not connect", "Waiting to connect") and
            failed workers;
* SYN drops the kernel's ListenDrops counter over the registration (full accept queues);
* teardown  then the job ends (--teardown order): seconds until the scheduler process and
            until every process is gone, and the scheduler's CPU meanwhile.
Cost model: the version comparison each registration makes against every connected worker
(``distributed.versions.error_message``), timed alone at --model-sizes connected workers.
Trials are bounded (--timeout); all processes are in their own process groups, killed at the
end of every trial.

Phase 1 (curve): default settings at each --workers count.  Phase 2 (knobs): at --at workers,
each --sweep variant: Dask config values applied in every process (scheduler and workers),
or ``ramp=S`` (workers start spread uniformly over S seconds: what a launcher can do).
Simulation only: to fit hundreds of workers in one process the worker processes run at
nice 10 and switch off per-worker background timers (profiler off, tick 1 s, system monitor
10 s, no GIL monitor), each worker with its own local directory; the scheduler keeps Dask's
defaults.  On 2 cores the workers and the scheduler share the CPU, so absolute
numbers are lower than on a cluster where each worker has its own host; compare the shape.

Diagnostics: BENCH_SCALE_PROFILE=FILE dumps a cProfile of the scheduler process (last trial;
with a teardown: FILE.registration until the job's end, FILE from there).
Writes results/scale.{md,json,png}.  Usually run through ``bin/bench-scale``.
"""
from __future__ import annotations

import argparse
import json
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import _load, args_record, machine_facts, results_dir, write_results  # noqa: E402
# the parts, by purpose (names re-exported for the tests and for older callers)
from scale_report import (_f, _teardown, plot, render_markdown, rerender,  # noqa: E402,F401
                          summarize, write_summary)
from scale_roles import curve_config, run_child, write_credentials  # noqa: E402
from scale_trial import (ALIASES, MODEL_SIZES, SWEEP, _kill_all, _read_int,  # noqa: E402
                         parse_variant, run_trial)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    """The options, and the --sweep variants parsed: {name: (config, ramp)}."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: bin/bench-scale --workers 250 500 1000 1500 --at 1500 "
               "--sweep default backlog=128 connect=5s ramp=2s")
    ap.add_argument("sizes", type=int, nargs="*", metavar="N",
                    help="worker counts of the curve (same as --workers)")
    ap.add_argument("--tls", action=argparse.BooleanOptionalAction, default=True,
                    help="TLS with one job's throw-away credentials, like the launcher's "
                         "default (--no-tls: plain TCP)")
    ap.add_argument("--scheduler", nargs="+", choices=["ours", "upstream"], default=["ours"],
                    help="the scheduler role with our Scheduler (scheduler_ext) or with "
                         "distributed.Scheduler; several: interleaved at every size")
    ap.add_argument("--teardown", nargs="*", choices=["scheduler-first", "workers-first"],
                    default=["scheduler-first"],
                    help="after the registration, end the job in this order and time it "
                         "until every process is gone: scheduler-first (the launcher's "
                         "order), workers-first (its order before); several: interleaved "
                         "at every size; none: kill everything, no teardown measured")
    ap.add_argument("--scaled", action=argparse.BooleanOptionalAction, default=True,
                    help="the curve with the launcher's defaults for each size "
                         "(dask_mpi_launch.tuning.scale.for_job(N), in every process, as the launcher "
                         "passes them to its roles); --no-scaled: Dask's defaults")
    ap.add_argument("--spread", action=argparse.BooleanOptionalAction, default=True,
                    help="each process of simulated workers listens on a loopback address "
                         "of its own (127.0.1.K), like a host (--no-spread: all on "
                         "127.0.0.1, whose ephemeral ports run out near 9,000 workers)")
    ap.add_argument("--real", type=int, default=8,
                    help="of the N workers, this many run the launcher's worker role "
                         "unchanged, one process each (the others are simulated, many per "
                         "process, with the same options)")
    ap.add_argument("--workers", type=int, nargs="+", default=[250, 500, 1000, 1500],
                    help="worker counts of the curve (defaults)")
    ap.add_argument("--procs", type=int, default=8, help="processes holding the workers")
    ap.add_argument("--at", type=int, default=None,
                    help="worker count of the settings sweep (default: the largest --workers)")
    ap.add_argument("--sweep", nargs="*", default=[],
                    help=f"variants at --at: {', '.join(SWEEP)}; or "
                         f"{'|'.join(ALIASES)}=VALUE, ramp=SECONDS, dask.config.key=VALUE, "
                         "several joined by + (default: no sweep)")
    ap.add_argument("--repeat", type=int, default=2,
                    help="trials per settings variant (order reversed every other round)")
    ap.add_argument("--curve-repeat", type=int, default=1, help="trials per curve point")
    ap.add_argument("--model-sizes", type=int, nargs="*", default=MODEL_SIZES,
                    help="connected-worker counts of the version-check cost model "
                         "(none: skip it)")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="bound on one registration, seconds")
    ap.add_argument("--setup-timeout", type=float, default=120.0,
                    help="bound on starting and importing the processes, seconds")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds the scheduler's steady-state CPU is measured after")
    ap.add_argument("--venv", type=Path, default=Path(sys.prefix),
                    help="venv to report package versions of (the children use this python)")
    ap.add_argument("--out", type=Path, default=results_dir(),
                    help="directory for scale.md/.json/.png (default benchmarks/results)")
    ap.add_argument("--from-json", type=Path, default=None, metavar="SCALE_JSON",
                    help="only re-render scale.md/.png from an earlier scale.json")
    args = ap.parse_args(argv)
    if args.sizes:
        args.workers = args.sizes
    try:
        variants = {v: parse_variant(v) for v in args.sweep}
    except argparse.ArgumentTypeError as e:
        ap.error(f"--sweep: {e}")
    return args, variants


def show(t: dict) -> None:
    """One trial's line on stderr, as it ends."""
    r = summarize(t)
    print(f"  {r['variant']:>14s} n={r['n']:5d} {r['status']:7s} all={_f(r['t_all'])} s "
          f"rate={_f(r['rate'], 0)}/s sched_cpu={_f(r['sched_cpu'])} "
          f"sched_ms={_f(r['sched_ms'])} "
          f"lat99={_f(r['lat99'])} retries={r['retries']} failed={r['failed']} "
          f"worker_cpu={_f(r['worker_cpu'], 1)} s "
          f"unresp={r['unresponsive']} teardown={_teardown(r)} "
          f"sched_fds={r.get('sched_fds')} sched_rss={r.get('sched_rss')} MB "
          f"worker_proc_rss<={r.get('worker_rss')} MB "
          f"load {_load()}" + (f" ({r['why']})" if r.get('why')
                                                         else ""), file=sys.stderr)


def run_curve(args, proto: str, tmp: str) -> list[dict]:
    """Phase 1: every --workers count, each scheduler and teardown order interleaved
    (their order reversed every other point)."""
    print(f"curve: {args.workers} workers over {args.procs} processes "
          f"(+{args.real} real worker roles), {proto}, scheduler {args.scheduler}",
          file=sys.stderr)
    trials = []
    combos = [(which, order) for which in args.scheduler for order in (args.teardown or [None])]
    for rep in range(args.curve_repeat):
        for n in args.workers:
            for which, order in (combos if (rep + n) % 2 == 0 else combos[::-1]):
                name = f"{proto} {which}" + (f" {order}" if len(args.teardown) > 1 else "")
                t = run_trial(n, name, curve_config(n, args.scaled), 0.0, args, Path(tmp),
                              which, order)
                t["rep"] = rep
                trials.append(t)
                show(t)
    return trials


def run_sweep(args, variants: dict, at: int, tmp: str) -> list[dict]:
    """Phase 2: every --sweep variant at --at workers, --repeat times."""
    if variants:
        print(f"settings at {at} workers: {list(variants)}", file=sys.stderr)
    trials = []
    for rep in range(args.repeat):
        order = list(variants.items())
        if rep % 2:
            order.reverse()  # A B C, C B A, ...: load drift cancels out in medians
        for name, (config, ramp) in order:
            t = run_trial(at, name, config, ramp, args, Path(tmp),
                          args.scheduler[0], (args.teardown or [None])[0])
            t["rep"] = rep
            trials.append(t)
            show(t)
    return trials


def cost_model(sizes: list[int]) -> dict | None:
    """The version-check cost model, timed in a child of its own (python scale.py _model)."""
    if not sizes:
        return None
    raw = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_model",
                          *map(str, sizes)], capture_output=True, text=True,
                         timeout=120, start_new_session=True)
    line = next((x for x in raw.stdout.splitlines() if x.startswith("MODEL=")), None)
    model = json.loads(line[len("MODEL="):]) if line else None
    print(f"cost model: {model}", file=sys.stderr)
    return model


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    status = run_child(argv)
    if status is not None:
        return status
    args, variants = parse_args(argv)
    if args.from_json:
        return rerender(args.from_json, args.out)
    at = args.at or max(args.workers)
    if "scaled" in variants:
        variants["scaled"] = (curve_config(at, True), 0.0)
        print(f"scaled for {at} workers: {variants['scaled'][0]}", file=sys.stderr)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, f: (_kill_all(), sys.exit(128 + s)))
    meta = machine_facts(args.venv.absolute())
    meta.update(procs=args.procs, somaxconn=_read_int("/proc/sys/net/core/somaxconn"),
                syn_backlog=_read_int("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
                nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    command = " ".join([Path(sys.argv[0]).name, *argv])
    meta.update(tls=args.tls, real=args.real, scaled=args.scaled, spread=args.spread)
    proto = "tls" if args.tls else "tcp"
    with tempfile.TemporaryDirectory(prefix="dml-bench-scale-") as tmp:  # 0700, ours
        args.tls_file = write_credentials(tmp) if args.tls else None
        try:
            curve_trials = run_curve(args, proto, tmp)
            knob_trials = run_sweep(args, variants, at, tmp)
        finally:
            _kill_all()

    model = cost_model(args.model_sizes)
    meta["load_end"] = _load()
    curve = [summarize(t) for t in curve_trials]
    knobs = [summarize(t) for t in knob_trials]
    summary = write_summary(curve, knobs, model, meta)
    md = render_markdown(meta, curve, knobs, model, command, summary, args.timeout)
    md_path, json_path = write_results(args.out, "scale", md, {
        "meta": meta, "command": command, "args": args_record(args),
        "curve": curve, "knobs": knobs, "model": model, "summary": summary,
        "trials": curve_trials + knob_trials})
    note = plot(curve_trials, knob_trials, curve, args.out / "scale.png")
    print(md)
    print(f"wrote {md_path}, {json_path}; {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
