"""The roles' side of the time limit (``process/deadline.py`` is the rank's): a worker of a
join job retires when its rank says so; a script that let the warning end it says it."""
from __future__ import annotations

import asyncio
import traceback

from dask_mpi_launch.base.status import TIME_LIMIT, say
from dask_mpi_launch.hpc.time_limit import ROLE_SIGNAL


def retire_on_signal(server, name) -> None:
    """SIGUSR2 (from the rank; the batch system's SIGUSR1 is ignored: the rank leads) makes this
    worker ask the scheduler to retire it: the scheduler copies its data to the workers that
    stay, then closes it (``Scheduler.retire_workers``; a Nanny's worker is named the same).
    Without the scheduler's answer the worker stays, and the rank's stop ends it."""
    loop = asyncio.get_running_loop()
    tasks: list = []

    async def retire():
        try:
            await server.scheduler.retire_workers(names=[name], close_workers=True,
                                                  remove=True)
        except Exception as e:  # the scheduler is gone: the rank's stop follows
            say(f"worker {name} could not retire: {type(e).__name__}: {e}")

    def on_signal():
        if not tasks:
            tasks.append(asyncio.ensure_future(retire()))

    loop.add_signal_handler(ROLE_SIGNAL, on_signal)


def say_time_limit(e: BaseException) -> int:
    """The script did not catch ``TimeLimitReached``: one line saying where it was (its
    ``finally`` blocks ran), and the time-limit status."""
    frames = traceback.extract_tb(e.__traceback__)
    user = [f for f in frames if "/dask_mpi_launch/" not in f.filename]
    where = f" at {user[-1].filename}:{user[-1].lineno}" if user else ""
    say(f"time limit: the script ended at the warning{where} ({e}; catch "
        "dask_mpi_launch.TimeLimitReached, or register dask_mpi_launch.on_time_limit(fn), "
        f"to end it yourself) (status {TIME_LIMIT})")
    return TIME_LIMIT
