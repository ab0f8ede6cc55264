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
import asyncio
import json
import os
import queue
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import _load, load1, machine_facts, machine_lines, results_dir  # noqa: E402

# Worker processes only: strip per-worker background timers so 100s of workers fit in one
# process (on a real cluster each worker has its own core for these).
WORKER_LIGHT = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "10s",
    # else every Worker() tries `import gilknocker` again: ~2 ms of sys.path scanning each
    "distributed.admin.system-monitor.gil.enabled": False,
    # host-wide disk counters: one reading per host is what a cluster does, not one per worker
    "distributed.admin.system-monitor.disk": False,
}

WORKER_NICE = 10


def _be_nice() -> None:
    """Nice 10 for this process and for its session's scheduling group.  Every child runs
    in a session of its own, and with the kernel's autogroup scheduling (Debian's default,
    /proc/sys/kernel/sched_autogroup_enabled) each session is a group that gets an equal
    share of the CPU whatever its processes' nice values: the scheduler had one share in
    nine (0.21 of a core), as if 8 busy hosts shared its core.  The group's own nice
    (/proc/self/autogroup) gives the scheduler its core first again."""
    os.nice(WORKER_NICE)
    try:
        Path("/proc/self/autogroup").write_text(str(WORKER_NICE))
    except OSError:
        pass  # no autogroups: the process's nice value is enough

# name -> Dask config applied in every process; "ramp=S" variants are handled separately.
SWEEP = {
    "default": {},
    "connect=5s": {"distributed.comm.timeouts.connect": "5s"},
    "connect=120s": {"distributed.comm.timeouts.connect": "120s"},
    "tcp=120s": {"distributed.comm.timeouts.tcp": "120s"},
    "backlog=128": {"distributed.comm.socket-backlog": 128},
    "backlog=4096": {"distributed.comm.socket-backlog": 4096},  # the kernel caps at somaxconn
    "conns=1000": {"distributed.worker.connections.outgoing": 1000,
                   "distributed.worker.connections.incoming": 1000},
    "ramp=2s": {},
    "scaled": {},  # dask_mpi_launch.tuning.scale.for_job(--at): the launcher's defaults for that size
}
# Short names usable in --sweep as NAME=VALUE (e.g. backlog=16, connect=10s).
ALIASES = {
    "backlog": ["distributed.comm.socket-backlog"],
    "connect": ["distributed.comm.timeouts.connect"],
    "tcp": ["distributed.comm.timeouts.tcp"],
    "conns": ["distributed.worker.connections.outgoing",
              "distributed.worker.connections.incoming"],
}
# Scheduler-side cost model: the version comparison every registration makes against all
# connected workers (Scheduler.add_worker -> distributed.versions.error_message), timed alone.
MODEL_SIZES = [1000, 3000, 10000, 30000]


# --- child: the scheduler -------------------------------------------------------------------

def _quiet_logging(counter: dict, keep: list, debug_comm: bool = False) -> None:
    """Replace distributed's log handlers by one that only counts (no formatting, no output)."""
    import logging

    class Count(logging.Handler):
        def emit(self, rec: logging.LogRecord) -> None:
            msg = str(rec.msg)
            for key in ("Waiting to connect", "Could not connect", "Event loop was unresponsive",
                        "Timed out"):
                # "Waiting to connect" is also an informational line of every worker's start;
                # only the one in the registration loop is a retry
                if msg.startswith(key) and (key != "Waiting to connect"
                                            or rec.funcName == "_register_with_scheduler"):
                    counter[key] = counter.get(key, 0) + 1
                    if key == "Event loop was unresponsive" and len(rec.args) >= 2:
                        counter["unresponsive_max"] = max(counter.get("unresponsive_max", 0),
                                                          float(rec.args[1]))
            if rec.levelno >= logging.WARNING:
                counter[rec.levelname] = counter.get(rec.levelname, 0) + 1
                if len(keep) < 5:
                    try:
                        keep.append(rec.getMessage()[:200])
                    except Exception:  # noqa: BLE001
                        pass

    root = logging.getLogger("distributed")
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(Count())
    root.propagate = False
    root.setLevel(logging.INFO)
    if debug_comm:
        logging.getLogger("distributed.comm.core").setLevel(logging.DEBUG)
    logging.getLogger("tornado").setLevel(logging.CRITICAL)


def _one_log_handler_per_process() -> None:
    """Every Worker adds a handler (for ``get_logs``) to distributed.worker's logger, so with
    hundreds of workers in one process each log line went to hundreds of handlers (quadratic:
    half of the simulated workers' CPU at 250 per process). A real worker process has one:
    the simulated workers of a process share one."""
    from distributed.node import ServerNode

    setup = ServerNode._setup_logging
    shared: dict = {}

    def _setup_logging(self, logger) -> None:
        if logger.name in shared:
            self._deque_handler = shared[logger.name]
        else:
            setup(self, logger)
            shared[logger.name] = self._deque_handler

    ServerNode._setup_logging = _setup_logging


def _raise_nofile() -> None:
    """The soft open-files limit up to the hard one (as the launcher's roles do), and the
    hard one up to the kernel's nr_open where allowed (root): the scheduler holds two
    connections per worker, 20,000+ descriptors at 10,000 workers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        nr_open = hard
    for limit in (max(hard, min(nr_open, 1 << 20)), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return
        except (ValueError, OSError):
            pass


def _fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def listen_drops() -> int | None:
    """The kernel's TcpExt ListenDrops counter (connects dropped because an accept queue
    was full, or similar), machine-wide: read before and after a trial.

    >>> isinstance(listen_drops(), (int, type(None)))
    True
    """
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            try:
                return int(table["ListenDrops"])
            except (KeyError, ValueError):
                return None
    return None


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def child_scheduler(expect: int, config: dict, timeout: float, settle: float,
                    tls_file: str, which: str) -> int:
    """The launcher's own scheduler role (``run.run_scheduler``: our Scheduler subclass,
    TLS from the job's credentials, interface lo); this file is its preload, which times
    the registrations (``dask_setup`` below).  ``which="upstream"``: the same role with
    ``distributed.Scheduler`` instead of ours, for comparison."""
    import dask
    dask.config.set({**config, "distributed.scheduler.preload": [str(Path(__file__).resolve())]})
    _raise_nofile()
    os.environ.update(BENCH_SCALE_EXPECT=str(expect), BENCH_SCALE_TIMEOUT=str(timeout),
                      BENCH_SCALE_SETTLE=str(settle))
    import distributed

    from dask_mpi_launch.roles import run
    from dask_mpi_launch.tuning import scheduler
    from dask_mpi_launch.roles.life import Channel
    from dask_mpi_launch.security.credentials import security_from
    if which == "upstream":
        scheduler.Scheduler = distributed.Scheduler  # run_scheduler imports it at call
    credentials = _read_credentials(tls_file)
    settings = _role_settings(credentials)
    prof_path = os.environ.get("BENCH_SCALE_PROFILE")
    if prof_path:  # diagnostics: cProfile of the scheduler process, dumped at STOP
        import cProfile
        global _PROF
        _PROF = cProfile.Profile()
        _PROF.enable()
    # the role reports its address as a JSON line on the channel: our stdout
    return run.run_scheduler(settings, Channel(sys.stdout.fileno()),
                               security=security_from(credentials))


_PROF = None


def dask_setup(scheduler) -> None:
    """Preload of the scheduler role: count registrations from GO (stdin), report DONE."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    expect = int(os.environ["BENCH_SCALE_EXPECT"])
    timeout = float(os.environ["BENCH_SCALE_TIMEOUT"])
    settle = float(os.environ["BENCH_SCALE_SETTLE"])
    counter: dict = {}
    keep: list = []
    _quiet_logging(counter, keep)
    arrivals: list[float] = []

    class Arrivals(SchedulerPlugin):
        name = "bench-arrivals"

        def add_worker(self, scheduler, worker):
            arrivals.append(time.time())

        async def before_close(self):  # the teardown's phases, on stdout
            print(f"PHASE=close-starts {time.time()!r}", flush=True)

        async def close(self):
            print(f"PHASE=comms-close {time.time()!r}", flush=True)

    scheduler.add_plugin(Arrivals())
    _finished = scheduler.finished

    async def finished():  # the role's wait: ends when close() is done
        await _finished()
        print(f"PHASE=closed {time.time()!r}", flush=True)

    scheduler.finished = finished

    async def measure() -> None:
        loop = asyncio.get_running_loop()
        line = await loop.run_in_executor(None, sys.stdin.readline)
        go = float(line.split()[1])
        cpu0, drops0 = _cpu(), listen_drops()
        while len(arrivals) < expect and time.time() < go + timeout:
            await asyncio.sleep(0.02)
        t_done, cpu1, drops1 = time.time(), _cpu(), listen_drops()
        await asyncio.sleep(settle)  # steady state: heartbeats only
        t_settle, cpu2 = time.time(), _cpu()
        out = {
            "arrivals": [round(a - go, 4) for a in arrivals],
            "connected": len(scheduler.workers),
            "scheduler_class": f"{type(scheduler).__module__}.{type(scheduler).__name__}",
            "cpu_reg": round(cpu1 - cpu0, 3), "wall_reg": round(t_done - go, 3),
            "cpu_settle": round(cpu2 - cpu1, 3), "wall_settle": round(t_settle - t_done, 3),
            "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "fds": _fds(),
            "listen_drops": drops1 - drops0 if None not in (drops0, drops1) else None,
            "log": counter, "log_sample": keep,
        }
        print("DONE=" + json.dumps(out), flush=True)
        # the parent says STOP (or kills), or END: the job ends, the role's own SIGTERM
        # handling closes the scheduler (its CPU from here is the teardown's)
        line = await loop.run_in_executor(None, sys.stdin.readline)
        prof = getattr(sys.modules.get("__main__"), "_PROF", None)

        def dump() -> None:
            if prof is not None:
                prof.disable()
                prof.dump_stats(os.environ["BENCH_SCALE_PROFILE"])

        if line.strip() == "END":
            if prof is not None:  # the teardown's profile: from here to the exit
                import atexit
                prof.disable()
                prof.dump_stats(os.environ["BENCH_SCALE_PROFILE"] + ".registration")
                prof.clear()
                prof.enable()
                atexit.register(dump)
            import atexit
            atexit.register(lambda: print(f"PHASE=exit {time.time()!r}", flush=True))
            print(f"ENDCPU={_cpu()!r}", flush=True)
            return
        dump()
        os._exit(0)

    scheduler._bench_measure = asyncio.ensure_future(measure())
    if os.environ.get("BENCH_SCALE_STALLS"):
        _watch_stalls(os.environ["BENCH_SCALE_STALLS"])


def _watch_stalls(path: str, limit: float = 1.0) -> None:
    """Diagnostics: where the scheduler's event loop is while it stalls.  A loop callback
    beats every 50 ms; a thread samples the loop thread's stack every 0.2 s while the beat
    is more than ``limit`` s old, and times every garbage collection over 50 ms.  Written
    to ``path`` (JSON) every 5 s: stalls (start, seconds, the most frequent stacks) and GCs."""
    import gc
    import threading
    import traceback
    from collections import Counter

    loop = asyncio.get_running_loop()
    state = {"beat": time.monotonic(), "ident": threading.get_ident()}
    t0 = time.monotonic()
    stalls: list[dict] = []
    gcs: list[dict] = []
    gc_start = {}

    def beat() -> None:
        state["beat"] = time.monotonic()
        loop.call_later(0.05, beat)

    def on_gc(phase: str, info: dict) -> None:
        if threading.get_ident() != state["ident"]:
            return
        if phase == "start":
            gc_start["t"] = time.perf_counter()
        elif "t" in gc_start:
            took = time.perf_counter() - gc_start.pop("t")
            if took > 0.05:
                gcs.append({"at": round(time.monotonic() - t0, 2), "s": round(took, 3),
                            "gen": info["generation"], "collected": info["collected"]})

    def watch() -> None:
        current = None
        last_write = time.monotonic()
        while True:
            time.sleep(0.2)
            now = time.monotonic()
            late = now - state["beat"]
            if late > limit:
                if current is None:
                    current = {"at": round(state["beat"] - t0, 2), "stacks": Counter()}
                frame = sys._current_frames().get(state["ident"])
                if frame is not None:
                    stack = traceback.extract_stack(frame)[-14:]
                    current["stacks"][" <- ".join(
                        f"{Path(f.filename).name}:{f.lineno}:{f.name}"
                        for f in reversed(stack))] += 1
            elif current is not None:
                current["s"] = round(now - t0 - current["at"], 2)
                current["stacks"] = current["stacks"].most_common(6)
                stalls.append(current)
                current = None
            if now - last_write > 5:
                last_write = now
                Path(path).write_text(json.dumps({"stalls": stalls, "gcs": gcs}, indent=1))

    gc.callbacks.append(on_gc)
    loop.call_soon(beat)
    threading.Thread(target=watch, daemon=True, name="bench-stalls").start()


def _read_credentials(path: str) -> dict | None:
    return json.loads(Path(path).read_text()) if path and path != "-" else None


def _role_settings(credentials):
    """The launcher's settings for these roles: its defaults, loopback, no dashboard."""
    from dask_mpi_launch.configure.settings import resolve
    return resolve(interface="lo", dashboard=False, tls=bool(credentials), nthreads=1,
                   memory_limit="0")


# --- child: the cost model ------------------------------------------------------------------

def child_model(sizes: list[int]) -> int:
    import copy

    from distributed.versions import error_message, get_versions
    from sortedcontainers import SortedDict

    from dask_mpi_launch.tuning.scheduler import VersionIndex

    class WS:
        def __init__(self, versions):
            self.versions = versions

    class Sched:
        pass

    versions = get_versions()
    out: dict = {"upstream": {}, "ours": {}}
    for n in sizes:
        sched = Sched()
        sched.workers = SortedDict(
            (f"tls://10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:1", WS(copy.deepcopy(versions)))
            for i in range(n))
        index = VersionIndex()
        for w in sched.workers:
            index.add_worker(sched, w)
        for name, workers in (
                ("upstream", lambda: {w: ws.versions for w, ws in sched.workers.items()}),
                ("ours", index.distinct)):
            # CPU time of this process: other work on the machine does not count
            calls, t0 = 0, time.process_time()
            while calls < 3 or time.process_time() - t0 < 0.3:
                error_message(versions, workers(), versions, source_name="bench")
                calls += 1
            out[name][str(n)] = (time.process_time() - t0) / calls
    print("MODEL=" + json.dumps(out), flush=True)
    return 0


# --- child: a process of workers ------------------------------------------------------------

def child_workers(address: str, count: int, index: int, config: dict, timeout: float,
                  ramp: float, local_dir: str, tls_file: str, spread: bool = True) -> int:
    import random

    import dask
    dask.config.set({**config, **WORKER_LIGHT})
    # The simulated workers share the machine with the scheduler: let the scheduler have
    # its core first, as it would on a cluster (and be polite to other work).
    _be_nice()
    _raise_nofile()
    counter: dict = {}
    keep: list = []
    _quiet_logging(counter, keep, debug_comm=True)
    _one_log_handler_per_process()
    from distributed.utils import import_term

    from dask_mpi_launch.tuning.scheduler import HeapFreezer
    from dask_mpi_launch.security.credentials import security_from

    # what the launcher's worker role builds (run.run_worker): its worker class, interface,
    # protocol and the job's TLS credentials
    settings = _role_settings(_read_credentials(tls_file))
    Worker = import_term(settings.worker_class)
    role_options = {"interface": settings.interface, "protocol": settings.protocol,
                    "nthreads": 1, "memory_limit": 0, **settings.worker_options}
    if spread:
        # each process of simulated workers is a "host" of its own: its workers listen on
        # 127.0.1.<index+1> (the kernel routes all of 127/8 to lo), so their listening
        # ports do not use up 127.0.0.1's ephemeral ports, which the ~2 connections per
        # worker to the scheduler need (10,000 workers: 20,000 of 28,232 by default)
        role_options.pop("interface")
        role_options["host"] = f"127.0.1.{index + 1}"
    security = security_from(_read_credentials(tls_file))
    if security is not None:
        role_options["security"] = security

    freezer = HeapFreezer()  # (its first freeze, of the imports, before the start)
    freezer.from_workers = 20
    prof = None
    if os.environ.get("BENCH_SCALE_WORKER_PROFILE") and index == 0:
        import cProfile  # diagnostics: the first process of simulated workers, to WORKERS
        prof = cProfile.Profile()
    print("READY", flush=True)
    go = float(sys.stdin.readline().split()[1])
    rnd = random.Random(index)
    if prof is not None:
        prof.enable()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        workers, lat, failed = [], [], {}
        cpu0 = _cpu()

        async def one(i: int) -> None:
            if ramp:
                await asyncio.sleep(max(0.0, go + rnd.uniform(0, ramp) - time.time()))
            t0 = time.time()
            try:
                w = Worker(address, **role_options, dashboard=False, name=f"sim-{index}-{i}",
                           # own directory each, like one node's /tmp: in a shared one every
                           # new worker scans all the others' lock files (O(N) each)
                           local_directory=os.path.join(local_dir, f"{index}-{i}"))
                await asyncio.wait_for(w, timeout=max(0.1, go + timeout - time.time()))
                workers.append(w)
                # hundreds of workers in one process: keep their long-lived objects out of
                # this process's full collections (a real worker process holds one worker),
                # as the scheduler does
                freezer.grown(len(workers))
                lat.append(round(time.time() - t0, 4))
            except Exception as e:  # noqa: BLE001 - counted, reported
                failed[type(e).__name__] = failed.get(type(e).__name__, 0) + 1

        await asyncio.gather(*(one(i) for i in range(count)))
        if prof is not None:
            prof.disable()
            prof.dump_stats(os.environ["BENCH_SCALE_WORKER_PROFILE"])
        out = {"index": index, "started": len(workers), "failed": failed, "lat": lat,
               "cpu": round(_cpu() - cpu0, 3), "wall": round(time.time() - go, 3),
               "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "log": counter, "log_sample": keep}
        print("WORKERS=" + json.dumps(out), flush=True)
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() != "CLOSE":
            os._exit(0)  # STOP: no teardown measured
        # CLOSE: the job ends here. Close the workers that are still running (what the
        # worker role does on SIGTERM), wait for every one (also those the scheduler
        # closed), then end
        await asyncio.gather(*(w.close(reason="dask-mpi-launch: job ending")
                               for w in workers if w.status.name not in ("closing", "closed")),
                             return_exceptions=True)
        await asyncio.gather(*(w.finished() for w in workers), return_exceptions=True)
        os._exit(0)

    asyncio.run(main())
    return 0


# --- child: the launcher's real worker role, forked -----------------------------------------

def child_real(address: str, count: int, index: int, timeout: float, tls_file: str,
               config: dict) -> int:
    """``count`` processes running ``run.run_worker`` unchanged (one worker each, forked
    after the imports as a rank forks its role processes), reporting through its channel."""
    import select

    _be_nice()
    _raise_nofile()
    import dask
    dask.config.set(config)
    from dask_mpi_launch.roles import run
    from dask_mpi_launch.roles.life import Channel
    from dask_mpi_launch.security.credentials import security_from

    credentials = _read_credentials(tls_file)
    settings = _role_settings(credentials)
    print("READY", flush=True)
    go = float(sys.stdin.readline().split()[1])
    pipes: dict[int, tuple[int, float]] = {}
    roles_pids: list[int] = []
    for i in range(count):
        r, w = os.pipe()
        t0 = time.time()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            status = 1
            try:
                status = run.run_worker(settings, Channel(w), address, f"real-{index}-{i}",
                                          1, 0, security=security_from(credentials))
            finally:
                os._exit(status)
        os.close(w)
        pipes[r] = (pid, t0)
        roles_pids.append(pid)
    lat, errors, buffers = [], [], {fd: b"" for fd in pipes}
    while pipes and time.time() < go + timeout:
        ready, _, _ = select.select(list(pipes), [], [], 0.5)
        for fd in ready:
            data = os.read(fd, 65536)
            buffers[fd] += data
            *lines, buffers[fd] = buffers[fd].split(b"\n")
            events = [json.loads(x) for x in lines if x.strip()]
            done = [e for e in events if e.get("event") in ("ready", "error")]
            if done or not data:
                pid, t0 = pipes.pop(fd)
                if done and done[0]["event"] == "ready":
                    lat.append(round(time.time() - t0, 4))
                else:
                    errors.append(done[0].get("message", "?")[:300] if done
                                  else "ended without a word")
    out = {"index": index, "real": True, "started": len(lat), "lat": lat,
           "failed": {"role error": len(errors)} if errors else {},
           "errors": errors[:5], "pending": len(pipes), "cpu": 0.0,
           "wall": round(time.time() - go, 3), "log": {}, "log_sample": errors[:5]}
    print("WORKERS=" + json.dumps(out), flush=True)
    if sys.stdin.readline().strip() == "CLOSE":
        # the job ends: SIGTERM to the role processes still running (as their rank does),
        # then wait for every one (bounded by the parent, which kills the group)
        for pid in roles_pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in roles_pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        return 0
    os.killpg(0, signal.SIGKILL)  # the role processes with us
    return 0


# --- parent: process handling ---------------------------------------------------------------

class Child:
    """A child in its own session; stdout lines pumped into a queue; stderr to a temp file."""

    def __init__(self, argv: list[str], env: dict, cwd: str):
        self.err = tempfile.TemporaryFile("w+")
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.err, text=True, env=env, cwd=cwd,
                                  start_new_session=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.p.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, prefix: str, deadline: float) -> str | None:
        while True:
            left = deadline - time.time()
            if left <= 0:
                return None
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                return None
            if line.startswith(prefix):
                return line[len(prefix):]

    def send(self, text: str) -> None:
        try:
            self.p.stdin.write(text)
            self.p.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    def stderr_tail(self, n: int = 4) -> list[str]:
        try:
            self.err.seek(0)
            return self.err.read().strip().splitlines()[-n:]
        except (OSError, ValueError):
            return []

    def kill(self, grace: float = 0.0) -> None:
        if grace:
            try:
                self.p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.err.close()


_LIVE: list[Child] = []


def _kill_all(*_):
    for c in list(_LIVE):
        c.kill()
    _LIVE.clear()


def split(n: int, parts: int) -> list[int]:
    """N workers over `parts` processes, as even as possible.

    >>> split(1000, 8), split(10, 3)
    ([125, 125, 125, 125, 125, 125, 125, 125], [4, 3, 3])
    """
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def curve_config(n: int, scaled: bool) -> dict:
    """The Dask config the launcher gives every role of an n-worker job (none: Dask's)."""
    if not scaled:
        return {}
    import distributed  # noqa: F401 - its defaults, as in a role process

    import dask_mpi_launch.configure.defaults  # noqa: F401
    from dask_mpi_launch.tuning.scale import for_job
    return for_job(n)


def _reap(child: "Child") -> tuple[bool, float | None]:
    """Whether the child has ended (reaped here), and its CPU seconds if it has."""
    try:
        pid, status, ru = os.wait4(child.p.pid, os.WNOHANG)
    except ChildProcessError:
        return True, None
    if pid == 0:
        return False, None
    child.p.returncode = os.waitstatus_to_exitcode(status)
    return True, ru.ru_utime + ru.ru_stime


def teardown(sched: "Child", workers: list["Child"], order: str, timeout: float) -> dict:
    """The end of the job, from the moment every worker is registered, in ``order``:

    * ``scheduler-first`` (what the launcher does): the scheduler role gets SIGTERM and
      closes (its ``close`` tells every worker to close); once it is gone, the worker
      processes close what is still running;
    * ``workers-first`` (the launcher before): every worker closes itself (the worker
      role's SIGTERM handling), then the scheduler role gets SIGTERM.

    Returns seconds from the job's end until the scheduler process and until every
    process ended, and the scheduler's CPU seconds meanwhile; bounded by ``timeout``
    (then the rest is killed and ``teardown_status`` says so)."""
    t0 = time.time()
    deadline = t0 + timeout
    sched.send("END\n")
    line = sched.expect("ENDCPU=", t0 + 30)
    cpu0 = float(line) if line else None
    ended: dict = {}

    def wait_for(kids: list[Child]) -> bool:
        while time.time() < deadline:
            for c in kids:
                if c not in ended:
                    if c is sched:
                        gone, cpu = _reap(c)
                        if gone:
                            ended[c] = (time.time(), cpu)
                    elif c.p.poll() is not None:
                        ended[c] = (time.time(), None)
            if all(c in ended for c in kids):
                return True
            time.sleep(0.01)
        return False

    def close_workers() -> None:
        for c in workers:
            c.send("CLOSE\n")

    if order == "scheduler-first":
        os.kill(sched.p.pid, signal.SIGTERM)
        ok = wait_for([sched])
        close_workers()
        ok = wait_for(workers) and ok
    else:
        close_workers()
        ok = wait_for(workers)
        os.kill(sched.p.pid, signal.SIGTERM)
        ok = wait_for([sched]) and ok
    phases = {}
    while True:  # what the scheduler printed meanwhile (its pipe is read by a thread)
        try:
            line = sched.lines.get_nowait()
        except queue.Empty:
            break
        if line and line.startswith("PHASE="):
            name, t = line[len("PHASE="):].split()
            phases[name] = round(float(t) - t0, 3)
    out = {"teardown_order": order, "teardown_status": "ok" if ok else "timeout",
           "teardown_phases": phases,
           "t_sched_gone": round(ended[sched][0] - t0, 3) if sched in ended else None,
           "t_all_gone": round(max(t for t, _ in ended.values()) - t0, 3) if ok else None}
    cpu1 = ended.get(sched, (None, None))[1]
    out["cpu_teardown"] = round(cpu1 - cpu0, 3) if None not in (cpu0, cpu1) else None
    return out


def run_trial(n: int, variant: str, config: dict, ramp: float, args, tmp: Path,
              which: str = "ours", order: str | None = None) -> dict:
    py = sys.executable
    me = str(Path(__file__).resolve())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    local_dir = tempfile.mkdtemp(prefix="scratch-", dir=tmp)
    setup_deadline = time.time() + args.setup_timeout
    children: list[Child] = []
    real = min(args.real, n)
    res: dict = {"n": n, "variant": variant, "config": config, "ramp": ramp,
                 "procs": args.procs, "scheduler": which, "tls": bool(args.tls_file),
                 "real": real, "load1": load1()}
    try:
        sched = Child([py, me, "_scheduler", str(n), json.dumps(config), str(args.timeout),
                       str(args.settle), args.tls_file or "-", which], env, str(tmp))
        children.append(sched)
        _LIVE.append(sched)
        event = sched.expect('{"event": ', setup_deadline)  # the role's channel
        event = json.loads('{"event": ' + event) if event else {}
        address = event.get("address")
        if address is None:
            return {**res, "status": "error", "why": "scheduler did not start: "
                    + event.get("message", ""), "stderr": sched.stderr_tail()}
        for i, k in enumerate(split(n - real, args.procs)):
            c = Child([py, me, "_workers", address, str(k), str(i), json.dumps(config),
                       str(args.timeout), str(ramp), local_dir, args.tls_file or "-",
                       "spread" if args.spread else "lo"], env, str(tmp))
            children.append(c)
            _LIVE.append(c)
        if real:
            c = Child([py, me, "_real", address, str(real), "0", str(args.timeout),
                       args.tls_file or "-", json.dumps(config)], env, str(tmp))
            children.append(c)
            _LIVE.append(c)
        for c in children[1:]:
            if c.expect("READY", setup_deadline) is None:
                return {**res, "status": "error", "why": "a worker process did not start",
                        "stderr": c.stderr_tail()}
        go = time.time()
        for c in children:
            c.send(f"GO {go!r}\n")
        done = sched.expect("DONE=", go + args.timeout + args.settle + 30)
        reports = []
        for c in children[1:]:
            r = c.expect("WORKERS=", time.time() + 10)
            reports.append(json.loads(r) if r else None)
        if done is None:
            return {**res, "status": "error", "why": "no report from the scheduler",
                    "stderr": sched.stderr_tail()}
        res.update(json.loads(done))
        res["workers"] = reports
        res["status"] = "ok" if res["connected"] >= n else "timeout"
        if order:
            res.update(teardown(sched, children[1:], order, args.timeout))
        return res
    finally:
        # workers first (SIGKILL: closing them politely is not what we measure), then the
        # scheduler, which may need a moment to write its profile
        for c in children[1:] + children[:1]:
            c.send("STOP\n")
            c.kill(grace=60.0 if c is children[0] and os.environ.get("BENCH_SCALE_PROFILE")
                   else 0.0)
            if c in _LIVE:
                _LIVE.remove(c)


# --- statistics and rendering (pure) ---------------------------------------------------------

def quantile(xs: list[float], q: float) -> float | None:
    """Nearest-rank quantile.

    >>> quantile([1, 2, 3, 4], 0.5), quantile([1, 2, 3, 4], 0.9), quantile([], 0.5)
    (2, 4, None)
    """
    if not xs:
        return None
    xs = sorted(xs)
    return xs[max(0, min(len(xs) - 1, int(-(-q * len(xs) // 1)) - 1))]


def peak_rate(arrivals: list[float], window: float = 1.0) -> float:
    """Most arrivals in any `window` seconds, per second.

    >>> peak_rate([0.0, 0.1, 0.2, 1.5, 1.6])
    3.0
    """
    best, j = 0, 0
    xs = sorted(arrivals)
    for i, x in enumerate(xs):
        while xs[j] < x - window:
            j += 1
        best = max(best, i - j + 1)
    return best / window


def summarize(trial: dict) -> dict:
    """One table row from one trial."""
    n, arr = trial["n"], sorted(trial.get("arrivals") or [])
    reports = [r for r in trial.get("workers") or [] if r]
    lat = [x for r in reports for x in r["lat"]]
    wlog: dict = {}
    for r in reports:
        for k, v in r["log"].items():
            wlog[k] = wlog.get(k, 0) + v
    failed = sum(sum(r["failed"].values()) for r in reports)
    t_all = arr[n - 1] if len(arr) >= n else None
    slog = trial.get("log") or {}
    row = {
        "variant": trial["variant"], "n": n, "status": trial["status"],
        "connected": trial.get("connected"),
        "t50": quantile(arr, 0.5) if len(arr) >= n // 2 else None,
        "t90": arr[int(0.9 * n) - 1] if len(arr) >= int(0.9 * n) and n >= 10 else None,
        "t_first": arr[0] if arr else None,
        "t_all": t_all,
        # registrations per second once they started: the time before the first one is the
        # simulated workers' own construction, serialised in a few processes here but
        # parallel on a cluster
        "rate": round(n / (t_all - arr[0]), 1) if t_all and t_all > arr[0] else None,
        "peak": peak_rate(arr) if arr else None,
        "sched_cpu": round(trial["cpu_reg"] / trial["wall_reg"], 2)
        if trial.get("wall_reg") else None,
        # scheduler CPU per registered worker, and the rate the scheduler alone could sustain
        "sched_ms": round(1e3 * trial["cpu_reg"] / max(1, len(arr)), 2)
        if trial.get("cpu_reg") is not None else None,
        "sched_cap": round(len(arr) / trial["cpu_reg"]) if trial.get("cpu_reg") else None,
        "settle_cpu": round(trial["cpu_settle"] / trial["wall_settle"], 2)
        if trial.get("wall_settle") else None,
        "unresponsive": slog.get("Event loop was unresponsive", 0),
        "unresponsive_max": slog.get("unresponsive_max"),
        "lat50": quantile(lat, 0.5), "lat99": quantile(lat, 0.99),
        "latmax": max(lat) if lat else None,
        "retries": wlog.get("Could not connect", 0) + wlog.get("Waiting to connect", 0),
        "failed": failed, "listen_drops": trial.get("listen_drops"),
        "worker_cpu": round(sum(r["cpu"] for r in reports), 1) if reports else None,
        "sched_rss": trial.get("maxrss_mb"), "load1": trial.get("load1"),
        "sched_fds": trial.get("fds"),
        "worker_rss": max((r.get("maxrss_mb") or 0 for r in reports), default=None),
        "config": trial.get("config") or {},
        "teardown_order": trial.get("teardown_order"),
        "teardown_status": trial.get("teardown_status"),
        "t_sched_gone": trial.get("t_sched_gone"), "t_all_gone": trial.get("t_all_gone"),
        "sched_teardown_cpu": trial.get("cpu_teardown"),
    }
    if trial["status"] != "ok":
        row["why"] = trial.get("why") or f"{trial.get('connected')} of {n} connected"
    return row


def fit_model(model: dict) -> dict | None:
    """Least-squares line through the origin: seconds per version check vs connected workers.

    >>> fit_model({"1000": 0.001, "3000": 0.003})
    {'per_worker_us': 1.0}
    """
    pts = [(int(k), v) for k, v in (model or {}).items()]
    if not pts:
        return None
    slope = sum(x * y for x, y in pts) / sum(x * x for x, _ in pts)
    return {"per_worker_us": round(slope * 1e6, 3)}


def _f(x, digits: int = 2, unit: str = "") -> str:
    """
    >>> _f(None), _f(1.234), _f(3, 0, " s")
    ('–', '1.23', '3 s')
    """
    return "–" if x is None else f"{x:.{digits}f}{unit}"


def table(rows: list[dict], timeout: float) -> list[str]:
    out = ["| variant | workers | status | first s | all s | 50 % s | 90 % s | workers/s "
           "| peak /s "
           "| sched CPU | sched ms/worker | sched-bound /s | unresp. (max s) "
           "| lat p50/p99/max s | retries | SYN drops | failed "
           "| teardown s: scheduler / all (sched CPU s) | sched fds / MB | load |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:"
           "|---|---|---:|"]
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"**{r['status']}** ({r.get('why')})"
        t_all = _f(r["t_all"]) if r["t_all"] else f"> {timeout:g}"
        unresp = str(r["unresponsive"]) + (f" ({r['unresponsive_max']:.1f})"
                                           if r["unresponsive_max"] else "")
        out.append(
            f"| {r['variant']} | {r['n']} | {status} | {_f(r.get('t_first'))} | {t_all} "
            f"| {_f(r['t50'])} "
            f"| {_f(r['t90'])} | {_f(r['rate'], 0)} | {_f(r['peak'], 0)} "
            f"| {_f(r['sched_cpu'])} | {_f(r['sched_ms'])} | {_f(r['sched_cap'], 0)} "
            f"| {unresp} "
            f"| {_f(r['lat50'])} / {_f(r['lat99'])} / {_f(r['latmax'])} "
            f"| {r['retries']} | {'–' if r.get('listen_drops') is None else r['listen_drops']} "
            f"| {r['failed']} | {_teardown(r)} "
            f"| {r.get('sched_fds') or '–'} / {_f(r.get('sched_rss'), 0)} "
            f"| {_f(r['load1'], 1)} |")
    return out


def _teardown(r: dict) -> str:
    """The teardown cell: seconds until the scheduler and every process were gone, and the
    scheduler's CPU meanwhile.

    >>> _teardown({"teardown_order": "scheduler-first", "teardown_status": "ok",
    ...            "t_sched_gone": 0.5, "t_all_gone": 2.25, "sched_teardown_cpu": 0.4})
    '0.50 / 2.25 (0.40)'
    >>> _teardown({"teardown_order": None})
    '–'
    """
    if not r.get("teardown_order"):
        return "–"
    if r.get("teardown_status") != "ok":
        return f"**{r.get('teardown_status')}** ({_f(r.get('t_sched_gone'))} / –)"
    return (f"{_f(r.get('t_sched_gone'))} / {_f(r.get('t_all_gone'))} "
            f"({_f(r.get('sched_teardown_cpu'))})")


def render_markdown(meta: dict, curve: list[dict], knobs: list[dict], model: dict | None,
                    command: str, summary: str, timeout: float) -> str:
    lines = [
        "# Scaling by simulation: one scheduler, many workers",
        "",
        *machine_lines({**meta, "mpi_library": None}, None,
                       (" (1-min average: most of it is the benchmark's own previous "
                        "trial; nothing else should run: see the load column)")),
        f"- kernel: net.core.somaxconn {meta.get('somaxconn')}, "
        f"tcp_max_syn_backlog {meta.get('syn_backlog')}, open files {meta.get('nofile')}",
        f"- command: `{command}`",
        "",
        ("The launcher's scheduler role (`run.run_scheduler`, Dask's defaults otherwise; "
         "variant `ours`: our Scheduler subclass, `upstream`: `distributed.Scheduler`) "
         + ("with TLS (one job's throw-away credentials) " if meta.get("tls") else "")
         + f"and {meta.get('procs')} processes holding simulated workers built with the "
         "worker role's options (its worker class, interface lo, "
         f"{'TLS, ' if meta.get('tls') else ''}nthreads=1, memory_limit=0, no nanny)"
         + (f", plus {meta.get('real')} processes running the launcher's worker role "
            "unchanged (`run.run_worker`, forked after the imports as a rank forks them)"
            if meta.get("real") else "")
         if "tls" in meta else
         "One `distributed.Scheduler` process (Dask defaults) and "
         f"{meta.get('procs')} processes holding the `distributed.Worker` objects (nthreads=1, "
         "no nanny/dashboard, memory_limit=0, 127.0.0.1)")
        + ", all started at once after every "
        "process had imported. Times in seconds from that start. **first**: first "
        "registration (before it, the simulated workers are being constructed, serialised in "
        "a few processes here, parallel on a cluster); **all/50 %/90 %**: until the "
        "scheduler had registered that share of the workers; **workers/s** = workers / "
        "(all − first); **peak**: best 1-s window; **sched CPU**: scheduler CPU s per wall s during "
        "the registration (1.00 = one core busy); **sched ms/worker**: scheduler CPU during "
        "the registration per worker (heartbeats of the registered ones included); "
        "**sched-bound /s** = 1000 / that: the rate the scheduler alone could sustain if "
        "workers arrived as fast as it takes them; **unresp.**: the scheduler's \"Event "
        "loop was unresponsive\" warnings (longest stall); **lat**: each worker's own "
        "`await Worker()`; **retries**: worker-side connect retries (\"Could not connect\", "
        "\"Waiting to connect\"); **SYN drops**: the kernel's ListenDrops counter during the "
        "registration (connects dropped, mostly because an accept queue was full; "
        "machine-wide); **failed**: workers not started within the "
        f"{timeout:g}-s bound; **sched fds / MB**: the scheduler's open descriptors once "
        "all are registered and its peak memory; **teardown**: once all are registered "
        "the job ends "
        "(`scheduler-first`: the scheduler role gets SIGTERM, then the workers still "
        "running are closed, the launcher's order; `workers-first`: every worker closes "
        "as on its role's SIGTERM, then the scheduler): seconds until the scheduler "
        "process and until every process is gone, and the scheduler's CPU seconds "
        "meanwhile; **load**: 1-min load average at the trial's start. The "
        "worker processes run at nice 10 with per-worker background timers off (profiler, "
        "20-ms tick, system monitor, GIL monitor) and a local directory each, so hundreds "
        "fit in one process; still, workers and scheduler share 2 cores, so wall times are "
        "pessimistic for a real cluster, while the scheduler's CPU per worker carries over."
        + (" Every process of the curve has the launcher's defaults for the job's size "
           "(`scale.for_job(N)`: socket backlog, connect timeouts; the kernel caps the "
           "backlog at somaxconn)." if meta.get("scaled") else "")
        + (" Each process of simulated workers listens on a loopback address of its own "
           "(127.0.1.K), like a host, so their listening ports leave 127.0.0.1's "
           "ephemeral ports to the connections to the scheduler." if meta.get("spread")
           else ""),
        "",
        "## Summary",
        "",
        summary,
        "",
        "## Registration vs number of workers",
        "",
        *table(curve, timeout),
        "",
    ]
    if knobs:
        lines += [f"## Settings at {knobs[0]['n']} workers", "",
                  "Each variant applied in every process (scheduler and workers); "
                  "`ramp=S`: the workers' starts spread uniformly over S s (a launcher-side "
                  "stagger, not a Dask setting).", "", *table(knobs, timeout), ""]
    upstream, ours = model_parts(model)
    if upstream:
        fit = fit_model(upstream)
        lines += ["## Scheduler-side cost model", "",
                  "`Scheduler.add_worker` compares the new worker's package versions with "
                  "those of every connected worker (`distributed.versions.error_message` "
                  "over `{w: ws.versions for w, ws in self.workers.items()}`, each worker's "
                  "versions a separate dict as the scheduler holds them); ours "
                  "(`dask_mpi_launch/scheduler.py`) passes one representative per "
                  "distinct version set. Timed alone (CPU time), per registration:", "",
                  "| connected workers | upstream ms | ours ms |", "|---:|---:|---:|"]
        lines += [f"| {int(k):,} | {v * 1e3:.2f} | "
                  f"{_f(ours[k] * 1e3, 3) if k in ours else '–'} |" for k, v in upstream.items()]
        if fit:
            lines += ["", f"Fit: {fit['per_worker_us']:.2f} µs per connected worker, "
                      "so a burst of N workers spends "
                      f"≈ {fit['per_worker_us'] / 2:.2f} µs × N² of scheduler CPU in this "
                      "check alone: " + ", ".join(
                          f"{n:,} workers {version_cost(fit, n):.1f} s"
                          for n in (1300, 3000, 10000, 30000)) + "."]
        lines.append("")
    return "\n".join(lines)


def version_cost(fit: dict, n: int) -> float:
    """Scheduler seconds spent in version checks while n workers register (sum over k < n).

    >>> version_cost({"per_worker_us": 1.0}, 1000)
    0.5
    """
    return fit["per_worker_us"] * 1e-6 * n * n / 2


def representatives(rows: list[dict]) -> list[dict]:
    """One row per worker count, the one with the median time (repeats), sorted by count.

    >>> rs = [{"n": 2, "t_all": 3.0}, {"n": 1, "t_all": 1.0}, {"n": 2, "t_all": 1.0},
    ...       {"n": 2, "t_all": 2.0}]
    >>> [(r["n"], r["t_all"]) for r in representatives(rs)]
    [(1, 1.0), (2, 2.0)]
    """
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["n"], []).append(r)
    return [sorted(g, key=lambda r: r["t_all"])[(len(g) - 1) // 2]
            for _, g in sorted(groups.items())]


def by_variant(rows: list[dict]) -> dict[str, dict]:
    """Median over the repeats of each variant (worst status, most failures).

    >>> r = {"variant": "a", "n": 9, "status": "ok", "t_all": 1.0, "retries": 0, "failed": 0,
    ...      "lat50": 1.0, "lat99": 1.0, "load1": 2.0, "sched_ms": 1.0}
    >>> by_variant([r, dict(r, t_all=3.0, retries=10)])["a"]["t_all"]
    2.0
    """
    import statistics
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["variant"], []).append(r)
    out = {}
    for name, rs in groups.items():
        def med(key):
            xs = [r[key] for r in rs if r.get(key) is not None]
            return statistics.median(xs) if xs else None
        ok = all(r["status"] == "ok" for r in rs)
        out[name] = {"variant": name, "n": rs[0]["n"], "runs": len(rs),
                     "status": "ok" if ok else "timeout",
                     "why": next((r.get("why") for r in rs if r["status"] != "ok"), None),
                     "t_all": med("t_all") if ok else None,
                     "t_min": min((r["t_all"] for r in rs if r.get("t_all")), default=None),
                     "t_max": max((r["t_all"] for r in rs if r.get("t_all")), default=None),
                     "retries": med("retries"), "failed": max(r["failed"] for r in rs),
                     "listen_drops": med("listen_drops"),
                     "lat50": med("lat50"), "lat99": med("lat99"), "load1": med("load1"),
                     "sched_ms": med("sched_ms")}
    return out


def _changed(v: dict, base: dict) -> list[str]:
    """What a settings variant changed against the defaults, beyond the noise.

    Wall time counts only outside 30 % and outside the defaults' own min-max; retries only
    when they differ by more than 10 and 20 %.
    >>> b = {"t_all": 10.0, "t_min": 9.0, "t_max": 12.0, "retries": 0, "failed": 0,
    ...      "lat50": 5.0, "status": "ok"}
    >>> _changed(dict(b, t_all=11.0), b)
    []
    >>> _changed(dict(b, t_all=15.0, retries=900), b)
    ['all 15.0 s vs 10.0 s', '900 connect retries vs 0']
    """
    if v["status"] != "ok":
        return [f"{v['status']} ({v.get('why')})"]
    out = []
    t, tb = v["t_all"], base["t_all"]
    lo, hi = min(tb * 0.7, base.get("t_min") or tb), max(tb * 1.3, base.get("t_max") or tb)
    if t is not None and tb and not lo <= t <= hi:
        out.append(f"all {t:.1f} s vs {tb:.1f} s")
    if abs(v["retries"] - base["retries"]) > max(10, 0.2 * base["retries"]):
        out.append(f"{v['retries']:.0f} connect retries vs {base['retries']:.0f}")
    d, db = v.get("listen_drops") or 0, base.get("listen_drops") or 0
    if d > max(10, 2 * db):
        out.append(f"{d:.0f} connects dropped by the kernel vs {db:.0f}")
    if v["failed"] > base["failed"]:
        out.append(f"{v['failed']} failed workers")
    if v.get("lat50") and base.get("lat50") and v["lat50"] < 0.5 * base["lat50"]:
        out.append(f"median worker start {v['lat50']:.1f} s vs {base['lat50']:.1f} s")
    return out


def model_parts(model: dict | None) -> tuple[dict, dict]:
    """(upstream, ours) seconds per version check by connected workers; older results
    held upstream's only.

    >>> model_parts({"1000": 0.5})
    ({'1000': 0.5}, {})
    >>> model_parts({"upstream": {"1000": 0.5}, "ours": {"1000": 0.1}})
    ({'1000': 0.5}, {'1000': 0.1})
    """
    if not model:
        return {}, {}
    if "upstream" in model:
        return model.get("upstream") or {}, model.get("ours") or {}
    return model, {}


def bend(rows: list[dict], factor: float = 2.0) -> dict | None:
    """The first row whose scheduler CPU per registration exceeds ``factor`` × the
    smallest size's: where the per-registration cost stops being flat.

    >>> bend([{"n": 1000, "sched_ms": 2.0}, {"n": 3000, "sched_ms": 3.0},
    ...       {"n": 10000, "sched_ms": 4.5}])["n"]
    10000
    >>> bend([{"n": 1000, "sched_ms": 2.0}, {"n": 3000, "sched_ms": 3.0}]) is None
    True
    """
    pts = [r for r in rows if r.get("sched_ms")]
    if len(pts) < 2:
        return None
    return next((r for r in pts[1:] if r["sched_ms"] > factor * pts[0]["sched_ms"]), None)


def _variant_sentences(ok: list[dict], curve: list[dict], label: str) -> list[str]:
    out = []
    best = max(r["rate"] for r in ok)
    falls = next((r for r in ok if r["rate"] < 0.6 * best), None)
    retried = next((r for r in ok if r["retries"]), None)
    failed = sum(r["failed"] for r in curve)
    worst = min(r["rate"] for r in ok)
    s2 = (f"{label}once registrations start, throughput falls from {best:.0f} to "
          f"{ok[-1]['rate']:.0f} workers/s" if falls else
          f"{label}once registrations start, throughput stays at {worst:.0f}–{best:.0f} "
          "workers/s")
    if retried:
        s2 += f"; connect retries appear at {retried['n']:,} workers ({retried['retries']:,}"
        drops = retried.get("listen_drops")
        s2 += (f", with {drops:,} connects dropped by the kernel: the scheduler's accept queue "
               "overflowed)" if drops else ")")
    else:
        s2 += "; no worker needed a connect retry"
    s2 += (f", and {failed} workers failed." if failed else
           (", yet no worker failed: none of them hit a timeout." if retried else
            " and none failed."))
    out.append(s2[0].upper() + s2[1:])
    ms = [r for r in ok if r.get("sched_ms")]
    if len(ms) >= 2:
        b = bend(ms)
        ratio = ms[-1]["sched_ms"] / ms[0]["sched_ms"]
        sent = (f"The scheduler's CPU per registration is {ms[0]['sched_ms']:.1f} ms at "
                f"{ms[0]['n']:,} workers and {ms[-1]['sched_ms']:.1f} ms at {ms[-1]['n']:,} "
                f"({ratio:.1f}×: " + ("flat within 2×" if b is None else
                                      f"beyond 2× from {b['n']:,} workers") + ")")
        out.append(f"{label}{sent[0].lower()}{sent[1:]}." if label else sent + ".")
    return out


def write_summary(curve: list[dict], knobs: list[dict], model: dict | None,
                  meta: dict) -> str:
    """The README-style paragraph ("Scaling"), from the numbers."""
    groups: dict[str, list[dict]] = {}
    for r in curve:
        groups.setdefault(r["variant"], []).append(r)
    dist = meta.get("packages", {}).get("distributed", "?")
    loads = [r["load1"] for r in curve + knobs if r.get("load1") is not None]
    where = (f" on a {meta.get('cores')}-core machine that also ran every simulated worker"
             + (f" and other jobs (load average {min(loads):.0f}–{max(loads):.0f})." if loads
                else "."))
    out = []
    for variant, rows in groups.items():
        ok = representatives([r for r in rows if r["status"] == "ok" and r["t_all"]])
        label = f"`{variant}`: " if len(groups) > 1 else ""
        bad = [r for r in rows if r["status"] != "ok"]
        if not ok:
            out.append(f"{label}no trial completed ({bad[0].get('why') if bad else '?'}).")
            continue
        first = (f"{label}one scheduler registered a simultaneous start of " if label else
                 f"With Dask's defaults (distributed {dist}) one scheduler registered a "
                 "simultaneous start of ")
        out.append(first + ", ".join(f"{r['n']:,} workers in {r['t_all']:.1f} s" for r in ok)
                   + (f"; {', '.join(str(r['n']) for r in bad)} workers did not all register "
                      "within the bound" if bad else "") + (where if not out else "."))
        out += _variant_sentences(ok, rows, label)
    upstream, ours = model_parts(model)
    fit = fit_model(upstream)
    if fit:
        sent = ("Upstream, each registration compares package versions with every connected "
                f"worker ({fit['per_worker_us']:.1f} µs each): quadratic, "
                f"≈{version_cost(fit, 10000):.0f} s of scheduler CPU for a burst of 10,000 "
                f"workers and ≈{version_cost(fit, 30000) / 60:.0f} min for 30,000")
        if ours:
            n = max(ours, key=int)
            sent += (f"; our scheduler role compares each distinct set of versions once: "
                     f"{ours[n] * 1e3:.3f} ms per registration at {int(n):,} connected "
                     f"workers instead of {upstream.get(n, 0) * 1e3:.1f} ms")
        out.append(sent + ".")
    if knobs:
        agg = by_variant(knobs)
        base = agg.get("default")
        if base is None:
            base = next(iter(by_variant([r for r in curve if r["n"] == knobs[0]["n"]])
                             .values()), None)
        if base and base.get("t_all"):
            effects, none = [], []
            for name, v in agg.items():
                if name == "default":
                    continue
                ch = _changed(v, base)
                (effects.append(f"`{name}` {', '.join(ch)}") if ch else none.append(f"`{name}`"))
            sent = f"At {knobs[0]['n']:,} workers (defaults: {base['t_all']:.1f} s"
            sent += (f", {base['retries']:.0f} retries)" if base["retries"] else
                     ", no retries)")
            if effects:
                sent += ": " + "; ".join(effects)
            if none:
                sent += ("; " if effects else ": ") + ", ".join(none) + \
                    " changed nothing beyond the machine's noise"
            out.append(sent + ".")
    return " ".join(out)


def plot(curve_trials: list[dict], knob_trials: list[dict], rows: list[dict],
         path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib does not import"
    fig, axes = plt.subplots(1, 3 if knob_trials else 2, figsize=(15 if knob_trials else 10, 4.3))
    ax = axes[0]
    for t in curve_trials:
        arr = sorted(t.get("arrivals") or [])
        if arr:
            ax.plot(arr, range(1, len(arr) + 1), label=f"{t['n']} workers")
    ax.set_xlabel("s since start")
    ax.set_ylabel("workers registered")
    ax.set_title("defaults")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    pts = sorted((r["n"], r["rate"], r["sched_cap"], r["sched_ms"]) for r in rows
                 if r["rate"] and r["sched_cap"])
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="measured workers/s")
        ax.plot([p[0] for p in pts], [p[2] for p in pts], "^-",
                label="scheduler-bound /s (1 / CPU per worker)")
        ax.set_xlabel("workers")
        ax.set_ylabel("registrations / s")
        ax.set_ylim(bottom=0)
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in pts], [p[3] for p in pts], "s--", color="gray",
                 label="scheduler ms / worker")
        ax2.set_ylabel("scheduler CPU ms per worker")
        ax2.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.set_title("throughput vs size (defaults)")
        ax.legend(loc="upper right", fontsize=7)
        ax2.legend(loc="center right", fontsize=7)
    if knob_trials:
        ax = axes[2]
        for t in knob_trials:
            arr = sorted(t.get("arrivals") or [])
            if arr:
                ax.plot(arr, range(1, len(arr) + 1), label=t["variant"])
        ax.set_xlabel("s since start")
        ax.set_ylabel("workers registered")
        ax.set_title(f"settings at {knob_trials[0]['n']} workers")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written: {path}"


def _read_int(path: str) -> str:
    try:
        return Path(path).read_text().split()[0]
    except (OSError, IndexError):
        return "?"


def parse_variant(spec: str) -> tuple[dict, float]:
    """A --sweep entry: a name of SWEEP, ``ramp=SECONDS`` or ``dask.key=value``, or several
    joined by ``+``.

    >>> parse_variant("backlog=128")
    ({'distributed.comm.socket-backlog': 128}, 0.0)
    >>> parse_variant("backlog=16")
    ({'distributed.comm.socket-backlog': 16}, 0.0)
    >>> parse_variant("ramp=2s")
    ({}, 2.0)
    >>> parse_variant("distributed.comm.timeouts.connect=10s")
    ({'distributed.comm.timeouts.connect': '10s'}, 0.0)
    >>> parse_variant("backlog=128+connect=5s+ramp=1")
    ({'distributed.comm.socket-backlog': 128, 'distributed.comm.timeouts.connect': '5s'}, 1.0)
    """
    if "+" in spec:
        config, ramp = {}, 0.0
        for part in spec.split("+"):
            c, r = parse_variant(part)
            config.update(c)
            ramp = max(ramp, r)
        return config, ramp
    if spec.startswith("ramp="):
        return {}, float(spec.split("=", 1)[1].rstrip("s"))
    if spec in SWEEP:
        return dict(SWEEP[spec]), 0.0
    key, sep, value = spec.partition("=")
    if not sep or ("." not in key and key not in ALIASES):
        raise argparse.ArgumentTypeError(f"not a variant: {spec!r}")
    try:
        val = json.loads(value)
    except json.JSONDecodeError:
        val = value
    return {k: val for k in ALIASES.get(key, [key])}, 0.0


# --- main -----------------------------------------------------------------------------------

def rerender(path: Path, out: Path) -> int:
    """Summary, markdown and plot again from a scale.json (after changing the rendering)."""
    d = json.loads(path.read_text())
    trials = d["trials"]
    curve_trials, knob_trials = trials[:len(d["curve"])], trials[len(d["curve"]):]
    curve = [summarize(t) for t in curve_trials]
    knobs = [summarize(t) for t in knob_trials]
    summary = write_summary(curve, knobs, d.get("model"), d["meta"])
    md = render_markdown(d["meta"], curve, knobs, d.get("model"), d["command"], summary,
                         float(d["args"]["timeout"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.md").write_text(md)
    d.update(curve=curve, knobs=knobs, summary=summary)
    (out / "scale.json").write_text(json.dumps(d, indent=1) + "\n")
    print(md)
    print(plot(curve_trials, knob_trials, curve, out / "scale.png"))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_scheduler":
        return child_scheduler(int(argv[1]), json.loads(argv[2]), float(argv[3]), float(argv[4]),
                               argv[5], argv[6])
    if argv and argv[0] == "_real":
        return child_real(argv[1], int(argv[2]), int(argv[3]), float(argv[4]), argv[5],
                          json.loads(argv[6]))
    if argv and argv[0] == "_model":
        return child_model([int(x) for x in argv[1:]])
    if argv and argv[0] == "_workers":
        return child_workers(argv[1], int(argv[2]), int(argv[3]), json.loads(argv[4]),
                             float(argv[5]), float(argv[6]), argv[7], argv[8],
                             argv[9] == "spread")
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
    if args.from_json:
        return rerender(args.from_json, args.out)
    try:
        variants = {v: parse_variant(v) for v in args.sweep}
    except argparse.ArgumentTypeError as e:
        ap.error(f"--sweep: {e}")
    at = args.at or max(args.workers)
    if "scaled" in variants:
        import distributed  # noqa: F401 - its defaults, as in a role process

        import dask_mpi_launch.configure.defaults  # noqa: F401
        from dask_mpi_launch.tuning.scale import for_job
        variants["scaled"] = (for_job(at), 0.0)
        print(f"scaled for {at} workers: {variants['scaled'][0]}", file=sys.stderr)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, f: (_kill_all(), sys.exit(128 + s)))
    meta = machine_facts(args.venv.absolute())
    meta.update(procs=args.procs, somaxconn=_read_int("/proc/sys/net/core/somaxconn"),
                syn_backlog=_read_int("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
                nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    command = " ".join([Path(sys.argv[0]).name, *argv])
    curve_trials, knob_trials = [], []

    def show(t: dict) -> None:
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

    meta.update(tls=args.tls, real=args.real, scaled=args.scaled, spread=args.spread)
    proto = "tls" if args.tls else "tcp"
    with tempfile.TemporaryDirectory(prefix="dml-bench-scale-") as tmp:  # 0700, ours
        args.tls_file = None
        if args.tls:  # one job's credentials, 0600, read by every child
            from dask_mpi_launch.security.credentials import new_credentials
            args.tls_file = str(Path(tmp) / "credentials.json")
            fd = os.open(args.tls_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(new_credentials(), f)
        try:
            print(f"curve: {args.workers} workers over {args.procs} processes "
                  f"(+{args.real} real worker roles), {proto}, scheduler {args.scheduler}",
                  file=sys.stderr)
            for rep in range(args.curve_repeat):
                combos = [(which, order) for which in args.scheduler
                          for order in (args.teardown or [None])]
                for n in args.workers:
                    for which, order in (combos if (rep + n) % 2 == 0 else combos[::-1]):
                        name = f"{proto} {which}" + (f" {order}" if len(args.teardown) > 1
                                                      else "")
                        t = run_trial(n, name, curve_config(n, args.scaled), 0.0, args,
                                      Path(tmp), which, order)
                        t["rep"] = rep
                        curve_trials.append(t)
                        show(t)
            if variants:
                print(f"settings at {at} workers: {list(variants)}", file=sys.stderr)
            for rep in range(args.repeat):
                order = list(variants.items())
                if rep % 2:
                    order.reverse()  # A B C, C B A, ...: load drift cancels out in medians
                for name, (config, ramp) in order:
                    t = run_trial(at, name, config, ramp, args, Path(tmp),
                                  args.scheduler[0], (args.teardown or [None])[0])
                    t["rep"] = rep
                    knob_trials.append(t)
                    show(t)
        finally:
            _kill_all()

    model = None
    if args.model_sizes:
        raw = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_model",
                              *map(str, args.model_sizes)], capture_output=True, text=True,
                             timeout=120, start_new_session=True)
        line = next((x for x in raw.stdout.splitlines() if x.startswith("MODEL=")), None)
        model = json.loads(line[len("MODEL="):]) if line else None
        print(f"cost model: {model}", file=sys.stderr)
    meta["load_end"] = _load()
    curve = [summarize(t) for t in curve_trials]
    knobs = [summarize(t) for t in knob_trials]
    summary = write_summary(curve, knobs, model, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    md = render_markdown(meta, curve, knobs, model, command, summary, args.timeout)
    (args.out / "scale.md").write_text(md)
    (args.out / "scale.json").write_text(json.dumps(
        {"meta": meta, "command": command,
         "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
         "curve": curve, "knobs": knobs, "model": model, "summary": summary,
         "trials": curve_trials + knob_trials}, indent=1) + "\n")
    note = plot(curve_trials, knob_trials, curve, args.out / "scale.png")
    print(md)
    print(f"wrote {args.out / 'scale.md'}, {args.out / 'scale.json'}; {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
