"""``initialize()``: join the launch layout from the top of an existing script.

Run as ``mpiexec -n N python script.py``. On the client rank, ``initialize()`` returns (in
a process started for the rank and watched by it, so the job ends with the script's exact
status whatever happens to it); on the other ranks it serves the scheduler or a worker and,
when the script ends, exits the process with the job's status. The keywords of dask-mpi's
``initialize()`` are accepted, so migrating is a one-line import change.

Where MPI is not yet initialized when ``initialize()`` is called (the usual case), the rank
first forks its zygote (``process/zygote.py``) and only then loads MPI: the scheduler, the workers
and the client (the rest of the script) run in processes that never held MPI. Where the
script initialized MPI itself before (``from mpi4py import MPI`` above ``initialize()``),
those processes are forked from the rank, with the fabrics' fork-safety variables set.
"""
from __future__ import annotations

import os
import sys

# JOINED: this process already joined a layout ({"client": bool}): by initialize(), or as a
# role process of a running job (a script run by ``dask-mpi-launch`` that calls initialize())
from dask_mpi_launch.roles.life import JOINED

_state = {}  # initialize(exit=False) on the client rank: the monitor thread and its stop


def initialize(
    interface=None,
    nthreads=None,
    local_directory=None,
    memory_limit=None,
    nanny=False,
    dashboard=None,
    dashboard_address=None,
    protocol=None,
    worker_class=None,
    worker_options=None,
    comm=None,
    exit=True,
    *,
    layout=None,
    scheduler_port=None,
    name=None,
    scheduler_file=None,
    wait_for_workers=None,
    wait_timeout=None,
    log_level=None,
    scheduler_rank=None,
    client_rank=None,
    exclusive_workers=None,
    record=None,
    record_report=None,
):
    """Start the cluster on the ranks of this MPI job; return on the client rank.

    Rank 0 runs the scheduler, rank 1 returns to the calling script (``Client()`` then
    connects with no arguments, once every worker is connected), the other ranks run
    workers. With ``exit=True`` (the default) the non-client ranks exit the process with
    the job's status when the script ends, and ``initialize()`` returns ``True`` on the
    client rank. With ``exit=False`` every rank returns: ``True`` on the client rank, at
    once, and ``False`` on the others once the client called :func:`send_close_signal`;
    if the cluster cannot start or fails, it raises :class:`~dask_mpi_launch.LaunchError`
    (:class:`~dask_mpi_launch.WorldTooSmallException` for too few ranks) instead.

    Keywords not given fall back to the ``mpi-launch`` section of dask.config.
    ``nanny=True`` is ``worker_class="distributed.Nanny"`` (dask-mpi's spelling).
    """
    if JOINED:  # a second call never starts a second layout (nor MPI in a role process)
        return JOINED["client"]
    from dask_mpi_launch.hpc import load_mpi
    from dask_mpi_launch.process.children import BecomeClient, ForkLauncher
    from dask_mpi_launch.base.errors import LaunchError
    from dask_mpi_launch.base.layout import CLIENT
    from dask_mpi_launch.roles.run import run_role
    from dask_mpi_launch.configure.settings import resolve
    from dask_mpi_launch.base.status import FAILED

    if nanny and worker_class is None:
        worker_class = "distributed.Nanny"
    launcher = None
    try:
        settings = resolve(
            in_process=True, interface=interface, nthreads=nthreads,
            local_directory=local_directory, memory_limit=memory_limit, dashboard=dashboard,
            dashboard_address=dashboard_address, protocol=protocol, worker_class=worker_class,
            worker_options=worker_options, layout=layout, scheduler_port=scheduler_port,
            name=name, scheduler_file=scheduler_file, wait_for_workers=wait_for_workers,
            wait_timeout=wait_timeout, log_level=log_level, scheduler_rank=scheduler_rank,
            client_rank=client_rank, exclusive_workers=exclusive_workers, record=record,
            record_report=record_report,
        )
        if load_mpi.initialized():
            launcher = ForkLauncher(run_role)
        else:
            from dask_mpi_launch.process import zygote

            try:
                launcher = zygote.start()
            except BecomeClient as become:  # this is the client, started by the zygote
                _become_client(become, settings.shutdown_timeout, finalize_guard=False)
                return JOINED.setdefault("client", True)
        MPI = load_mpi.load()
        if not exit and load_mpi.we_finalize():
            load_mpi.finalize_at_exit()  # every rank returns: MPI ends with the interpreter
        load_mpi.check_world(MPI.COMM_WORLD)
    except LaunchError as e:
        if launcher is not None:
            launcher.close()
        if not exit:
            raise
        _exit_on_error(e)
    if comm is None:
        comm = MPI.COMM_WORLD
    from dask_mpi_launch.control.over_mpi import Control
    from dask_mpi_launch.process.supervisor import Supervisor

    control = Control(comm)
    if settings.protocol == "mpi":  # workers in the ranks, their data over MPI
        from dask_mpi_launch.process.in_rank import InRankLauncher

        launcher = InRankLauncher(launcher, comm.Dup())
    in_process = not exit and CLIENT in settings.layout_for(control.size).roles(control.rank)
    supervisor = Supervisor(settings, control, launcher, finalize=exit,
                            client_in_process=in_process)
    if in_process:
        return JOINED.setdefault("client", _client_in_process(supervisor))
    try:
        status = supervisor.run()
    except BecomeClient as become:  # forked from this rank (MPI was initialized before)
        _become_client(become, settings.shutdown_timeout,
                       finalize_guard=not load_mpi.we_finalize())
        return JOINED.setdefault("client", True)
    if not exit:
        if supervisor.outcome.priority == FAILED:
            raise supervisor.error or LaunchError("the cluster failed (see the message above)",
                                                  status or 1)
        return JOINED.setdefault("client", False)
    # The serving ranks: MPI is finalized, and the interpreter's teardown could make MPI
    # kill the process. The script ran (finally blocks, atexit) in the client's process.
    from dask_mpi_launch.process.children import exit_rank

    exit_rank(status)


def _exit_on_error(e) -> None:
    from dask_mpi_launch.hpc import load_mpi

    load_mpi.say_once(e.message)
    MPI = sys.modules.get("mpi4py.MPI")
    if MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()
    else:
        load_mpi.linger(e.status)
    sys.exit(e.status)


def _become_client(become, grace: float, finalize_guard: bool) -> None:
    """In the client process: ``Client()`` connects to the cluster; signals end the script
    like a script (finally blocks run); the rest of the script runs on return."""
    from dask_mpi_launch.roles.run import set_client_environment, terminate_on_signal

    set_client_environment(become.address, become.credentials)
    terminate_on_signal(grace)
    from dask_mpi_launch.hpc.time_limit import install_warning

    install_warning()  # the time-limit warning (README "Time limits")
    if finalize_guard:
        _exit_without_mpi_finalize()


def _exit_without_mpi_finalize() -> None:
    """This process was forked from a rank whose MPI mpi4py will finalize at exit (the
    script imported mpi4py before ``initialize()``): a second MPI_Finalize from a copy of
    the rank would make the launcher kill the job. So the process ends with ``os._exit``
    after the script's atexit handlers, with the status CPython would have given.

    CPython decides that status in C, out of reach of atexit handlers; so we learn it where
    the interpreter reads it: ``sys.exit()``, ``exit()`` and ``raise SystemExit`` all raise
    our subclass of SystemExit, whose ``code`` records itself when the interpreter (no
    Python caller) reads it on the way out; an uncaught exception goes through excepthook.
    """
    import atexit
    import builtins

    from dask_mpi_launch.base.status import exit_status

    base = builtins.SystemExit
    state = {"status": 0}

    class SystemExit(base):  # noqa: A001 - it is meant to stand in for the builtin
        @property
        def code(self):
            code = base.code.__get__(self)
            try:
                sys._getframe(1)
            except ValueError:  # no Python caller: the interpreter is exiting with it
                state["status"] = exit_status(base(code), show=False)
            return code

    def exit_(status=None):
        raise SystemExit(status)

    real_hook = sys.excepthook

    def hook(kind, value, tb):
        state["status"] = 130 if issubclass(kind, KeyboardInterrupt) else 1
        real_hook(kind, value, tb)

    def last():  # runs after the atexit handlers registered after ours (LIFO)
        import logging

        from dask_mpi_launch.process.children import flush

        logging.shutdown()  # registered before ours: flush the script's log files
        flush()
        os._exit(state["status"])

    builtins.SystemExit, sys.exit, sys.excepthook = SystemExit, exit_, hook
    atexit.register(last)


def _client_in_process(supervisor) -> bool:
    """``exit=False`` on the client rank: return at once, keep serving MPI in a thread."""
    import atexit
    import signal

    from dask_mpi_launch.process.children import BecomeClient

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        supervisor.run()
    except BecomeClient as become:
        from dask_mpi_launch.hpc.time_limit import install_warning
        from dask_mpi_launch.roles.run import set_client_environment

        set_client_environment(become.address, become.credentials)
        install_warning()  # the monitor thread's rank signals this very process
    else:
        raise supervisor.error or _cluster_did_not_start()
    finally:
        for signum, handler in handlers.items():  # the script keeps its own signals
            signal.signal(signum, handler)
    import threading

    stop = threading.Event()
    thread = threading.Thread(target=supervisor.monitor, args=(stop,), daemon=True,
                              name="dask-mpi-launch-monitor")
    thread.start()
    _state.clear()  # a "closed" of an earlier cluster
    _state.update(thread=thread, stop=stop, timeout=4 * supervisor.settings.shutdown_timeout + 10)
    atexit.register(_close_at_exit)
    _exit_through_the_launcher()
    return True


def _exit_through_the_launcher() -> None:
    """``os._exit(n)`` in the script, where the script is the client rank itself
    (``exit=False``), skips the atexit handler that closes the cluster and MPI_Finalize:
    MPICH's launcher then takes the rank for dead and kills the job (status 9, where Open
    MPI reported n). So in this process ``os._exit`` first closes the cluster and
    finalizes MPI, as a normal exit does, then exits with ``n``: the same status under
    both MPIs. Processes forked from the script (multiprocessing) exit as before."""
    real, owner = os._exit, os.getpid()

    def _exit(status):
        if os.getpid() != owner:
            real(status)
        os._exit = real
        try:
            from dask_mpi_launch.process.children import exit_rank, flush

            flush()
            _close_at_exit()
            MPI = sys.modules.get("mpi4py.MPI")
            if MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized():
                MPI.Finalize()
            exit_rank(status)  # C exit(): MPI's own exit handlers run (children.exit_rank)
        finally:
            real(status)

    os._exit = _exit


def _cluster_did_not_start():
    from dask_mpi_launch.base.errors import LaunchError

    return LaunchError("the cluster could not start (see the message above)")


def _close_at_exit() -> None:
    if "thread" in _state:
        send_close_signal()


def _close_own_clients() -> None:
    """Close the clients this process opened before its cluster goes: a ``Client()`` left
    open saw its scheduler vanish and printed a 35-line traceback at exit (5 runs in 6)."""
    client_module = sys.modules.get("distributed.client")
    if client_module is None:
        return
    for client in list(getattr(client_module, "_global_clients", {}).values()):
        try:
            client.close(timeout=5)
        except Exception:
            pass


def send_close_signal() -> None:
    """End the cluster started with ``initialize(exit=False)`` (call on the client rank).

    The other ranks close their workers and scheduler and their ``initialize()`` returns
    ``False``. Outside such a job, shuts down the scheduler ``Client()`` connects to.
    Calling it again returns at once: a second call used to connect to the closed
    scheduler, wait 30 s (distributed.comm.timeouts.connect) and raise a 46-line OSError.
    """
    if _state.get("closed"):
        return
    if "thread" in _state:
        _close_own_clients()
        _state["stop"].set()
        _state["thread"].join(timeout=_state["timeout"])
        _state.clear()
        _state["closed"] = True
        return
    from distributed import Client

    with Client() as client:
        client.shutdown()
    _state["closed"] = True
