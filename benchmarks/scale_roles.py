"""scale.py's child processes: the launcher's scheduler role, processes of simulated workers,
the launcher's real worker role (forked), and the version-check cost model.

Each runs as ``python scale.py _scheduler|_workers|_real|_model ...`` (see ``run_child``): the
parent starts it, it reports READY, waits for GO on stdin, then reports on stdout.

This is where scale.py imports dask-mpi-launch's internals: it measures the launcher's own
scheduler and worker roles (``roles.run``, reporting on ``roles.life.Channel``, with the settings
``configure.settings.resolve`` gives them and the job's TLS from ``security.credentials``), its
Scheduler's version index and heap freezer (``tuning.scheduler``) and its defaults for a job's
size (``tuning.scale.for_job``), and the job's credentials the parent writes (``write_credentials``).
They are imported inside the functions that use them, at the point the
old single file did: after the child has set its Dask config and nice value, and each process
imports only what its role imports (the launcher's defaults, ``configure.defaults``, only where
a curve point or variant asks for them).
"""
from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# the scheduler role's preload: times the registrations (scale_preload.dask_setup)
PRELOAD = str(Path(__file__).resolve().parent / "scale_preload.py")

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
    TLS from the job's credentials, interface lo); scale_preload.py is its preload, which
    times the registrations (``dask_setup`` there).  ``which="upstream"``: the same role with
    ``distributed.Scheduler`` instead of ours, for comparison."""
    import dask
    dask.config.set({**config, "distributed.scheduler.preload": [PRELOAD]})
    _raise_nofile()
    os.environ.update(BENCH_SCALE_EXPECT=str(expect), BENCH_SCALE_TIMEOUT=str(timeout),
                      BENCH_SCALE_SETTLE=str(settle))
    import distributed

    # the launcher's scheduler role as it runs in a job (run_scheduler, reporting its address
    # on its Channel); tuning.scheduler holds the Scheduler class it runs (swapped for upstream's)
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


def _read_credentials(path: str) -> dict | None:
    return json.loads(Path(path).read_text()) if path and path != "-" else None


def _role_settings(credentials):
    """The launcher's settings for these roles: its defaults, loopback, no dashboard."""
    from dask_mpi_launch.configure.settings import resolve  # the settings a job's roles get
    return resolve(interface="lo", dashboard=False, tls=bool(credentials), nthreads=1,
                   memory_limit="0")


def child_model(sizes: list[int]) -> int:
    import copy

    from distributed.versions import error_message, get_versions
    from sortedcontainers import SortedDict

    from dask_mpi_launch.tuning.scheduler import VersionIndex  # our scheduler's version check

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

    # the heap freezer our roles use, so that hundreds of workers in one process do not make
    # every full collection walk all of them; the job's TLS as the worker role builds it
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


def child_real(address: str, count: int, index: int, timeout: float, tls_file: str,
               config: dict) -> int:
    """``count`` processes running ``run.run_worker`` unchanged (one worker each, forked
    after the imports as a rank forks its role processes), reporting through its channel."""
    _be_nice()
    _raise_nofile()
    import dask
    dask.config.set(config)
    # the launcher's worker role, its channel and the job's TLS: what scale.py measures
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
    lat, errors = _await_roles(pipes, go + timeout)
    out = {"index": index, "real": True, "started": len(lat), "lat": lat,
           "failed": {"role error": len(errors)} if errors else {},
           "errors": errors[:5], "pending": len(pipes), "cpu": 0.0,
           "wall": round(time.time() - go, 3), "log": {}, "log_sample": errors[:5]}
    print("WORKERS=" + json.dumps(out), flush=True)
    if sys.stdin.readline().strip() == "CLOSE":
        _end_roles(roles_pids)
        return 0
    os.killpg(0, signal.SIGKILL)  # the role processes with us
    return 0


def _await_roles(pipes: dict[int, tuple[int, float]], deadline: float
                 ) -> tuple[list[float], list[str]]:
    """Read the roles' channels until each said ready or error (or closed), or the deadline:
    each ready role's seconds from its fork, and the errors. ``pipes`` keeps the silent ones."""
    import select

    lat, errors, buffers = [], [], {fd: b"" for fd in pipes}
    while pipes and time.time() < deadline:
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
    return lat, errors


def _end_roles(roles_pids: list[int]) -> None:
    """The job ends: SIGTERM to the role processes still running (as their rank does), then
    wait for every one (bounded by the parent, which kills the group)."""
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


def curve_config(n: int, scaled: bool) -> dict:
    """The Dask config the launcher gives every role of an n-worker job (none: Dask's)."""
    if not scaled:
        return {}
    import distributed  # noqa: F401 - its defaults, as in a role process

    import dask_mpi_launch.configure.defaults  # noqa: F401 - the launcher's defaults, as a role has
    from dask_mpi_launch.tuning.scale import for_job  # its settings for an n-worker job
    return for_job(n)


def write_credentials(tmp: str) -> str:
    """One job's credentials (the launcher's own, as a job's roles get them), 0600 in our 0700
    directory, read by every child."""
    from dask_mpi_launch.security.credentials import new_credentials
    path = str(Path(tmp) / "credentials.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(new_credentials(), f)
    return path


def run_child(argv: list[str]) -> int | None:
    """``python scale.py _scheduler|_real|_model|_workers ...``: run that child and return its
    exit status; None when ``argv`` names no child (the parent's command line)."""
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
    return None
