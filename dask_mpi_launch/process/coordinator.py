"""Rank 0's part of the job, beside its supervisor (``process/supervisor.py``), which
gives it the messages meant for rank 0 alone and asks it, each turn, what is due."""
from __future__ import annotations

import os
import time

from dask_mpi_launch.tuning import scale
from dask_mpi_launch.process import starting
from dask_mpi_launch.base.messages import AllReady, CheckFailed, Hello, Jupyter, Ready


def job_id(env=os.environ) -> str | None:
    """The batch job's id without its server part (PBS's ``123.server``), or None."""
    from dask_mpi_launch.hpc.launchers import job_id as launcher_job_id

    found = launcher_job_id(env)
    return found.split(".")[0] if found else None


class Coordinator:
    """Rank 0's part: it hears every rank, knows when all workers are connected, prints the
    banner, writes the scheduler file, and says failures once."""

    def __init__(self, supervisor):
        self.sup = supervisor
        self.ready: dict[int, tuple] = {}  # worker rank -> (host, names)
        self.hosts: dict[int, tuple] = {}  # rank -> (host, roles), for the banner
        self.check_failures: list[tuple] = []
        self.all_ready_at: float | None = None
        self.ready_deadline: float | None = None
        self.banner_done = False
        self.file_written = False

    def starting(self) -> None:
        sup = self.sup
        self.hosts[0] = (sup.host, sup.roles)

    def advance(self, now: float) -> None:
        sup, s = self.sup, self.sup.settings
        if self.ready_deadline is None:
            self.ready_deadline = now + s.wait_timeout
        if not (self.file_written or s.wait_for_workers) and s.scheduler_file and s.scheduler:
            self._write_scheduler_file()  # as dask-mpi does: once the scheduler listens
        if self.all_ready_at is None:
            if len(self.ready) == len(sup.layout.worker_ranks):
                self._all_ready(now)
            elif now > self.ready_deadline:
                sup.fail("scheduler", self._missing_workers())
        elif not self.banner_done:
            # every rank said where it runs (or 2 s passed): one block, once
            if len(self.hosts) == sup.size or now > self.all_ready_at + 2:
                self._banner()

    def on_message(self, m) -> None:
        if isinstance(m, Ready):
            self.ready[m.rank] = (m.host, m.names)
        elif isinstance(m, Hello):
            self.hosts[m.rank] = (m.host, tuple(m.roles))
        elif isinstance(m, CheckFailed):
            self.check_failures.append(m.encode()[1:])
        elif isinstance(m, Jupyter):
            if not self.sup.settings.quiet:
                from dask_mpi_launch.base.banner import jupyter_lines

                print(jupyter_lines(m.url, self.sup.settings.login_host), flush=True)

    def report_check_failures(self, failed: int) -> None:
        """The same error is often found on many ranks: say the lowest rank's, once."""
        deadline = time.monotonic() + 5.0
        while len(self.check_failures) < failed and time.monotonic() < deadline:
            self.sup.poll_quietly()
        if self.check_failures:
            rank, host, role, text, _ = min(self.check_failures)
            more = len(self.check_failures) - 1
            if more:
                text += f" (and {more} more rank{'s' if more > 1 else ''} failed too)"
            self.sup.report(rank, host, role, text)

    def read_scheduler_file(self) -> None:
        """Join mode: take the address from the scheduler file once it is there, if it is
        the user's own (another user's file, or credentials, would make this job join their
        cluster: refused with one line, ``scheduler_file.py``)."""
        from dask_mpi_launch.security import scheduler_file

        sup = self.sup
        path = sup.settings.scheduler_file
        identity = scheduler_file.read(path)
        if identity is None:
            return  # not there yet (the wait is bounded by wait-timeout)
        address = identity["address"]
        if address.startswith("tls://"):
            sup.credentials = scheduler_file.read_credentials(path)
            if sup.credentials is None:
                sup.fail(sup.role_name, f"the cluster at {address} uses TLS, and its "
                         f"credentials are not readable in "
                         f"{scheduler_file.credentials_directory(path)}")
                return
        # names must not clash with the cluster's own workers (named by their ranks)
        starting.announce(sup, address, identity, None,
                          name_prefix=sup.settings.name or f"join{job_id() or os.getpid()}")

    def _all_ready(self, now: float) -> None:
        sup = self.sup
        self.all_ready_at = now
        client = sup.layout.client_rank
        if client is not None:
            if client == 0:
                sup.cluster["all_ready"] = True
            else:
                sup.control.send(client, *AllReady(len(self.ready)))
        if sup.settings.scheduler_file and sup.settings.scheduler and not self.file_written:
            self._write_scheduler_file()

    def _banner(self) -> None:
        self.banner_done = True
        sup, s = self.sup, self.sup.settings
        if not s.quiet:
            from dask_mpi_launch.base.banner import render

            print(render({
                "mode": "join" if not s.scheduler else "script" if s.has_client else "cluster",
                "address": sup.address, "dashboard": sup.cluster.get("dashboard"),
                "dashboard_wanted": s.dashboard,
                "workers": sum(len(names) for _, names in self.ready.values()),
                "ranks": self.hosts, "scheduler_file": s.scheduler_file if s.scheduler else None,
                "login_host": s.login_host,
                "end": sup.deadline.end, "end_source": sup.deadline.source,
            }), flush=True)
            if sup.tuning:  # the defaults changed for a big job, and how to choose
                print(f"  tuning     {scale.describe(sup.tuning)}", flush=True)

    def _write_scheduler_file(self) -> None:
        """Publish the scheduler file and its credentials (made on the scheduler's rank)
        beside it; the file stays locked by this process until the end: a second job given
        the same path is refused while this one lives (``scheduler_file.py``)."""
        from dask_mpi_launch.security import scheduler_file

        sup = self.sup
        self.published = scheduler_file.publish(
            sup.settings.scheduler_file, sup.cluster.get("identity") or {"address": sup.address},
            sup.cluster.get("credentials"))
        self.file_written = True

    def remove_scheduler_file(self) -> None:
        """Remove what this job published, if it is still what it made."""
        if getattr(self, "published", None) is not None:
            from dask_mpi_launch.security import scheduler_file

            scheduler_file.remove(self.published)
            self.published = None

    def _missing_workers(self) -> str:
        sup = self.sup
        missing = [r for r in sup.layout.worker_ranks if r not in self.ready]
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        return (f"{len(missing)} of {len(sup.layout.worker_ranks)} worker ranks did not "
                f"connect to the scheduler at {sup.address} within "
                f"{sup.settings.wait_timeout:g} s (ranks {shown}); check --interface, or "
                "raise --wait-timeout")
