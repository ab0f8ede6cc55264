"""The job ends itself before its allocation does: the supervisor's clock of the end.

Rank 0 alone asks the batch system when the allocation ends (``hpc/time_limit.py``: one
``squeue`` for the job, never one per rank) or takes ``--time-limit``, and tells every rank
(a ``Deadline`` message) before the roles that need it start; each rank puts the end in the
environment of the processes it starts, where ``dask_mpi_launch.time_left()`` reads it.
Then, on every turn of the supervisor's loop (:meth:`Deadline.tick`):

* at ``end - grace`` the client's rank warns the script (SIGUSR2 to the script's process
  alone, not its group: ``time_limit.install_warning`` turns it into ``TimeLimitReached``
  or the user's callback); a join job's ranks retire their workers (the scheduler moves
  their data to the workers that stay), after an offset derived from the job id, so join
  jobs that end together do not all retire at once;
* at ``end - teardown`` rank 0 stops the job as on SIGTERM (the script's ``finally`` runs),
  with status 124, and says it in one line; a cluster-only job's scheduler file is removed
  first, so no new client comes while it closes.

SIGUSR1 from the batch system (``#SBATCH --signal=B:USR1@N``, Grid Engine's ``s_rt``) is a
second source: the warning phase starts at once, and the stop follows ``grace - teardown``
seconds later when the end is not known sooner.
"""
from __future__ import annotations

import os
import signal
import time
import zlib

from dask_mpi_launch.base.layout import CLIENT, WORKER
from dask_mpi_launch.base.messages import Deadline as DeadlineMessage
from dask_mpi_launch.base.record import replace
from dask_mpi_launch.base.status import SIGNALLED, TIME_LIMIT, say
from dask_mpi_launch.hpc import time_limit
from dask_mpi_launch.hpc.launchers import job_id


class Deadline:
    def __init__(self, sup):
        self.sup = sup
        s = sup.settings
        self.workers = len(sup.layout.worker_ranks) * s.worker_processes
        self.end: float | None = None
        self.source = ""
        self.grace = self.teardown = 0.0
        self.warn_at = self.stop_at = self.retire_at = None
        self.warned = self.stopped = self.retiring = False
        self.signalled = False  # SIGUSR1 came

    # ------------------------------------------------------------------
    # knowing the end

    def begin(self) -> None:
        """Rank 0: find the end (the option, else the batch system) and tell every rank."""
        if self.sup.rank != 0:
            return
        s = self.sup.settings
        if s.time_limit:
            end, source = time.time() + s.time_limit, "--time-limit"
        else:
            end, source = time_limit.discover()
        self.learn(end, source)
        self.sup.control.broadcast(*DeadlineMessage(end, source))

    def learn(self, end, source: str) -> None:
        """The end as rank 0 said it: into the settings the roles are started with."""
        if end is None:
            return
        now = time.time()
        self.end, self.source = float(end), source
        self.grace, self.teardown = time_limit.grace_for(
            self.workers, self.sup.settings.shutdown_timeout, self.end - now,
            self.sup.settings.time_grace)
        self.warn_at = min(self.warn_at or self.end, self.end - self.grace)
        self.stop_at = min(self.stop_at or self.end, self.end - self.teardown)
        time_limit.export(self.end)  # initialize()'s script, in this very process
        sup = self.sup
        sup.settings = sup.children.settings = replace(sup.settings, end=self.end)

    def install(self) -> None:
        """SIGUSR1 (the batch system's warning) starts the warning phase."""
        def handler(signum, frame):
            self.signalled = True

        signal.signal(time_limit.BATCH_SIGNAL, handler)

    # ------------------------------------------------------------------
    # each turn of the loop

    def tick(self) -> None:
        if self.sup.outcome.decided:  # stopping already: nothing more to warn or stop
            return
        if self.signalled and not self.warned:
            self._on_batch_signal(time.time())
        if self.warn_at is None:
            return
        now = time.time()
        if not self.warned and now >= self.warn_at and self._started():
            self.warn(now)
        if self.retire_at is not None and now >= self.retire_at:
            self.retire()
        if not self.stopped and self.sup.rank == 0 and now >= self.stop_at:
            self.stop(now)

    def _started(self) -> bool:
        """The roles to warn are there: the script started, a join job's workers ready (a
        warning before them waits for them)."""
        sup = self.sup
        return ((CLIENT not in sup.roles or sup.client_in_process or "client" in sup.started)
                and (sup.settings.scheduler or WORKER not in sup.roles
                     or sup.workers_ready >= sup.settings.worker_processes))

    def _on_batch_signal(self, now: float) -> None:
        if self.end is None or self.end - self.grace > now:
            grace = self.sup.settings.time_grace or time_limit.grace_for(
                self.workers, self.sup.settings.shutdown_timeout, None)[0]
            self.grace, self.teardown = time_limit.grace_for(
                self.workers, self.sup.settings.shutdown_timeout, None, grace)
            self.source = self.source or "SIGUSR1 from the batch system"
            self.warn_at = now
            self.stop_at = min(self.stop_at or now + grace, now + grace - self.teardown)

    def warn(self, now: float) -> None:
        """The script's warning, or a join job's retirement (staggered)."""
        sup = self.sup
        self.warned = True
        if CLIENT in sup.roles:
            for child in sup.children.of(CLIENT):
                _signal_one(child.pid, time_limit.ROLE_SIGNAL)
            if sup.client_in_process:  # initialize(exit=False): the script is this process
                _signal_one(os.getpid(), time_limit.ROLE_SIGNAL)
        if not sup.settings.scheduler and WORKER in sup.roles:
            self.retire_at = now + stagger(job_id(os.environ), self.grace - self.teardown)

    def retire(self) -> None:
        """Ask this rank's workers to retire (each asks the scheduler to move its data)."""
        self.retire_at = None
        self.retiring = True
        for child in self.sup.children.of(WORKER):
            _signal_one(child.pid, time_limit.ROLE_SIGNAL)

    def retired(self) -> None:
        """All this rank's workers left: this rank is done, with the time-limit status
        (proposed here, not broadcast: the job's other ranks may still be retiring)."""
        self.sup.outcome.propose(TIME_LIMIT, SIGNALLED)

    def stop(self, now: float) -> None:
        sup = self.sup
        self.stopped = True
        if sup.coordinator and not sup.settings.has_client:
            sup.coordinator.remove_scheduler_file()  # no new client while it closes
        say(f"time limit: {self._limit()}; stopped {self._before(now)}: {self._what()} "
            f"(status {TIME_LIMIT})")
        sup.stop(TIME_LIMIT, SIGNALLED)

    def _limit(self) -> str:
        if self.end is None:
            return f"{self.source}"
        at = time.strftime("%H:%M:%S", time.localtime(self.end))
        return f"the allocation ends at {at} ({self.source})"

    def _before(self, now: float) -> str:
        if self.end is None:
            return f"{self.grace - self.teardown:.0f} s after it"
        return f"{self.end - now:.0f} s before it"

    def _what(self) -> str:
        s = self.sup.settings
        parts = ["the script"] if s.has_client else []
        if s.scheduler:
            parts.append("the scheduler")
        n = self.workers
        parts.append(f"{n} worker{'s' if n != 1 else ''}" + ("" if s.scheduler else
                                                             " (joined)"))
        return ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]


def stagger(job: str | None, spread: float) -> float:
    """Seconds to wait before retiring: derived from the job id (the same for all its ranks,
    different between join jobs), within half of ``spread``."""
    if spread <= 0:
        return 0.0
    fraction = (zlib.crc32(str(job or "").encode()) % 1000) / 1000
    return fraction * spread / 2


def _signal_one(pid: int, signum: int) -> None:
    """The process alone (a role leads its group: the script's own subprocesses must not
    get a signal they do not expect)."""
    try:
        os.kill(pid, signum)
    except OSError:
        pass
