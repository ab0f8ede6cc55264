"""The life of a rank: check, start its roles, watch them, stop in order, agree on the status.

Every rank runs one :class:`Supervisor`. It forks a process per role (``process.py``) and
then only polls: its children's pipes and exit statuses, MPI control messages
(``control.py``) and signals. Nothing waits without a bound:

* a failure anywhere (a role that cannot start, a rank's child that dies, a timeout) is sent
  to rank 0, which prints it once and tells every rank to stop;
* stopping is ordered (client, then workers, then the scheduler) so a normal end prints no
  connection noise, and every step has a grace period after which the child is killed;
* the job's exit status is agreed by all ranks in a bounded ``Iallreduce`` (failure >
  script's own status > signal > normal), then MPI is finalized so the launcher reports it
  unchanged; a rank that does not join in time gets the whole job aborted instead.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import sys
import time

from . import process, roles
from .control import FAILED, NORMAL, SCRIPT, SIGNALLED, Control
from .errors import LaunchError
from .layout import CLIENT, SCHEDULER, WORKER
from .security import security_from
from .settings import (
    Settings,
    check_interface,
    check_scheduler_file,
    check_script,
    check_worker_class,
)

PREFIX = "dask-mpi-launch"


class BecomeClient(BaseException):
    """Raised in the forked client process of ``initialize()`` to unwind into the script."""

    def __init__(self, address: str, credentials: dict | None):
        super().__init__(address)
        self.address = address
        self.credentials = credentials


class _Stop(Exception):
    pass


def say(message: str) -> None:
    print(f"{PREFIX}: {message}", file=sys.stderr, flush=True)


def local_ranks(env=os.environ) -> int:
    """How many ranks of this job share this host, as the MPI launcher tells it (0: unknown,
    left to the batch system's variables)."""
    for key in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMIX_LOCAL_SIZE"):
        try:
            return max(1, int(env[key]))
        except (KeyError, ValueError):
            continue
    return 0


def _job_id(env=os.environ) -> str | None:
    for key in ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID"):
        if env.get(key):
            return env[key].split(".")[0]
    return None


class Supervisor:
    def __init__(self, settings: Settings, control, *, finalize: bool = True):
        """``control``: the messages between ranks (``Control`` over an MPI communicator,
        or ``FileControl`` without MPI)."""
        self.settings = settings
        self.control = control if hasattr(control, "poll") else Control(control)
        self.rank = self.control.rank
        self.size = self.control.size
        self.host = socket.gethostname()
        self.finalize = finalize
        self.layout = settings.layout_for(self.size)
        self.roles = self.layout.roles(self.rank)
        self.children: list[process.Child] = []
        self.outcome: tuple[int, int] | None = None  # (priority, status) once stopping
        self.signalled: int | None = None
        self.address: str | None = None
        self.identity: dict | None = None
        self.dashboard: str | None = None
        self.ready: dict[int, tuple] = {}  # on rank 0: worker rank -> (host, names)
        self.ready_children = 0
        self.all_ready = False
        self.closed: set[int] = set()
        self.reported = False  # rank 0 printed a failure already
        self.workers_started = False
        self.client_started = False
        self.scheduler_file_written = False
        self.check_failures: list[tuple] = []  # on rank 0, while checking
        self._worker_bodies: dict = {}  # label -> body, to restart a worker process
        self.restarts: dict[str, int] = {}  # label -> restarts so far
        self.name_prefix = settings.name
        self.scheduler_info: dict = {}  # address, host, interfaces of the scheduler's host
        self.hosts: dict[int, tuple] = {}  # on rank 0: rank -> (host, roles), for the banner
        self.banner_printed = False
        self.credentials: dict | None = None  # this job's TLS credentials (in memory)
        self.in_process_client = False  # initialize(exit=False): the client is this process

    # ------------------------------------------------------------------
    # the whole life

    def run(self) -> int:
        """Run this rank until the job ends; return the job's status, agreed by all ranks."""
        self._install_signal_handlers()
        try:
            self._check()
            if self.outcome is None:
                self._serve()
        except _Stop:
            pass
        except LaunchError as e:
            self._fail(self._role_name(), e.message, e.status)
        except Exception as e:  # a bug of ours: still one line, and every rank ends
            self._fail(self._role_name(), f"internal error: {type(e).__name__}: {e}")
        self._shutdown()
        return self._agree()

    # ------------------------------------------------------------------
    # checks: every rank checks what it will use; the first error is said once

    def _check(self) -> None:
        try:
            self.layout.check()
        except LaunchError as e:  # every rank knows: rank 0 says it plainly
            if self.rank == 0:
                say(f"error: {e.message}")
            self._decide(e.status, FAILED)
            return
        error = None
        try:
            s = self.settings
            check_interface(s.interface)
            if SCHEDULER in self.roles:
                check_scheduler_file(s.scheduler_file)
            if CLIENT in self.roles and not s.in_process:
                check_script(s)
            if WORKER in self.roles:
                check_worker_class(s.worker_class)
        except LaunchError as e:
            error = e
        if error is not None:
            self.control.send(0, "check-failed", self.rank, self.host, self._role_name(),
                              error.message, error.status)
        failed = self.control.allreduce_sum(
            int(error is not None), self.settings.startup_timeout, self._poll_quietly
        )
        if failed is None:
            self._abort(f"not every rank started within {self.settings.startup_timeout:g} s "
                        "(raise mpi-launch.startup-timeout if imports are slow here)", 1)
        if failed:
            # the same error is often found on many ranks: rank 0 says the first one, once
            deadline = time.monotonic() + 5.0
            while self.rank == 0 and len(self.check_failures) < failed:
                if time.monotonic() > deadline:
                    break
                self._poll_quietly()
            if self.check_failures:
                rank, host, role, text, _ = min(self.check_failures)
                more = len(self.check_failures) - 1
                if more:
                    text += f" (and {more} more rank{'s' if more > 1 else ''} failed too)"
                self._report(rank, host, role, text)
            self._decide(error.status if error else 2, FAILED)

    # ------------------------------------------------------------------
    # the event loop

    def _serve(self) -> None:
        s = self.settings
        start = time.monotonic()
        address_deadline = start + s.wait_timeout
        if self.rank != 0:  # rank 0 owns that deadline and says what went wrong
            address_deadline += 5 + s.shutdown_timeout
        ready_deadline = all_ready_at = None
        if SCHEDULER in self.roles:
            self._start_scheduler()
        joining = not self.settings.scheduler and self.rank == 0
        self.hosts[self.rank] = (self.host, self.roles)  # (others' may have arrived already)
        if self.rank != 0:
            self.control.send(0, "hello", self.rank, self.host, self.roles)
        while True:
            if joining and self.address is None:
                self._read_scheduler_file()
            # poll often while starting, less once everything runs (pipes and child exits
            # wake select at once; only MPI messages wait for the next poll)
            self._step(timeout=0.02 if self._running() else 0.005)
            now = time.monotonic()
            if self.address is None:
                if now > address_deadline and joining:
                    self._fail(self._role_name(),
                               f"the scheduler file {s.scheduler_file} did not appear within "
                               f"{s.wait_timeout:g} s (is the cluster's job running? raise "
                               "--wait-timeout to wait longer)")
                elif now > address_deadline:
                    who = "the scheduler" if SCHEDULER in self.roles else "rank 0"
                    self._fail(self._role_name(),
                               f"no scheduler address from {who} within {s.wait_timeout:g} s")
                continue
            if ready_deadline is None:
                ready_deadline = now + s.wait_timeout
            if WORKER in self.roles and not self.workers_started:
                self._start_workers()
            if self.rank == 0 and not self.all_ready:
                if len(self.ready) == len(self.layout.worker_ranks):
                    self._on_all_ready()
                    all_ready_at = now
                elif now > ready_deadline:
                    self._fail("scheduler", self._missing_workers_message())
            if self.rank == 0 and self.all_ready and not self.banner_printed:
                # every rank said where it runs (or 2 s passed): one block, once
                if len(self.hosts) == self.size or now > all_ready_at + 2:
                    self._print_banner()
            if CLIENT in self.roles and not self.client_started:
                if self.all_ready or not s.wait_for_workers:
                    self._start_client()

    def _running(self) -> bool:
        return (self.address is not None
                and (self.workers_started or WORKER not in self.roles)
                and (self.client_started or CLIENT not in self.roles)
                and (self.all_ready or self.rank != 0))

    def _step(self, timeout: float = 0.005, stop: bool = True) -> None:
        """Handle whatever happened: pipes, child exits, MPI messages, signals."""
        fds = [c.fd for c in self.children if c.fd >= 0]
        if fds:
            readable = select.select(fds, [], [], timeout)[0]
        else:
            readable = ()
            time.sleep(timeout)
        for child in list(self.children):
            if child.fd in readable:
                for event in child.read_events():
                    self._on_event(child, event)
        for child in list(self.children):
            if child.reap():
                self._on_exit(child)
        for message in self.control.poll():
            self._on_message(message)
        if self.signalled and self.outcome is None:
            status = 0 if not self.settings.has_client else 128 + self.signalled
            self._stop(status, SIGNALLED)
        if stop and self.outcome is not None:
            raise _Stop

    def _poll_quietly(self) -> None:
        self._step(timeout=0.001, stop=False)

    # ------------------------------------------------------------------
    # starting roles

    def _start_scheduler(self) -> None:
        s = self.settings
        if s.scheduler_file and os.path.exists(s.scheduler_file):
            os.unlink(s.scheduler_file)  # never leave an earlier job's file to be read
        if s.tls:
            from .security import new_credentials

            self.credentials = new_credentials()
        self._fork(SCHEDULER, "scheduler", lambda ch: roles.run_scheduler(
            s, ch, security=security_from(self.credentials)))

    def _read_scheduler_file(self) -> None:
        """Join mode: take the address from the scheduler file once it is there."""
        import json

        try:
            with open(self.settings.scheduler_file) as f:
                identity = json.load(f)
            address = identity["address"]
        except (OSError, ValueError, KeyError, TypeError):
            return  # not there yet (the wait is bounded by wait-timeout)
        if address.startswith("tls://"):
            from .security import directory_for, read_beside

            self.credentials = read_beside(self.settings.scheduler_file)
            if self.credentials is None:
                self._fail(self._role_name(), f"the cluster at {address} uses TLS, and its "
                           f"credentials are not readable in "
                           f"{directory_for(self.settings.scheduler_file)}")
                return
        # names must not clash with the cluster's own workers (named by their ranks)
        self._announce(address, identity, None,
                       name_prefix=self.settings.name or f"join{_job_id() or os.getpid()}")

    def _announce(self, address, identity, dashboard, name_prefix=None) -> None:
        """Rank 0 knows the scheduler's address: tell every rank, with what helps them
        connect (or explain why they cannot)."""
        from . import diagnose

        info = {"address": address, "identity": identity, "dashboard": dashboard,
                "name_prefix": name_prefix or self.settings.name,
                "host": self.host, "interfaces": diagnose.local_interfaces(),
                "credentials": self.credentials}
        if self.settings.scheduler and not self.settings.tls:
            say(f"warning: TLS is off: anyone who can reach {address} can run code as you "
                "on this cluster (drop --no-tls / --protocol tcp to secure it)")
        self._on_address(info)
        self.control.broadcast("address", info)

    def _on_address(self, info: dict) -> None:
        self.scheduler_info = info
        self.credentials = info.get("credentials")
        self.address, self.identity = info["address"], info["identity"]
        self.dashboard, self.name_prefix = info["dashboard"], info["name_prefix"]

    def _start_workers(self) -> None:
        s = self.settings
        self.workers_started = True
        nthreads, memory_limit = self._worker_resources()
        for i in range(s.worker_processes):
            name = s.worker_name(self.rank, i, self.name_prefix)
            self._worker_bodies[f"worker {name}"] = (
                lambda ch, name=name: roles.run_worker(
                    s, ch, self.address, name, nthreads, memory_limit,
                    security=security_from(self.credentials),
                    scheduler_info=self.scheduler_info))
            self._fork(WORKER, f"worker {name}", self._worker_bodies[f"worker {name}"])

    def _worker_resources(self):
        """Threads and memory per worker process: the options, else the batch job's share."""
        import psutil

        from .environment import detect_resources

        s = self.settings
        found = detect_resources(os.environ, local_ranks=local_ranks(),
                                 cpu_count=os.cpu_count() or 1,
                                 total_memory=psutil.virtual_memory().total,
                                 worker_processes=s.worker_processes)
        nthreads = s.nthreads or found.nthreads
        memory_limit = s.memory_limit
        if memory_limit == "auto" and found.memory_limit:
            memory_limit = found.memory_limit
        return nthreads, memory_limit

    def _start_client(self) -> None:
        s = self.settings
        self.client_started = True
        if self.in_process_client:
            raise BecomeClient(self.address, self.credentials)
        if s.in_process:
            child = process.fork(CLIENT, "script", None, returns=True)
            if child is None:  # in the new process: go back to the calling script
                raise BecomeClient(self.address, self.credentials)
            self.children.append(child)
            return
        if s.jupyter:
            from .jupyter import run_jupyter

            self._fork(CLIENT, "jupyter", lambda ch: run_jupyter(
                s, ch, self.address, self.credentials, self.scheduler_info))
            return
        self._fork(CLIENT, "script",
                   lambda ch: roles.run_script(s, ch, self.address, self.credentials))

    def _fork(self, role: str, label: str, body) -> None:
        self.children.append(process.fork(role, label, body))

    def monitor(self, close) -> None:
        """initialize(exit=False) on the client rank: serve MPI messages in a thread until
        ``close`` is set (send_close_signal()) or the job stops; then stop everyone."""
        import _thread

        while not close.is_set() and self.outcome is None:
            self._step(timeout=0.02, stop=False)
        if self.outcome is None:
            self._stop(0, NORMAL)
        elif self.outcome[0] == FAILED:
            _thread.interrupt_main()  # KeyboardInterrupt in the script: the job failed
        deadline = time.monotonic() + 1.0
        while self.control._sends and time.monotonic() < deadline:
            self._step(timeout=0.005, stop=False)

    # ------------------------------------------------------------------
    # what children say

    def _on_event(self, child: process.Child, event: dict) -> None:
        kind = event.get("event")
        if kind == "error":
            self._fail(child.role, event.get("message", "unknown error"))
        elif kind == "address" and child.role == SCHEDULER:
            self._announce(event["address"], event.get("identity"), event.get("dashboard"))
        elif kind == "jupyter" and child.role == CLIENT:
            self.control.send(0, "jupyter", event["url"])
        elif kind == "ready" and child.role == WORKER:
            self.ready_children += 1  # restarted workers count again: == fires once
            if self.ready_children == self.settings.worker_processes:
                names = [c.label.split(" ", 1)[1] for c in self.children if c.role == WORKER]
                self.control.send(0, "ready", self.rank, self.host, names)

    def _on_exit(self, child: process.Child) -> None:
        child.close_pipe()
        if self.outcome is not None:
            return
        status = child.status
        if child.role == CLIENT:
            if status > 128 and status - 128 in (signal.SIGKILL, signal.SIGSEGV, signal.SIGBUS,
                                                 signal.SIGABRT):
                self._fail(CLIENT, f"the script {process.describe_status(status)}",
                           status, SCRIPT)
            else:
                self._stop(status, SCRIPT)
        elif status == 0 and child.role == SCHEDULER and not self.settings.has_client:
            self._stop(0, NORMAL)  # cluster-only mode: a client shut the scheduler down
        elif status == 0:
            # closed by Dask itself (client.shutdown(), retire_workers): fine; in join mode
            # the rank is done once all its workers are
            if not self.settings.scheduler and not any(c.alive for c in self.children):
                self._stop(0, NORMAL)
        elif child.role == WORKER and self.restarts.get(child.label, 0) < self.settings.worker_restarts:
            self._restart(child)
        else:
            self._fail(child.role, f"the {child.label} process {process.describe_status(status)}")

    def _restart(self, child: process.Child) -> None:
        """A worker process died (OOM killer, SIGKILL...): start it again, same name."""
        n = self.restarts[child.label] = self.restarts.get(child.label, 0) + 1
        say(f"{child.label} (rank {self.rank}, host {self.host}) "
            f"{process.describe_status(child.status)}: restarting it "
            f"({n} of {self.settings.worker_restarts})")
        self.children.remove(child)
        self._fork(WORKER, child.label, self._worker_bodies[child.label])

    # ------------------------------------------------------------------
    # what other ranks say

    def _on_message(self, message: tuple) -> None:
        kind, *fields = message
        if kind == "address":
            self._on_address(fields[0])
        elif kind == "ready":
            rank, host, names = fields
            self.ready[rank] = (host, names)
        elif kind == "all-ready":
            self.all_ready = True
        elif kind == "fail":
            rank, host, role, text, status, priority = fields
            self._report(rank, host, role, text)
            self._stop(status, priority)
        elif kind == "stop":
            self._decide(*fields)
        elif kind == "closed":
            self.closed.add(fields[0])
        elif kind == "hello":
            rank, host, roles = fields
            self.hosts[rank] = (host, tuple(roles))
        elif kind == "jupyter":
            if not self.settings.quiet:
                from .banner import jupyter_lines

                print(jupyter_lines(fields[0], self.settings.login_host), flush=True)
        elif kind == "check-failed":
            self.check_failures.append(tuple(fields))

    def _on_all_ready(self) -> None:
        self.all_ready = True
        client = self.layout.client_rank
        if client is not None and client != self.rank:
            self.control.send(client, "all-ready", len(self.ready))
        if self.settings.scheduler_file and self.settings.scheduler:
            self._write_scheduler_file()

    def _print_banner(self) -> None:
        self.banner_printed = True
        if not self.settings.quiet:
            from .banner import render

            s = self.settings
            print(render({
                "mode": "join" if not s.scheduler else "script" if s.has_client else "cluster",
                "address": self.address, "dashboard": self.dashboard,
                "dashboard_wanted": s.dashboard,
                "workers": sum(len(names) for _, names in self.ready.values()),
                "ranks": self.hosts, "scheduler_file": s.scheduler_file if s.scheduler else None,
                "login_host": s.login_host,
            }), flush=True)

    def _write_scheduler_file(self) -> None:
        import json

        path = self.settings.scheduler_file
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.identity or {"address": self.address}, f, indent=2)
        if self.credentials:  # first: a reader seeing the file finds them
            from .security import write_beside

            write_beside(path, self.credentials)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
        self.scheduler_file_written = True

    def _missing_workers_message(self) -> str:
        missing = [r for r in self.layout.worker_ranks if r not in self.ready]
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        return (f"{len(missing)} of {len(self.layout.worker_ranks)} worker ranks did not connect "
                f"to the scheduler at {self.address} within {self.settings.wait_timeout:g} s "
                f"(ranks {shown}); check --interface, or raise --wait-timeout")

    # ------------------------------------------------------------------
    # deciding to stop

    def _decide(self, status: int, priority: int) -> None:
        if self.outcome is None or priority > self.outcome[0]:
            self.outcome = (priority, status)

    def _stop(self, status: int, priority: int) -> None:
        first = self.outcome is None
        self._decide(status, priority)
        if first:
            self.control.broadcast("stop", status, priority)

    def _fail(self, role: str, text: str, status: int = 1, priority: int = FAILED) -> None:
        """Report a failure of this rank: rank 0 says it once and stops everyone."""
        if self.rank == 0:
            self._report(0, self.host, role, text)
            self._stop(status, priority)
        else:
            self._decide(status, priority)
            self.control.send(0, "fail", self.rank, self.host, role, text, status, priority)

    def _report(self, rank: int, host: str, role: str, text: str) -> None:
        if self.reported:
            return
        self.reported = True
        say(f"error on rank {rank} ({role}, host {host}): {text}")

    def _role_name(self) -> str:
        return "+".join(self.roles)

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            if self.signalled is None:
                self.signalled = signum

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, handler)

    # ------------------------------------------------------------------
    # stopping, in order: client, workers, then the scheduler

    def _shutdown(self) -> None:
        grace = self.settings.shutdown_timeout
        self._terminate([c for c in self.children if c.role == CLIENT], grace)
        workers = [c for c in self.children if c.role == WORKER]
        if workers:
            self._terminate(workers, grace)
        if WORKER in self.roles and self.rank != 0:
            self.control.send(0, "closed", self.rank)
        scheduler = [c for c in self.children if c.role == SCHEDULER]
        if scheduler:
            others = set(self.layout.worker_ranks) - {0}
            deadline = time.monotonic() + grace
            while not others <= self.closed and time.monotonic() < deadline:
                if not scheduler[0].alive:
                    break
                self._poll_quietly()
            self._terminate(scheduler, grace)
        if self.scheduler_file_written:
            from .security import remove_beside

            try:
                os.unlink(self.settings.scheduler_file)
            except OSError:
                pass
            remove_beside(self.settings.scheduler_file)

    def _terminate(self, children, grace: float) -> None:
        signum = signal.SIGINT if self.signalled == signal.SIGINT else signal.SIGTERM
        for child in children:
            child.signal(signum)
        deadline = time.monotonic() + grace
        while any(c.alive for c in children):
            if time.monotonic() > deadline:
                for child in children:
                    child.signal(signal.SIGKILL)
                deadline = float("inf")
            self._poll_quietly()

    # ------------------------------------------------------------------
    # the job's status

    def _agree(self) -> int:
        priority, status = self.outcome or (NORMAL, 0)
        if not self.finalize:
            return status
        timeout = 2 * self.settings.shutdown_timeout + 5
        agreed = self.control.allreduce_max(priority * 256 + status, timeout, self._poll_quietly)
        if agreed is None:
            self._abort(f"other ranks did not end within {timeout:g} s", status or 1)
        status = agreed % 256
        self.control.finish()
        self.control.finalize()
        return status

    def _abort(self, text: str, status: int) -> None:
        say(f"rank {self.rank} (host {self.host}): {text}: aborting the job")
        for child in self.children:
            child.signal(signal.SIGKILL)
        self.control.abort(status)
