"""``execute()``: dask-mpi's "run this function on the client rank with a cluster".

Built on :func:`~dask_mpi_launch.initialize` with ``exit=False`` and
:func:`~dask_mpi_launch.send_close_signal`: the function runs in the calling process of
the client rank (its main thread: signals and ``sys.exit`` behave as in a script), with
``Client()`` connecting to this cluster with no arguments, once every worker is connected.
When it returns, the cluster closes and ``execute()`` returns ``None`` on every rank, which
goes on with the script (``comm`` is intact). When it raises, dask-mpi hangs; here the
traceback is printed once, on the client rank, and every rank raises ``SystemExit`` with
the script's status (1, ``sys.exit(N)``'s N, 130 for Ctrl-C), so the job ends with it.
"""
from __future__ import annotations

import sys
import time

# How long ranks wait for the client rank's outcome after the cluster closed: the client
# only has send_close_signal() to return from, which is itself bounded.
_OUTCOME_TIMEOUT = 120.0


def execute(
    client_function=None,
    client_args=(),
    client_kwargs=None,
    client_rank=1,
    scheduler=True,
    scheduler_rank=0,
    scheduler_address=None,
    scheduler_port=None,
    scheduler_file=None,
    interface=None,
    nthreads=None,
    local_directory=None,
    memory_limit=None,
    nanny=False,
    dashboard=None,
    dashboard_address=None,
    protocol=None,
    exclusive_workers=True,
    worker_class=None,
    worker_options=None,
    worker_name=None,
    comm=None,
    *,
    wait_for_workers=None,
    wait_timeout=None,
    log_level=None,
):
    """Run ``client_function(*client_args, **client_kwargs)`` on ``client_rank`` with a
    Dask cluster on the ranks of ``comm`` (default ``COMM_WORLD``).

    dask-mpi's keywords and defaults, except ``nthreads`` (default: the rank's share of
    the batch job) and TLS (on by default; ``protocol="tcp"`` opts out). The scheduler
    runs on ``scheduler_rank``; ``exclusive_workers=False`` also runs a worker on the
    scheduler's and the client's ranks (``--layout full``); the client on the scheduler's
    rank with exclusive workers is ``--layout compact``. Workers are named by their rank,
    or ``f"{worker_name}-{rank}"``.

    Every rank must call it. Returns ``None`` on every rank once the function returned and
    the cluster closed. Raises :class:`WorldTooSmallException` (on every rank) when
    ``comm`` cannot hold the ranks asked for. A function that raises ends the job: one
    traceback, then ``SystemExit`` with the status on every rank.
    """
    from dask_mpi_launch.hpc import load_mpi
    from dask_mpi_launch.bootstrap import initialize, send_close_signal
    from dask_mpi_launch.base.errors import UsageError

    if not callable(client_function):
        raise TypeError(f"execute() needs a function to run on the client rank, not "
                        f"{client_function!r}; for a cluster without a client, run "
                        "mpiexec -n N dask-mpi-launch --scheduler-file PATH")
    if not scheduler or scheduler_address is not None:
        raise UsageError("execute(scheduler=False) is not supported: add workers to a "
                         "running cluster with mpiexec -n N dask-mpi-launch --no-scheduler "
                         "--scheduler-file PATH")
    if comm is None:
        comm = load_mpi.load().COMM_WORLD
    from dask_mpi_launch.base.layout import Layout, layout_name

    # dask-mpi raises WorldTooSmallException on every rank before anything starts: so do we
    Layout(layout_name(exclusive_workers, scheduler_rank, client_rank), comm.Get_size(),
           scheduler_rank=scheduler_rank, client_rank=client_rank).check()
    work = comm.Dup()  # the cluster's own channel: the caller's comm stays as it was
    is_client = initialize(
        interface=interface, nthreads=nthreads, local_directory=local_directory,
        memory_limit=memory_limit, nanny=nanny, dashboard=dashboard,
        dashboard_address=dashboard_address, protocol=protocol, worker_class=worker_class,
        worker_options=worker_options, comm=work, exit=False,
        scheduler_port=scheduler_port, name=worker_name, scheduler_file=scheduler_file,
        wait_for_workers=wait_for_workers, wait_timeout=wait_timeout, log_level=log_level,
        scheduler_rank=scheduler_rank, client_rank=client_rank,
        exclusive_workers=exclusive_workers,
    )
    outcome = [0, 0]  # [status, 1 if the job must end with it]
    if is_client:
        try:
            client_function(*client_args, **(client_kwargs or {}))
        except SystemExit as e:
            outcome = [_exit_status(e.code), 1]
        except BaseException as e:
            import traceback

            # as Python prints an uncaught exception, from the function's frame on
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
            outcome = [130 if isinstance(e, KeyboardInterrupt) else 1, 1]
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            _close_clients()
            send_close_signal()
    outcome = _share(comm, outcome, root=client_rank)  # (MPI ends at exit: initialize())
    if outcome[1]:
        raise SystemExit(outcome[0])


def _close_clients() -> None:
    """Close the clients the function left open (``client = Client()`` without ``with``):
    once the cluster is gone they would log reconnection errors until the process ends."""
    try:
        from distributed.client import _global_clients
    except ImportError:
        return
    for client in list(_global_clients.values()):
        try:
            if client.status not in ("closed", "closing"):
                client.close(timeout=5)
        except Exception:
            pass


def _share(comm, outcome, root: int):
    """Broadcast the client's outcome, bounded: a client rank that died never hangs us."""
    from array import array

    from mpi4py import MPI

    buf = array("i", outcome)
    request = comm.Ibcast([buf, MPI.INT], root=root)
    deadline = time.monotonic() + _OUTCOME_TIMEOUT
    while not request.Test():
        if time.monotonic() > deadline:
            print(f"dask-mpi-launch: error on rank {comm.Get_rank()}: the client rank "
                  f"{root} did not say how its function ended within "
                  f"{_OUTCOME_TIMEOUT:.0f} s", file=sys.stderr, flush=True)
            return [1, 1]
        time.sleep(0.01)
    return list(buf)


def _exit_status(code) -> int:
    """CPython's rule: None is 0, an int is itself, anything else is printed and is 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr, flush=True)
    return 1
