"""CHECKING, a rank's first phase: every rank checks what it will use (the layout of the
job, its options, the worker class) before anything starts; the first error is said once.
Every rank enters the same collective, whatever it found, so a rank with an error does not
leave the others waiting: the supervisor (``process/supervisor.py``) runs this."""
from __future__ import annotations

from dask_mpi_launch.base.errors import LaunchError
from dask_mpi_launch.base.layout import CLIENT, SCHEDULER, WORKER
from dask_mpi_launch.base.messages import CheckFailed
from dask_mpi_launch.base.status import FAILED, say
from dask_mpi_launch.configure.settings import (check_dashboard_host, check_interface,
                                                check_scheduler_file, check_script)


def check(sup) -> None:
    """Check this rank; a failure anywhere decides the job's outcome on every rank."""
    if not _layout_fits(sup):
        return
    error = _check_options(sup)
    if error is not None:
        sup.error = error
        sup.control.send(0, *CheckFailed(sup.rank, sup.host, sup.role_name,
                                         error.message, error.status))
    failed = sup.control.allreduce_sum(
        int(error is not None), sup.settings.startup_timeout, sup.poll_quietly)
    if failed is None:
        sup.abort(f"not every rank started within {sup.settings.startup_timeout:g} s "
                  "(raise mpi-launch.startup-timeout if imports are slow here)", 1)
    if failed:
        if sup.coordinator:
            sup.coordinator.report_check_failures(failed)
        sup.outcome.propose(error.status if error else 1, FAILED)  # max: the worst


def _layout_fits(sup) -> bool:
    try:
        sup.layout.check()
    except LaunchError as e:  # the same on every rank: rank 0 says it plainly
        if sup.rank == 0:
            say(f"error: {e.message}")
        sup.roles = ()  # no role runs, and no message goes to a rank outside the world
        sup.error = e
        sup.outcome.propose(e.status, FAILED)
        return False
    return True


def _check_options(sup) -> LaunchError | None:
    """This rank's options, for the roles it runs: the error found, or None."""
    try:
        s = sup.settings
        check_interface(s.interface)
        if SCHEDULER in sup.roles:
            check_scheduler_file(s.scheduler_file)
            check_dashboard_host(s)
        if CLIENT in sup.roles and not s.in_process:
            check_script(s)
        if WORKER in sup.roles:
            problem = sup.launcher.check("worker-class", s.worker_class)
            if problem:
                raise LaunchError(problem, 2)
    except LaunchError as e:
        return e
    except Exception as e:  # whatever it is, every rank enters the same collectives
        return LaunchError(f"internal error while checking: {type(e).__name__}: {e}")
    return None
