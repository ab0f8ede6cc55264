"""The life of a rank: check, start its roles, watch them, stop in order, agree on the status.

Every rank runs one :class:`Supervisor`. It asks its launcher (``process/zygote.py``) for a process
per role and then only watches: its children's pipes and wait statuses, the messages of the
other ranks (``control/over_mpi.py``) and signals. Nothing waits without a bound:

* a failure anywhere (a role that cannot start, a rank's child that dies, a timeout) is sent
  to rank 0, which prints it once and tells every rank to stop;
* stopping is ordered (client, then the scheduler, whose close ends the workers, then the
  workers it left) so a normal end prints no connection noise and costs the scheduler
  O(workers); every step has a grace period after which the role's process group is
  killed;
* the job's exit status (``status.Outcome``) is agreed by all ranks in a bounded all-reduce,
  then MPI is finalized so the launcher reports it unchanged; a rank that does not join in
  time gets the whole job aborted instead.

The phases, in order: CHECKING (every rank checks its options; errors are said once), STARTING
(scheduler, then the address to every rank, then workers, then the client once all workers
are connected), RUNNING, STOPPING. The supervisor keeps the rank's state and its phase; the
steps live beside it in ``process/``: ``checking.py`` (CHECKING), ``starting.py`` (what each
role is started with, and the address announced), ``child_events.py`` (what children say and
how they end), ``stopping.py`` (STOPPING, in order) and, on rank 0, ``coordinator.py``.
"""
from __future__ import annotations

import enum
import os
import select
import signal
import socket
import time

from dask_mpi_launch.tuning import scale
from dask_mpi_launch.process import checking, child_events, starting
from dask_mpi_launch.process import job_record
from dask_mpi_launch.hpc import local_dir
from dask_mpi_launch.process.coordinator import Coordinator
from dask_mpi_launch.process.deadline import Deadline
from dask_mpi_launch.process.stopping import Stopping
from dask_mpi_launch.base.messages import (CONTROL, Address, AllReady, Closed, Fail,
                                            Hello, RankRecord, SchedulerClosed, Stdin, Stop,
                                            decode)
from dask_mpi_launch.base.messages import Deadline as DeadlineMessage
from dask_mpi_launch.process.children import Family, StdinRelay, read_stdin
from dask_mpi_launch.control.over_mpi import ControlPlane
from dask_mpi_launch.base.errors import LaunchError
from dask_mpi_launch.base.layout import CLIENT, SCHEDULER, WORKER
from dask_mpi_launch.base.record import replace
from dask_mpi_launch.configure.settings import Settings
from dask_mpi_launch.base.status import FAILED, NORMAL, SIGNALLED, Outcome, say

# seconds between looks at MPI while starting/stopping, and while running (child pipes
# and exits wake the loop at once; only messages from other ranks wait for the next look)
BUSY_POLL, IDLE_POLL = 0.005, 0.02


class Phase(enum.Enum):
    CHECKING = "checking"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


class _Stop(Exception):
    pass


def _open_mpi(env=os.environ) -> bool:
    return "OMPI_COMM_WORLD_SIZE" in env


class Supervisor:
    def __init__(self, settings: Settings, control: ControlPlane, launcher, *,
                 finalize: bool = True, client_in_process: bool = False):
        """``control``: messages between ranks (over MPI, or files without MPI);
        ``launcher``: starts role processes (the zygote, or a fork of this process);
        ``client_in_process``: initialize(exit=False): the client is the calling script,
        in this very process (its children are then the only ones we wait for)."""
        self.layout = settings.layout_for(control.size)
        n_workers = len(self.layout.worker_ranks) * settings.worker_processes
        self.tuning = scale.for_job(n_workers, settings.explicit)  # big jobs: see tuning/scale.py
        settings = replace(settings, **scale.settings_overrides(self.tuning))
        self.rank, self.size = control.rank, control.size
        settings = local_dir.settle(settings, self.layout, self.rank)  # spill on the node
        self.settings = settings
        self.control = control
        self.launcher = launcher
        self.finalize = finalize
        self.client_in_process = client_in_process
        self.host = socket.gethostname()
        self.roles = self.layout.roles(self.rank)
        self.scheduler_rank = getattr(self.layout, "scheduler_rank", 0)
        self.phase = Phase.CHECKING
        self.outcome = Outcome()
        self.error: LaunchError | None = None  # the first failure, for initialize(exit=False)
        self.signalled: int | None = None
        self.children = Family(launcher, settings, reap_orphans=not client_in_process,
                               config=self.tuning)
        self.cluster: dict = {}  # what rank 0 announced: address, credentials, ...
        self.credentials: dict | None = None
        self.stdin_relay: StdinRelay | None = None
        self.relay_stdin = False  # rank 0 forwards the job's stdin to the client's rank
        self.workers_ready = 0  # this rank's worker processes that connected
        self.started: set[str] = set()  # "workers", "client" once asked to start
        self.coordinator = Coordinator(self) if self.rank == 0 else None
        self.reported = False
        self.closed: set[int] = set()  # the client's rank once done (on the scheduler's)
        self.scheduler_closed = False  # the scheduler's rank closed it (on worker ranks)
        self.deadline = Deadline(self)  # the time limit: warn, retire, stop before it
        self.record = job_record.for_job(self)  # --record: process/job_record.py

    # ------------------------------------------------------------------
    # the whole life

    def run(self) -> int:
        """Run this rank until the job ends; return the job's status, agreed by all ranks."""
        self._install_signal_handlers()
        try:
            checking.check(self)  # CHECKING
            if not self.outcome.decided:
                self._serve()
        except _Stop:
            pass
        except LaunchError as e:
            self.fail(self.role_name, e.message, e.status, error=e)
        except Exception as e:  # a bug of ours: still one line, and every rank ends
            self.fail(self.role_name, f"internal error: {type(e).__name__}: {e}")
        self.shutdown()
        return self.agree()

    @property
    def role_name(self) -> str:
        return "+".join(self.roles)

    @property
    def address(self) -> str | None:
        return self.cluster.get("address")

    # ------------------------------------------------------------------
    # STARTING and RUNNING: the event loop

    def _serve(self) -> None:
        self.phase = Phase.STARTING
        address_deadline = time.monotonic() + self.settings.wait_timeout
        if self.rank != 0:  # rank 0 owns that deadline and says what went wrong
            address_deadline += 5 + self.settings.shutdown_timeout
        self._begin()
        while True:
            self.step(IDLE_POLL if self.phase is Phase.RUNNING else BUSY_POLL)
            now = time.monotonic()
            if self.address is None:
                self._await_address(now, address_deadline)
            else:
                self._start_what_is_due(now)

    def _begin(self) -> None:
        """The scheduler (if here), this rank's hello to rank 0, the stdin relay."""
        self.deadline.begin()  # rank 0 asks the batch system, before any role starts
        if SCHEDULER in self.roles:
            starting.start_scheduler(self)
        if self.coordinator:
            self.coordinator.starting()
        else:
            self.control.send(0, *Hello(self.rank, self.host, list(self.roles)))
        # launchers give the job's stdin to rank 0: it relays it to the client's rank
        # (Open MPI 5's mpirun never passes end-of-file on: there the client reads none)
        client = self.layout.client_rank
        relay = client not in (None, 0) and not self.settings.jupyter
        self.relay_stdin = relay and self.rank == 0 and not _open_mpi()
        if relay and self.rank == client:
            self.stdin_relay = StdinRelay()
            if _open_mpi():
                self.stdin_relay.feed("")

    def _await_address(self, now: float, deadline: float) -> None:
        if self.coordinator and not self.settings.scheduler:  # join mode
            self.coordinator.read_scheduler_file()
        if self.address is None and now > deadline:
            self._no_address()

    def _start_what_is_due(self, now: float) -> None:
        """Workers once the address is known, the client once they are all connected
        (or at once without --wait-for-workers); RUNNING once all this rank's are."""
        if WORKER in self.roles and "workers" not in self.started:
            starting.start_workers(self)
        if self.coordinator:
            self.coordinator.advance(now)
        if CLIENT in self.roles and "client" not in self.started:
            if self.cluster.get("all_ready") or not self.settings.wait_for_workers:
                starting.start_client(self)
        if self.phase is Phase.STARTING and self._all_started():
            self.phase = Phase.RUNNING

    def _all_started(self) -> bool:
        return ((WORKER not in self.roles or "workers" in self.started)
                and (CLIENT not in self.roles or "client" in self.started)
                and (self.coordinator is None or self.coordinator.banner_done))

    def _no_address(self) -> None:
        s = self.settings
        if not s.scheduler and self.rank == 0:
            self.fail(self.role_name, f"the scheduler file {s.scheduler_file} did not appear "
                      f"within {s.wait_timeout:g} s (is the cluster's job running? raise "
                      "--wait-timeout to wait longer)")
        else:
            who = "the scheduler" if SCHEDULER in self.roles else "rank 0"
            self.fail(self.role_name,
                      f"no scheduler address from {who} within {s.wait_timeout:g} s")

    def step(self, timeout: float = BUSY_POLL, stop: bool = True) -> None:
        """Handle whatever happened: pipes, child exits, MPI messages, signals, stdin."""
        readable, can_write = self._wait_for_io(timeout)
        self._on_children(readable)
        if 0 in readable and self.relay_stdin:
            self._forward_stdin()
        if can_write:
            self.stdin_relay.pump()
        for message in self.control.poll():
            self._on_message(decode(CONTROL, message))
        self.deadline.tick()
        if self.signalled and not self.outcome.decided:
            # a --jupyter session, like a cluster-only job, ends by a signal: 0
            self.stop(self.outcome.on_signal(
                self.signalled, self.settings.has_client and not self.settings.jupyter),
                SIGNALLED)
        if stop and self.outcome.decided:
            raise _Stop

    def _wait_for_io(self, timeout: float) -> tuple:
        """(readable, writable) of the children's pipes and stdin, within ``timeout``."""
        fds = self.children.fds()
        if self.relay_stdin:
            fds.append(0)
        writable = [self.stdin_relay.write_fd] if self.stdin_relay and self.stdin_relay.waiting \
            else []
        if not (fds or writable):
            time.sleep(timeout)
            return (), ()
        try:
            readable, can_write, _ = select.select(fds, writable, [], timeout)
        except (OSError, ValueError):
            readable, can_write = fds, writable
        return readable, can_write

    def _on_children(self, readable) -> None:
        for child, event in self.children.said(readable):
            child_events.on_event(self, child, event)
        for child, events in self.children.ended():
            for event in events:
                child_events.on_event(self, child, event)
            child_events.on_exit(self, child)

    def poll_quietly(self) -> None:
        self.step(timeout=0.001, stop=False)

    def _forward_stdin(self) -> None:
        text = read_stdin()
        if text is None:
            return
        self.control.send(self.layout.client_rank, *Stdin(text))
        if text == "":
            self.relay_stdin = False

    # ------------------------------------------------------------------
    # what other ranks say

    def _on_message(self, m) -> None:
        if isinstance(m, Address):
            self.cluster.update(m.info)
        elif isinstance(m, AllReady):
            self.cluster["all_ready"] = True
        elif isinstance(m, Fail):
            self.report(m.rank, m.host, m.role, m.message)
            self.stop(m.status, m.priority)
        elif isinstance(m, Stop):
            self.outcome.propose(m.status, m.priority)
        elif isinstance(m, Closed):
            self.closed.add(m.rank)
        elif isinstance(m, SchedulerClosed):
            self.scheduler_closed = True
        elif isinstance(m, DeadlineMessage):
            self.deadline.learn(m.end, m.source)
        elif isinstance(m, RankRecord):
            self.record.add(m)
        elif isinstance(m, Stdin) and self.stdin_relay is not None:
            self.stdin_relay.feed(m.text)
        elif self.coordinator:
            self.coordinator.on_message(m)

    # ------------------------------------------------------------------
    # deciding to stop

    def stop(self, status: int, priority: int) -> None:
        if self.outcome.propose(status, priority):
            self.control.broadcast(*Stop(status, priority))

    def fail(self, role: str, text: str, status: int = 1, priority: int = FAILED,
             error: LaunchError | None = None) -> None:
        """A failure seen on this rank: rank 0 says it once and stops everyone."""
        if self.error is None:
            self.error = error or LaunchError(text, status)
        if self.rank == 0:
            self.report(0, self.host, role, text)
            self.stop(status, priority)
        else:
            self.outcome.propose(status, priority)
            self.control.send(0, *Fail(self.rank, self.host, role, text, status, priority))

    def report(self, rank: int, host: str, role: str, text: str) -> None:
        self.record.failed(rank, host, role, text)
        if not self.reported:
            self.reported = True
            say(f"error on rank {rank} ({role}, host {host}): {text}")

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            if self.signalled is None:
                self.signalled = signum

        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, handler)
            self.deadline.install()
        except ValueError:  # not the main thread (tests run ranks in threads)
            pass

    # ------------------------------------------------------------------
    # STOPPING, in order: the client, then the scheduler, then the workers it left

    def shutdown(self) -> None:
        """Stop this rank's roles in order (process/stopping.py says why that order)."""
        self.phase = Phase.STOPPING
        Stopping(self).run()

    # ------------------------------------------------------------------
    # the job's status

    def agree(self) -> int:
        """The job's status, the same on every rank (bounded); then MPI is finalized."""
        timeout = 2 * self.settings.shutdown_timeout + 5
        self.record.send()  # this rank's facts, before the agreement (job_record.py)
        agreed = self.control.allreduce_max(self.outcome.encode(), timeout, self.poll_quietly)
        self.record.write(agreed)  # rank 0: summary.json, one line
        if agreed is None:
            self.abort(f"other ranks did not end within {timeout:g} s",
                       self.outcome.status or 1)
        status = Outcome.decode(agreed)
        self.control.finish()
        if self.finalize:
            self.control.finalize()
        return status

    def abort(self, text: str, status: int) -> None:
        say(f"rank {self.rank} (host {self.host}): {text}: aborting the job")
        self.children.kill_leftovers()
        self.control.abort(status)

    def monitor(self, close) -> None:
        """initialize(exit=False) on the client rank: serve in a thread until ``close`` is
        set (send_close_signal()) or the job stops; then stop this rank's roles in order and
        agree on the status with the other ranks."""
        import _thread

        while not close.is_set() and not self.outcome.decided:
            self.step(timeout=IDLE_POLL, stop=False)
        if not self.outcome.decided:
            self.stop(0, NORMAL)
        elif self.outcome.priority == FAILED:
            _thread.interrupt_main()  # KeyboardInterrupt in the script: the job failed
        self.shutdown()
        self.agree()
