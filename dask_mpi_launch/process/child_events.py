"""What a rank's children say, and how they end: the supervisor (``process/supervisor.py``)
hands each event from a role's pipe to :func:`on_event` and each ended child to
:func:`on_exit`, which decide what the rank does (announce, fail, stop, restart)."""
from __future__ import annotations

from dask_mpi_launch.base.layout import CLIENT, SCHEDULER, WORKER
from dask_mpi_launch.base.messages import (Jupyter, LabOpen, Leaving, ListensAt, Ready, RoleError,
                                           UnknownMessage, WorkerReady, WorkerStats,
                                           decode_event)
from dask_mpi_launch.base.status import NORMAL, SCRIPT, say
from dask_mpi_launch.process import starting
from dask_mpi_launch.process.children import RESTART_REASON, Child


def on_event(sup, child: Child, event: dict) -> None:
    """One event from a role's pipe (typed: ``base/messages.py``); one this version does
    not know is left unread, as before."""
    try:
        m = decode_event(event)
    except UnknownMessage:
        return
    if isinstance(m, RoleError):
        sup.fail(child.role, m.message)
    elif isinstance(m, ListensAt) and child.role == SCHEDULER:
        _scheduler_listens(sup, m)
    elif isinstance(m, Leaving):
        child.left = str(m.reason)
    elif isinstance(m, LabOpen) and child.role == CLIENT:
        sup.control.send(0, *Jupyter(m.url))
    elif isinstance(m, WorkerReady) and child.role == WORKER:
        _worker_ready(sup)
    elif isinstance(m, WorkerStats):  # --record (process/job_record.py)
        child.stats = {"bytes_sent": m.bytes_sent, "peak_memory": m.peak_memory}


def _scheduler_listens(sup, m: ListensAt) -> None:
    sup.credentials = m.credentials  # made by the scheduler (TLS)
    network = (m.interfaces, m.network) if m.interfaces is not None else None
    starting.announce(sup, m.address, m.identity, m.dashboard, network=network)


def _worker_ready(sup) -> None:
    sup.workers_ready += 1  # restarted workers count again: == fires once
    if sup.workers_ready == sup.settings.worker_processes:
        names = [c.label.split(" ", 1)[1] for c in sup.children.of(WORKER)]
        sup.control.send(0, *Ready(sup.rank, sup.host, names))


def on_exit(sup, child: Child) -> None:
    if sup.outcome.decided:
        return
    ended = child.ended
    if child.role == CLIENT:
        _script_ended(sup, child)
    elif ended.ok and child.role == SCHEDULER and not sup.settings.has_client:
        sup.stop(0, NORMAL)  # cluster-only mode: a client shut the scheduler down
    elif child.role == WORKER and ended.ok and child.left == RESTART_REASON:
        sup.children.restart(child, counted=False)  # client.restart(): the nanny's part
    elif ended.ok and _closed_by_dask(child):
        # fine; in join mode the rank is done once all its workers are
        if not sup.settings.scheduler and not any(c.alive for c in sup.children):
            sup.deadline.retired() if sup.deadline.retiring else sup.stop(0, NORMAL)
    elif child.role == WORKER and sup.children.may_restart(child):
        _restart_dead_worker(sup, child)
    else:
        _died(sup, child)


def _closed_by_dask(child: Child) -> bool:
    """Ended with 0 as Dask closes it (client.shutdown(), retire_workers): a worker that
    announces leaving has said so first."""
    return child.left is not None or child.role != WORKER or not child.announces_leaving


def _script_ended(sup, child: Child) -> None:
    ended = child.ended
    if ended.crashed:
        sup.fail(CLIENT, f"the script {ended.describe()}", ended.status, SCRIPT)
    else:
        sup.stop(ended.status, SCRIPT)


def _restart_dead_worker(sup, child: Child) -> None:
    """Dead: killed (OOM killer, SIGKILL), or ended by a task (os._exit, sys.exit) with
    whatever status, since it did not say it leaves (roles.run_worker)."""
    n = sup.children.restart(child)  # same name: its tasks are rescheduled
    say(f"{child.label} (rank {sup.rank}, host {sup.host}) {death(child)}: "
        f"restarting it ({n} of {sup.settings.worker_restarts})")


def _died(sup, child: Child) -> None:
    sup.fail(child.role, f"the {child.label} process {death(child)}"
             + (f" (after {sup.settings.worker_restarts} restarts)"
                if child.role == WORKER and sup.settings.worker_restarts else ""))


def death(child: Child) -> str:
    ended = child.ended
    if child.cause:
        return child.cause
    if ended.ok:  # a worker ends with 0 only after saying it leaves
        return ("ended with status 0 without being asked to (a task called sys.exit "
                "or os._exit?)")
    return ended.describe()
