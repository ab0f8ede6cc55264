"""What each role process runs: the scheduler, a worker, the client script.

One implementation for the CLI and for ``initialize()``. Each role has the same shape:
start, report through the channel, wait for "finished" or "signal" (whichever comes
first), stop. Roles run in processes started for the rank (``process/children.py``, ``process/zygote.py``);
:func:`run_role` is their one entry point, with a plain-data ``spec`` of what to run.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import signal
import sys

from dask_mpi_launch.roles.life import RESTART_REASON, Channel  # noqa: F401 (RESTART_REASON: tuning.scheduler)
from dask_mpi_launch.base.status import PREFIX, exit_status
from dask_mpi_launch.configure.settings import Settings


def _quiet(level: str) -> None:
    os.environ["DASK_LOGGING__DISTRIBUTED"] = level  # for processes a Nanny spawns
    numeric = getattr(logging, level.upper())
    logging.getLogger("distributed").setLevel(numeric)
    for name in ("tornado", "asyncio"):
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    # bokeh warns at every start that the dashboard accepts any Host header
    logging.getLogger("bokeh").setLevel(max(numeric, logging.ERROR))


def stop_within(seconds: float) -> None:
    """Once asked to stop, a role process ends within ``seconds`` even if its rank is gone
    (SIGALRM's default action ends the process)."""
    signal.alarm(max(1, int(seconds + 0.999)))


async def _until_finished_or_signal(server, grace: float) -> str:
    """Wait until the server finishes by itself or SIGTERM/SIGINT arrives."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal():
        stop_within(grace)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    finished = asyncio.ensure_future(server.finished())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({finished, stopped}, return_when=asyncio.FIRST_COMPLETED)
    for signum in (signal.SIGTERM, signal.SIGINT):  # a second signal changes nothing
        loop.add_signal_handler(signum, lambda: None)
    stopped.cancel()
    return "finished" if finished.done() else "signal"


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; the new soft limit.

    A scheduler holds two connections per worker (its stream and the pool the heartbeats
    use): 10,000 workers need ~20,000 descriptors, while sites often leave the soft limit
    at 1,024 or 4,096 under a much higher hard one; a worker exchanging data with many
    peers needs one per peer. Past the soft limit ``accept`` fails (EMFILE) and workers
    retry until they time out."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20  # Linux's nr_open
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def run_role(role: str, spec, channel: Channel) -> int:
    """Run the role ``spec`` describes (a ``RoleSpec``: what it ``runs`` is scheduler,
    worker, script or jupyter); its status."""
    from dask_mpi_launch.roles.life import set_title
    from dask_mpi_launch.security.credentials import security_from
    from dask_mpi_launch.tuning.idle import apply_hpc_defaults

    run = spec.runs
    set_title(f"dml-{run}")
    if run in ("scheduler", "worker"):
        raise_open_files_limit()  # a connection per worker / per peer (10,000+ at scale)
    apply_hpc_defaults()  # quiet when idle, where the user has not chosen (tuning/idle.py)
    if spec.dask_config:  # big jobs (tuning/scale.py); a user's own config was left alone
        import dask.config

        dask.config.set(spec.dask_config)
    s = spec.settings
    from dask_mpi_launch.hpc.time_limit import export
    from dask_mpi_launch.roles.life import JOINED

    export(getattr(s, "end", None))  # dask_mpi_launch.time_left() in the role and its tasks

    JOINED["client"] = run in ("script", "jupyter")  # initialize() here returns at once
    if run == "scheduler":
        credentials = None
        if spec.new_credentials:  # this job's, made here (the rank never imports
            from dask_mpi_launch.base.errors import LaunchError  # cryptography), told to the rank with the address
            from dask_mpi_launch.security.credentials import new_credentials

            try:
                credentials = new_credentials()
            except LaunchError as e:
                channel.error(e.message)
                return e.status
        return run_scheduler(s, channel, credentials=credentials, record=spec.log)
    security = security_from(spec.credentials)
    if run == "worker":
        return run_worker(s, channel, spec.address, spec.name, spec.nthreads,
                          spec.memory_limit, security=security,
                          scheduler_info=spec.scheduler_info, record=spec.log)
    if run == "script":
        return run_script(s, channel, spec.address, spec.credentials)
    if run == "jupyter":
        from dask_mpi_launch.roles.jupyter import run_jupyter

        return run_jupyter(s, channel, spec.address, spec.credentials, spec.scheduler_info)
    raise ValueError(f"unknown role {run!r}")


def run_check(what: str, value) -> str | None:
    """Checks that need ``distributed`` (done where it is imported): the error, or None."""
    from dask_mpi_launch.base.errors import LaunchError
    from dask_mpi_launch.configure.settings import check_worker_class

    try:
        if what == "worker-class":
            check_worker_class(value)
        else:
            raise ValueError(f"unknown check {what!r}")
    except LaunchError as e:
        return e.message
    return None


# ---------------------------------------------------------------------------
# scheduler


def scheduler_start_error(settings: Settings, e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return (
            f"the scheduler cannot listen on port {settings.scheduler_port}: it is already in use "
            "(choose another --scheduler-port, or 0 for a free one)"
        )
    if e.errno == errno.EADDRNOTAVAIL:
        return f"the scheduler cannot listen on the address asked for: {e.strerror or e}"
    return f"the scheduler could not start: {e}"


def run_scheduler(settings: Settings, channel: Channel, security=None,
                  credentials=None, record=None) -> int:
    """The scheduler, with ``security`` or this job's ``credentials`` (TLS; both None:
    plain TCP), which go to the rank with its address through the role's pipe (the rank
    passes them on to the other ranks)."""
    from dask_mpi_launch.tuning.scheduler import Scheduler  # registration in O(1): see tuning/scheduler.py

    if credentials is not None:
        from dask_mpi_launch.security.credentials import security_from

        security = security_from(credentials)

    _quiet(settings.log_level)

    import warnings

    # without the dashboard, the scheduler's HTTP server (health, metrics) takes a free port
    http_address = settings.dashboard_address if settings.dashboard else ":0"
    # a busy dashboard port: Dask takes another one; we say so in one line, below
    warnings.filterwarnings("ignore", message="Port .* is already in use")

    async def main() -> int:
        scheduler = Scheduler(
            port=settings.scheduler_port,
            interface=settings.interface,
            protocol=settings.door_protocol,
            dashboard=settings.dashboard,
            dashboard_address=http_address,
            security=security,
        )
        # at the end the workers leave first, within half the grace (tuning/scheduler.py)
        scheduler.leave_timeout = settings.shutdown_timeout / 2
        try:
            await scheduler
        except OSError as e:
            channel.error(scheduler_start_error(settings, e))
            return 1
        except Exception as e:
            cause = e.__cause__ if isinstance(e.__cause__, OSError) else None
            if cause is not None:
                channel.error(scheduler_start_error(settings, cause))
            else:
                channel.error(f"the scheduler could not start: {type(e).__name__}: {e}")
            return 1
        report = None
        if record and settings.record_report:  # report.html as it closes (roles/record_output.py)
            from dask_mpi_launch.roles.record_output import Report

            report = Report(scheduler, os.path.join(os.path.dirname(record), "report.html"),
                   settings.shutdown_timeout / 2)
        asked = http_address.rsplit(":", 1)[-1]
        served = scheduler.http_server.port if scheduler.http_server else None
        link = _dashboard_link(scheduler, served) if settings.dashboard else None
        if link and asked not in ("", "0") and str(served) != asked:
            print(f"{PREFIX}: dashboard port {asked} is busy (another cluster on this "
                  f"host?): the dashboard is at {link}", file=sys.stderr, flush=True)
        from dask_mpi_launch.roles import diagnose  # what the rank sends with the address (psutil is here)

        channel.send("address", address=scheduler.address, identity=scheduler.identity(),
                     dashboard=link, credentials=credentials,
                     interfaces=diagnose.local_interfaces(),
                     network=diagnose.network_identity())
        how = await _until_finished_or_signal(scheduler, settings.shutdown_timeout)
        if how == "signal":
            if report is not None:
                await report.write()  # while the workers are there
            await scheduler.close(reason="dask-mpi-launch: job ending")
        return 0

    return asyncio.run(main())


def _dashboard_link(scheduler, port) -> str | None:
    """The dashboard's URL, or None where it is not served (bokeh is not installed)."""
    import importlib.util

    from distributed.comm import get_address_host

    if not port or importlib.util.find_spec("bokeh") is None:
        return None
    return f"http://{get_address_host(scheduler.address)}:{port}/status"


# ---------------------------------------------------------------------------
# worker


#: seconds a worker waits for its registration before a first probe of the scheduler's
#: address, which reports only errors that prove the route broken (no route to host...:
#: on-link, the kernel says so once ARP fails, ~3 s). A wrong --interface then ends the
#: job in ~10 s from submission, not after the connect timeout (30 s) + its probe (5 s):
#: 41 s before, 10 s after on three namespace nodes under Slurm (load 12-15).
EARLY_PROBE = 1.0
#: a probe is one TCP connect + TLS handshake to the scheduler, which in a big job is
#: busiest with registrations right then: only workers on another host than the
#: scheduler's probe early, all of the first ranks, then one in EARLY_PROBE_EVERY
#: (3,000 workers: ~150 probes; a wrong interface fails every remote host alike)
EARLY_PROBE_RANKS = 64
EARLY_PROBE_EVERY = 32


def _probes_early(name, scheduler_info) -> bool:
    """Whether this worker probes the scheduler's address early (see EARLY_PROBE_RANKS)."""
    import socket

    host = (scheduler_info or {}).get("host")
    if host is not None and host == socket.gethostname():
        return False  # the scheduler's own host: every local address is reachable
    try:
        rank = int(name)
    except (TypeError, ValueError):
        return True  # a join job's worker: such jobs are small
    return rank < EARLY_PROBE_RANKS or rank % EARLY_PROBE_EVERY == 0


async def _unreachable(starting, address: str, settings, scheduler_info, security,
                       early: bool = True):
    """None once ``starting`` (the worker's start) is done, or a one-line problem: with
    ``early``, a probe after :data:`EARLY_PROBE` that reports only definite failures; then
    the full diagnosis (timeouts and refusals too) after ``settings.connect_timeout``."""
    from dask_mpi_launch.roles import diagnose

    loop = asyncio.get_running_loop()
    start = loop.time()
    probe = min(5.0, settings.connect_timeout)
    steps = [(True, min(EARLY_PROBE, settings.connect_timeout))] if early else []
    for definite_only, wait in steps + [(False, settings.connect_timeout)]:
        done, _ = await asyncio.wait({starting}, timeout=max(start + wait - loop.time(), 0))
        if done:
            return None
        # not connected yet: a busy scheduler, or an address this host cannot reach?
        problem = await loop.run_in_executor(
            None, functools.partial(diagnose.reachability_problem, address, probe,
                                    scheduler_info or {}, security,
                                    definite_only=definite_only))
        if problem:
            return problem
    return None


async def _started(server):
    await server
    return server


def _forget_main_script() -> None:
    """Processes a Nanny spawns must not run the calling script again (initialize())."""
    main = sys.modules.get("__main__")
    if main is not None:
        for attribute in ("__file__", "__spec__"):
            if getattr(main, attribute, None) is not None:
                setattr(main, attribute, None) if attribute == "__spec__" else delattr(main, attribute)


def run_worker(
    settings: Settings,
    channel: Channel,
    address: str,
    name,
    nthreads: int,
    memory_limit,
    security=None,
    scheduler_info=None,
    record=None,
) -> int:
    from distributed.utils import import_term

    _quiet(settings.log_level)
    _forget_main_script()
    worker_class = import_term(settings.worker_class)
    options = {
        "nthreads": nthreads,
        "memory_limit": memory_limit,
        "local_directory": settings.local_directory,
        "interface": settings.interface,
        "protocol": settings.protocol,
        "name": name,
        "security": security,
        **settings.worker_options,
    }
    if options.get("security") is None:
        options.pop("security")
    if not settings.scheduler:  # join mode: leave if the cluster goes away
        options.setdefault("death_timeout", settings.wait_timeout)

    problem = _full_directory(settings.local_directory)
    if problem:
        channel.error(problem)
        return 1

    async def main() -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.wait_timeout
        while True:
            try:
                worker = worker_class(address, **options)
            except TypeError as e:
                channel.error(f"cannot create {settings.worker_class} with these options: {e}")
                return 1
            starting = asyncio.ensure_future(_started(worker))
            problem = await _unreachable(starting, address, settings, scheduler_info, security,
                                         early=_probes_early(name, scheduler_info))
            if problem:
                starting.cancel()
                channel.error(problem)
                return 1
            try:
                await starting
                break
            except Exception as e:
                # a restarted worker may register before the scheduler dropped its old self
                if "name taken" in str(e) and loop.time() < deadline:
                    await asyncio.sleep(0.2)
                    continue
                channel.error(f"the worker could not start: {type(e).__name__}: {e}")
                return 1
        channel.send("ready", name=str(name), address=worker.address)
        from dask_mpi_launch.roles.time_limit import retire_on_signal

        retire_on_signal(worker, name)  # a join job's time limit (process/deadline.py)
        _quiet_heartbeat_at_close(worker)
        _report_full_disk(worker, channel)
        closed = _close_reason(worker)
        how = await _until_finished_or_signal(worker, settings.shutdown_timeout)
        if how == "signal":
            await worker.close(reason="dask-mpi-launch: job ending")
        # the one way a worker process leaves alive and well: said here, once Dask closed it
        # (the scheduler, its lifetime, a lost scheduler) or the rank asked; a process that
        # ends without saying it (a task's os._exit or sys.exit, a crash) is a dead worker
        if record:  # --record: what it moved, its peak memory (roles/record_output.py)
            from dask_mpi_launch.roles.record_output import worker_stats

            channel.send("stats", **worker_stats(worker))
        channel.send("leaving", reason=closed.get("reason", how))
        return 0

    return asyncio.run(main())


def _close_reason(worker) -> dict:
    """Record the reason of the worker's first close (``{"reason": ...}`` once closed):
    ``Worker.close`` is called by attribute, and as a handler of the scheduler's "close"
    message, bound when the worker was made."""
    seen: dict = {}
    original = worker.close

    async def close(*args, **kwargs):
        seen.setdefault("reason", str(kwargs.get("reason", "worker-close")))
        return await original(*args, **kwargs)

    worker.close = close
    for table in (getattr(worker, "handlers", {}), getattr(worker, "stream_handlers", {})):
        for key, handler in list(table.items()):
            if handler == original:
                table[key] = close
    return seen


#: a worker's local directory with less free space than this is full: it could not spill
MIN_FREE = 16 << 20


def _full_directory(directory) -> str | None:
    """One line if the worker's local (spill) directory is (nearly) full at start."""
    import tempfile

    path = directory or tempfile.gettempdir()
    try:
        st = os.statvfs(path)
    except OSError:
        return None  # distributed says what is wrong with it
    free = st.f_bavail * st.f_frsize
    if free >= MIN_FREE:
        return None
    return (f"the local directory {path} is full ({free >> 10} KiB free): the worker could "
            "not spill to disk (free some space, or choose another --local-directory)")


def _report_full_disk(worker, channel: Channel) -> None:
    """A spill that fails for want of space ends the job with one line: distributed
    logs the ENOSPC traceback, keeps the data in memory and, once memory is past its
    pause threshold, pauses the worker for good (a job that never ends, issue 21)."""

    class Full(logging.Handler):
        said = False

        def emit(self, record: logging.LogRecord) -> None:
            error = record.exc_info[1] if record.exc_info else None
            if self.said or getattr(error, "errno", None) not in (errno.ENOSPC, errno.EDQUOT):
                return
            self.said = True
            channel.error(f"the local directory {worker.local_directory} is full: spilling "
                          f"to disk failed ({error.strerror}); free some space, or choose "
                          "another --local-directory")

    def other(record: logging.LogRecord) -> bool:  # said once, by us, instead
        error = record.exc_info[1] if record.exc_info else None
        return getattr(error, "errno", None) not in (errno.ENOSPC, errno.EDQUOT)

    logging.getLogger("distributed.spill").addHandler(Full(logging.ERROR))
    for logger in (logging.getLogger("distributed"), logging.getLogger()):
        for handler in logger.handlers:
            handler.addFilter(other)


def _quiet_heartbeat_at_close(worker) -> None:
    """A heartbeat in flight when the worker closes fails (the worker's own close cuts its
    connection) and distributed logs it with a traceback, "Failed to communicate with
    scheduler during heartbeat." (seen at shutdown elsewhere too: dask/distributed#7192,
    nv-morpheus/Morpheus#1990): once this worker closes, that record is dropped; while it
    runs, it is logged as before."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        closing = getattr(worker.status, "name", "") in ("closing", "closed", "failed")
        text = str(record.msg)
        return not (closing and (
            text.startswith("Failed to communicate with scheduler during heartbeat")
            # a task its close cancelled (the scheduler gone): no news
            or (text.startswith("Async instruction for") and "CancelledError" in text)))

    logging.getLogger("distributed.worker").addFilter(keep)
    logging.getLogger("distributed.worker.state_machine").addFilter(keep)


# ---------------------------------------------------------------------------
# client


def set_client_environment(address: str, credentials: dict | None = None) -> None:
    """Make ``distributed.Client()`` with no arguments connect to this cluster (with its
    TLS credentials, in memory: never in the environment)."""
    import dask

    from dask_mpi_launch.security.credentials import client_config
    from dask_mpi_launch.tuning.idle import apply_hpc_defaults

    apply_hpc_defaults()  # quiet when idle (initialize()'s client comes this way)

    os.environ["DASK_SCHEDULER_ADDRESS"] = address
    dask.config.set({"scheduler-address": address, **client_config(credentials)})


def terminate_on_signal(grace: float) -> None:
    """The first SIGTERM raises SystemExit(143), the first SIGINT KeyboardInterrupt, so the
    script's finally blocks run; later signals are ignored (they would interrupt those
    blocks), and the process ends within ``grace`` seconds in any case. The signal goes on
    to the script's subprocesses (its process group): also when it comes from the death of
    the rank (PR_SET_PDEATHSIG), which then cannot signal the group itself."""

    def handler(signum, frame):
        for other in (signal.SIGTERM, signal.SIGINT):
            signal.signal(other, signal.SIG_IGN)
        if os.getpgrp() == os.getpid():  # a role process leads its own group
            try:
                os.killpg(os.getpgrp(), signum)
            except OSError:
                pass
        stop_within(grace)
        if ending[0]:  # the script is done: its threads and atexit handlers run, bounded
            return      # (an exception there is a traceback, "Exception ignored in atexit")
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    from dask_mpi_launch.roles.life import ENDING as ending

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)


def run_script(settings: Settings, channel: Channel, address: str, credentials=None) -> int:
    """Run the script or module as ``__main__``; return the status Python would exit with."""
    import runpy

    set_client_environment(address, credentials)
    terminate_on_signal(settings.shutdown_timeout)
    from dask_mpi_launch.hpc.time_limit import TimeLimitReached, install_warning

    install_warning()  # the time-limit warning: TimeLimitReached, or on_time_limit's callback
    if settings.module:
        sys.argv = [settings.module, *settings.args]
        sys.path.insert(0, os.getcwd())
    else:
        sys.argv = [settings.script, *settings.args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(settings.script)))
    status = 0
    try:
        if settings.module:
            if not _import_parent(settings.module, channel):
                return 1
            runpy.run_module(settings.module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(settings.script, run_name="__main__")
    except SystemExit as e:
        status = exit_status(e)
    except TimeLimitReached as e:
        from dask_mpi_launch.roles.time_limit import say_time_limit

        status = say_time_limit(e)
    except BaseException as e:
        if _cluster_lost(e):  # the rank says why in its one line: where the script was
            _say_where(e)
            # and the client's close at exit fails to reconnect, with a traceback
            logging.getLogger("distributed.client").setLevel(logging.CRITICAL)
        else:
            _print_user_traceback(e)
        status = 130 if isinstance(e, KeyboardInterrupt) else 1
    return status  # threads, atexit and files: as python ends (life.end_as_python_would)


def _import_parent(module: str, channel: Channel) -> bool:
    """Import the package of ``-m pkg.mod`` (its ``__init__`` is the user's code, run here in
    the client role, never in the rank); an error in it is one line, as ``python -m`` says."""
    import importlib

    parent = module.rpartition(".")[0]
    if not parent:
        return True
    try:
        importlib.import_module(parent)
    except Exception as e:
        channel.error(f"cannot run module {module!r}: importing its package {parent!r} "
                      f"raised {type(e).__name__}: {e}")
        return False
    return True


def _cluster_lost(e: BaseException) -> bool:
    """The script failed because the cluster went away (its scheduler was killed, rank 0
    died): distributed's ~35-line traceback says nothing the rank's line does not."""
    text = f"{type(e).__name__}: {e}"
    return any(mark in text for mark in (
        "scheduler-connection-lost", "CommClosedError", "Client lost the connection"))


# the launcher's own frames, left out of what the user is shown: the whole package's folder
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _say_where(e: BaseException) -> None:
    import traceback

    from dask_mpi_launch.base.status import say

    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.startswith(_PACKAGE_DIR)
              and "site-packages" not in f.filename and "runpy" not in f.filename]
    where = f" at {os.path.basename(frames[-1].filename)} line {frames[-1].lineno}" if (
        frames) else ""
    say(f"the script stopped{where}: it lost the cluster ({type(e).__name__})")


def _print_user_traceback(e: BaseException) -> None:
    """The traceback as ``python script.py`` prints it: without the launcher's frames."""
    import traceback

    tb = e.__traceback__
    here = _PACKAGE_DIR
    while tb is not None and (
        tb.tb_frame.f_code.co_filename.startswith(here) or "runpy" in tb.tb_frame.f_code.co_filename
    ):
        tb = tb.tb_next
    traceback.print_exception(type(e), e, tb)
    sys.stderr.flush()
