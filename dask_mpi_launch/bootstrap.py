"""``initialize()``: join the launch layout from the top of an existing script.

Run as ``mpiexec -n N python script.py``. On the client rank, ``initialize()`` returns (in
a process forked from the rank, watched by it, so the job ends with the script's exact
status whatever happens to it); on the other ranks it serves the scheduler or a worker and,
when the script ends, exits the process with the job's status. The keywords of dask-mpi's
``initialize()`` are accepted, so migrating is a one-line import change.
"""
from __future__ import annotations

import os
import sys
import threading

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
):
    """Start the cluster on the ranks of this MPI job; return on the client rank.

    Rank 0 runs the scheduler, rank 1 returns to the calling script (``Client()`` then
    connects with no arguments, once every worker is connected), the other ranks run
    workers. With ``exit=True`` (the default) the non-client ranks exit the process with
    the job's status when the script ends, and ``initialize()`` returns ``True`` on the
    client rank. With ``exit=False`` every rank returns: ``True`` on the client rank, at
    once, and ``False`` on the others once the client called :func:`send_close_signal`.

    Keywords not given fall back to the ``mpi-launch`` section of dask.config.
    ``nanny=True`` is ``worker_class="distributed.Nanny"`` (dask-mpi's spelling).
    """
    from . import mpi
    from .errors import LaunchError
    from .settings import resolve

    if nanny and worker_class is None:
        worker_class = "distributed.Nanny"
    try:
        settings = resolve(
            in_process=True, interface=interface, nthreads=nthreads,
            local_directory=local_directory, memory_limit=memory_limit, dashboard=dashboard,
            dashboard_address=dashboard_address, protocol=protocol, worker_class=worker_class,
            worker_options=worker_options, layout=layout, scheduler_port=scheduler_port,
            name=name, scheduler_file=scheduler_file, wait_for_workers=wait_for_workers,
            wait_timeout=wait_timeout, log_level=log_level,
        )
        MPI = mpi.load()
        mpi.check_world(MPI.COMM_WORLD)
    except LaunchError as e:
        if not exit:
            raise
        _exit_on_error(e)
    if comm is None:
        comm = MPI.COMM_WORLD
    import distributed  # noqa: F401  (after MPI_Init; forked roles reuse the import)

    from .lifecycle import BecomeClient, Supervisor
    from .layout import CLIENT

    supervisor = Supervisor(settings, comm, finalize=exit)
    if not exit and CLIENT in supervisor.roles:
        return _client_in_process(supervisor)
    try:
        status = supervisor.run()
    except BecomeClient as become:
        _become_client(become.address, become.credentials, settings.shutdown_timeout,
                       exit_hooks=not mpi.we_finalize())
        return True
    if not exit:
        return False
    sys.stdout.flush()
    sys.stderr.flush()
    # The client's parent: the script ran (with its finally blocks and atexit handlers) in
    # the forked process; do not run them a second time here. The serving ranks: MPI is
    # finalized, and the interpreter's teardown could make MPI kill the process.
    from .process import exit_rank

    exit_rank(status)


def _exit_on_error(e) -> None:
    from . import mpi

    mpi.say_once(e.message)
    MPI = sys.modules.get("mpi4py.MPI")
    if MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()
    sys.exit(e.status)


def _become_client(address: str, credentials, grace: float, exit_hooks: bool) -> None:
    """In the forked client process: connect Client() to the cluster, end like a script."""
    from .roles import set_client_environment, terminate_on_signal

    set_client_environment(address, credentials)
    terminate_on_signal(grace)
    if exit_hooks:
        _exit_without_mpi_finalize()


def _exit_without_mpi_finalize() -> None:
    """mpi4py would call MPI_Finalize when this forked process exits (the script imported
    mpi4py before we could tell it not to): end with ``os._exit`` after the atexit
    handlers instead, keeping the status ``sys.exit()`` or an uncaught exception gives."""
    import atexit

    status = {"code": 0}
    real_exit, real_hook = sys.exit, sys.excepthook

    def exit_(code=0):
        status["code"] = code
        real_exit(code)

    def hook(kind, value, tb):
        status["code"] = 130 if issubclass(kind, KeyboardInterrupt) else 1
        real_hook(kind, value, tb)

    def last():
        from .process import _flush, exit_status

        _flush()
        os._exit(exit_status(SystemExit(status["code"])))

    sys.exit, sys.excepthook = exit_, hook
    atexit.register(last)


def _client_in_process(supervisor) -> bool:
    """``exit=False`` on the client rank: return at once, keep serving MPI in a thread."""
    import signal

    from .errors import LaunchError
    from .lifecycle import BecomeClient

    supervisor.in_process_client = True
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = supervisor.run()
    except BecomeClient as become:
        from .roles import set_client_environment

        set_client_environment(become.address, become.credentials)
    else:
        raise LaunchError("the cluster could not start (see the message above)", status or 1)
    finally:
        for signum, handler in handlers.items():  # the script keeps its own signals
            signal.signal(signum, handler)
    stop = threading.Event()
    thread = threading.Thread(target=supervisor.monitor, args=(stop,), daemon=True,
                              name="dask-mpi-launch-monitor")
    thread.start()
    _state.update(thread=thread, stop=stop)
    return True


def send_close_signal() -> None:
    """End the cluster started with ``initialize(exit=False)`` (call on the client rank).

    The other ranks close their workers and scheduler and their ``initialize()`` returns
    ``False``. Outside such a job, shuts down the scheduler ``Client()`` connects to.
    """
    if _state:
        _state["stop"].set()
        _state["thread"].join(timeout=30)
        _state.clear()
        return
    from distributed import Client

    with Client() as client:
        client.shutdown()
