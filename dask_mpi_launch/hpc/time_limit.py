"""When the allocation ends: the batch system's word, or the user's ``--time-limit``.

Every batch job has a time limit; reaching it, the batch system sends SIGTERM and, 30 s
later (Slurm's KillWait), SIGKILL, mid-task. To end before that, the job must know its end.
Slurm 22.05 sets no variable with it, Grid Engine and PBS give the limit but not the end,
LSF gives the time left: one batch command answers each (``discover``), asked by rank 0
alone (a job of 1000 ranks must not ask slurmctld 1000 times) and shared with the others
(``process/deadline.py``), then put in the environment of every process the job starts
(:data:`END_VARIABLE`, seconds since the epoch), where :func:`time_left` reads it.

The parsers are pure (text in, seconds out): the tests give them real command outputs.
Standard library only: ``import dask_mpi_launch`` stays cheap and ``time_left()`` is a
dictionary look-up.
"""
from __future__ import annotations

import os
import re
import signal
import time

#: the allocation's end, seconds since the epoch, in every process of the job
END_VARIABLE = "DASK_MPI_LAUNCH_END"

#: the batch system's warning (SIGUSR1: srun and Slurm's --signal send it to every process of
#: the step, not only the ranks) and the rank's word to its roles (SIGUSR2: "warn the
#: script", "retire the worker"). The zygotes, and so the scheduler, ignore both; a worker
#: acts on SIGUSR2 alone, the script on either.
BATCH_SIGNAL, ROLE_SIGNAL = signal.SIGUSR1, signal.SIGUSR2
SIGNALS = (BATCH_SIGNAL, ROLE_SIGNAL)

# a batch command answers in ~20 ms; a slurmctld that does not answer must not delay the job
QUERY_TIMEOUT = 10.0


def time_left(env=os.environ, now=None) -> float | None:
    """Seconds left before the job's allocation ends (negative once past), or None when
    the end is unknown (no time limit found, or not in a dask-mpi-launch job)."""
    end = env.get(END_VARIABLE)
    if not end:
        return None
    try:
        return float(end) - (time.time() if now is None else now)
    except ValueError:
        return None


# ---------------------------------------------------------------------------
# durations


_CLOCK = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_duration(text) -> float:
    """Seconds of a time limit written as Slurm writes them: ``D-HH:MM:SS``, ``D-HH:MM``,
    ``D-HH``, ``HH:MM:SS``, ``MM:SS`` or ``MINUTES``; a number with a unit (``90s``,
    ``30m``, ``2h``) too. ValueError with the one line to show otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text) * 60
    else:
        seconds = _parse_text(str(text).strip())
    if not seconds > 0:
        raise ValueError(f"time limit {text!r} is not positive")
    return seconds


def _parse_text(text: str) -> float:
    unit = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text)
    if unit:
        return float(unit.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit.group(2)]
    m = _CLOCK.match(text)
    if not m:
        raise ValueError(f"time limit {text!r} is not D-HH:MM:SS, HH:MM:SS, MM:SS or minutes")
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        return int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    if len(parts) == 1:
        return parts[0] * 60.0  # minutes, as sbatch -t
    if len(parts) == 2:
        return parts[0] * 60.0 + parts[1]
    return parts[0] * 3600.0 + parts[1] * 60 + parts[2]


def clock(seconds: float) -> str:
    """``11:58:03`` (hours may pass 24: ``49:00:00``)."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------
# the batch systems' answers (pure)


def _local_epoch(text: str) -> float | None:
    """Slurm's ``2026-12-04T16:08:57`` (local time) as an epoch; None for Unknown, N/A."""
    from datetime import datetime

    try:
        return datetime.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None


def slurm_squeue_end(text: str) -> float | None:
    """``squeue -h -j ID -o %e``: the end time, one line (``Unknown`` when none)."""
    lines = text.strip().splitlines()
    return _local_epoch(lines[0]) if lines else None


def slurm_scontrol_end(text: str) -> float | None:
    """``scontrol show job ID``: its ``EndTime=`` (``Unknown`` for an unlimited job)."""
    m = re.search(r"\bEndTime=(\S+)", text)
    return _local_epoch(m.group(1)) if m else None


def _first_value(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text, re.MULTILINE)
    return m.group(1) if m else None


def sge_limit(text: str) -> float | None:
    """``qstat -j ID``: the job's run-time limit in seconds: its hard ``h_rt`` (SIGKILL),
    else its soft ``s_rt`` (SIGUSR1, the warning: process/deadline.py takes it as such when
    it comes). Values are seconds or ``HH:MM:SS``."""
    requests = " ".join(re.findall(r"^\s*(?:hard|soft) resource_list:\s*(.*)$", text, re.M))
    values = dict(re.findall(r"\b([hs]_rt)=([\d:]+)", requests))
    value = values.get("h_rt") or values.get("s_rt")  # the end is the hard limit
    return _sge_seconds(value) if value else None


def _sge_seconds(value: str) -> float:
    parts = [int(p or 0) for p in value.split(":")]
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + part
    return float(seconds)


def sge_start(text: str) -> float | None:
    """``qstat -j ID``: the start time (``start_time 1: 12/04/2026 16:07:57.123``), if said."""
    value = _first_value(r"^\s*start_time\s+(?:\d+:\s*)?(.+?)\s*$", text)
    if not value:
        return None
    from datetime import datetime

    for fmt in ("%m/%d/%Y %H:%M:%S.%f", "%m/%d/%Y %H:%M:%S", "%a %b %d %H:%M:%S %Y"):
        try:
            return datetime.strptime(value, fmt).timestamp()
        except ValueError:
            continue
    return None


def sge_list_start(text: str, job: str) -> float | None:
    """Plain ``qstat``: the running job's line says when it started (``submit/start at``,
    ``12/04/2026 16:18:44``); ``qstat -j`` of Grid Engine 8.1.9 does not."""
    m = re.search(rf"^\s*{re.escape(str(job))}\s+\S+\s+\S+\s+\S+\s+\w*r\w*\s+"
                  r"(\d\d/\d\d/\d{4} \d\d:\d\d:\d\d)", text, re.M)
    if not m:
        return None
    from datetime import datetime

    return datetime.strptime(m.group(1), "%m/%d/%Y %H:%M:%S").timestamp()


def pbs_time_left(text: str) -> float | None:
    """``qstat -f ID``: ``Resource_List.walltime`` less ``resources_used.walltime`` (the
    limit and what the job used: no clock of the server's to trust)."""
    limit = _first_value(r"^\s*Resource_List\.walltime\s*=\s*(\S+)", text)
    if limit is None:
        return None
    used = _first_value(r"^\s*resources_used\.walltime\s*=\s*(\S+)", text)
    return _sge_seconds(limit) - (_sge_seconds(used) if used else 0.0)


def lsf_time_left(text: str) -> float | None:
    """``bjobs -noheader -o time_left ID``: ``1:23 L`` (hours:minutes; ``-`` when no
    limit). LSF says minutes: the end is known within one."""
    m = re.search(r"^\s*(\d+):(\d{2})(?::(\d{2}))?\b", text, re.M)
    if not m:
        return None
    h, mi, s = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    return h * 3600.0 + mi * 60 + s


# ---------------------------------------------------------------------------
# asking the batch system (rank 0 only)


def _run(argv) -> str | None:
    import subprocess  # here: it imports threading, which the thin rank never needs

    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=QUERY_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def discover(env=os.environ, run=_run, now=None) -> tuple[float | None, str]:
    """(end as an epoch, where it came from) for this batch job, or (None, "") when there
    is no limit or no batch system answers. ``run(argv)`` gives a command's output."""
    now = time.time() if now is None else now
    if env.get("SLURM_JOB_ID"):
        end = _slurm(env["SLURM_JOB_ID"], run)
        if end is not None:
            return end, "Slurm"
    if env.get("PBS_JOBID"):
        left = pbs_time_left(run(["qstat", "-f", env["PBS_JOBID"]]) or "")
        if left is not None:
            return now + left, "PBS"
    if env.get("LSB_JOBID"):
        left = lsf_time_left(run(["bjobs", "-noheader", "-o", "time_left",
                                  env["LSB_JOBID"]]) or "")
        if left is not None:
            return now + left, "LSF"
    if env.get("JOB_ID") and env.get("SGE_ROOT"):
        text = run(["qstat", "-j", env["JOB_ID"]]) or ""
        limit = sge_limit(text)
        if limit is not None:
            start = sge_start(text) or sge_list_start(run(["qstat"]) or "", env["JOB_ID"])
            return (start or now) + limit, "Grid Engine"
    return None, ""


def _slurm(job: str, run) -> float | None:
    end = slurm_squeue_end(run(["squeue", "-h", "-j", job, "-o", "%e"]) or "")
    if end is None:
        end = slurm_scontrol_end(run(["scontrol", "show", "job", job]) or "")
    return end


# ---------------------------------------------------------------------------
# how long before the end: the warning (grace) and the stop (teardown)


def teardown_for(workers: int, shutdown_timeout: float) -> float:
    """Seconds kept for stopping: the client's and the scheduler's grace
    (2 x --shutdown-timeout), 5 s for the ranks to agree and finalize, and 20 ms a worker
    (the scheduler removes them one by one). Measured: a 16-rank job (14 workers) on 2
    loaded cores took 16-22 s from the stop to its exit; this gives 25.3 s."""
    return 2 * shutdown_timeout + 5.0 + 0.02 * workers


def grace_for(workers: int, shutdown_timeout: float, remaining: float | None,
              grace: float | None = None) -> tuple[float, float]:
    """(grace, teardown): warn the script ``grace`` seconds before the end, stop the job
    ``teardown`` seconds before it. The default grace is max(60 s, teardown + 30 s + 50 ms a
    worker: retiring workers moves their data); for a short job (``remaining`` seconds
    from now) grace is at most a quarter of it, and teardown at most half the grace."""
    teardown = teardown_for(workers, shutdown_timeout)
    if grace is None:
        grace = max(60.0, teardown + 30.0 + 0.05 * workers)
        if remaining is not None:
            grace = min(grace, remaining / 4)
    return grace, min(teardown, grace / 2)


# ---------------------------------------------------------------------------
# the warning, in the script's process


class TimeLimitReached(BaseException):
    """Raised in the script's main thread ``grace`` seconds before the allocation ends
    (when no :func:`on_time_limit` callback is registered). A BaseException, like
    KeyboardInterrupt: an ``except Exception`` of the script does not swallow it, its
    ``finally`` blocks run while the whole cluster is still up. Uncaught, the script ends
    with status 124 (base/status.py: TIME_LIMIT)."""


_CALLBACKS: list = []


def on_time_limit(fn):
    """Call ``fn()`` in the script's main thread when the time-limit warning comes, instead
    of raising :class:`TimeLimitReached` (e.g. to set a flag that a loop checks between
    steps). Returns ``fn``: usable as a decorator."""
    _CALLBACKS.append(fn)
    return fn


def _ignore(signum=None, frame=None) -> None:
    pass


def _warned(signum=None, frame=None) -> None:
    for signum in SIGNALS:  # once: a second signal changes nothing (not SIG_IGN: one
        signal.signal(signum, _ignore)  # already caught would raise "ignored due to race")
    if not _CALLBACKS:
        left = time_left()
        raise TimeLimitReached("the job's time limit is near" + (
            f": {left:.0f} s left" if left is not None else ""))
    for fn in list(_CALLBACKS):
        fn()


def install_warning() -> None:
    """In the script's process: SIGUSR2 from its rank (process/deadline.py), or SIGUSR1 from
    the batch system directly, is the warning."""
    for signum in SIGNALS:
        signal.signal(signum, _warned)


def export(end) -> None:
    """Put the allocation's end in this process's environment (and its children's)."""
    if end is not None:
        os.environ[END_VARIABLE] = repr(float(end))
