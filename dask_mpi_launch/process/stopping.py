"""STOPPING, a rank's last phase before the exit status is agreed: its roles stop in order,
the client, then the scheduler, then the workers it left, each within a grace period after
which the role's process group is killed; then what the roles left behind is ended. The
supervisor (``process/supervisor.py``) runs :class:`Stopping` once the job's outcome is
decided, and goes on watching its children and the other ranks during each wait."""
from __future__ import annotations

import signal
import time

from dask_mpi_launch.base.layout import CLIENT, SCHEDULER, WORKER
from dask_mpi_launch.base.messages import Closed, SchedulerClosed
from dask_mpi_launch.base.status import say
from dask_mpi_launch.process.children import end_descendants


class Stopping:
    """The scheduler closes before the workers: its close tells every worker to close
    (one message each), while workers closing first would cost the scheduler a removal
    each that notifies every remaining worker, O(workers^2) (tuning/scheduler.py). So the
    script's finally blocks still have the whole cluster; then the scheduler's rank
    closes it and tells the worker ranks, which end what is left."""

    def __init__(self, sup):
        self.sup = sup
        self.grace = sup.settings.shutdown_timeout

    def run(self) -> None:
        self.stop_client()
        self.stop_scheduler()
        self.stop_workers()
        self.clean_up()

    def stop_client(self) -> None:
        sup = self.sup
        self.terminate(sup.children.of(CLIENT))
        if CLIENT in sup.roles and sup.rank != sup.scheduler_rank:
            sup.control.send(sup.scheduler_rank, *Closed(sup.rank))

    def stop_scheduler(self) -> None:
        """Once the client's rank is done with it (bounded by the grace period)."""
        sup = self.sup
        client = sup.layout.client_rank
        scheduler = sup.children.of(SCHEDULER)
        if scheduler:
            self.wait_while(lambda: (client not in (None, sup.rank) and client not in sup.closed
                                     and scheduler[0].alive), self.grace)
            self.terminate(scheduler)
        if SCHEDULER in sup.roles:
            sup.control.broadcast(*SchedulerClosed())

    def stop_workers(self) -> None:
        sup = self.sup
        workers = sup.children.of(WORKER)
        if workers and sup.settings.scheduler and SCHEDULER not in sup.roles:
            # closed by the scheduler's close; bounded: the client's and the scheduler's
            # grace, in case the scheduler's rank cannot say
            self.wait_while(lambda: (not sup.scheduler_closed
                                     and any(c.alive for c in workers)), 2 * self.grace)
            # the scheduler's close told them to go, and its rank's word can come before
            # they are gone: a moment more to leave by themselves before any signal
            self.wait_while(lambda: sup.scheduler_closed and any(c.alive for c in workers),
                            min(self.grace / 2, 2.0))
        self.terminate(workers)

    def clean_up(self) -> None:
        sup = self.sup
        sup.children.kill_leftovers()
        if sup.stdin_relay is not None:
            sup.stdin_relay.close()
        if sup.coordinator:
            sup.coordinator.remove_scheduler_file()
        sup.launcher.close()
        sup.record.drain()  # the copies of the roles' output end by themselves
        self.end_strays()

    def end_strays(self) -> None:
        """What the roles left running (orphans reparented to this rank, a subreaper): a
        daemon the script started, a task's helper that left its session. Not where this
        process is the user's script (initialize(exit=False)'s client), whose own
        children are its business; the node's shared zygote serves other ranks still."""
        sup = self.sup
        if not sup.children.reap_orphans:
            return
        launcher = getattr(sup.launcher, "base", sup.launcher)
        spare = tuple(getattr(launcher, "spare", ()))
        ended = end_descendants(min(2.0, sup.settings.shutdown_timeout), spare)
        if ended:
            shown = ", ".join(ended[:3]) + (" ..." if len(ended) > 3 else "")
            say(f"rank {sup.rank} (host {sup.host}): ended {len(ended)} process"
                f"{'es' if len(ended) > 1 else ''} the job left running: {shown}")

    def wait_while(self, condition, seconds: float) -> None:
        """Watch (children, other ranks) while ``condition()`` holds, at most ``seconds``."""
        deadline = time.monotonic() + seconds
        while condition() and time.monotonic() < deadline:
            self.sup.poll_quietly()

    def terminate(self, children) -> None:
        sup = self.sup
        signum = signal.SIGINT if sup.signalled == signal.SIGINT else signal.SIGTERM
        sup.children.terminate(children, self.grace, signum, sup.poll_quietly)
