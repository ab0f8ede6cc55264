"""The record of a job (``--record DIR``): what happened, kept after the job, in one place.

In DIR: a log per rank and role (``rank-0.scheduler.log``, ``rank-2.worker.log``,
``rank-1.script.log``: the output still goes where it went, and is copied there by the
roles themselves, ``roles/record_output.py``), ``report.html`` (Dask's performance report
of the script's run, made by the scheduler as it closes) and ``summary.json``, written
here by rank 0 once the job's status is agreed: the job id, ranks, hosts and roles, the
start, ready and end times, each rank's status and its role processes' ends (status,
peak memory, bytes sent, restarts), why the job ended and, for a failed job, the rank and
role that failed first.

How the facts reach rank 0: each rank sends one ``RankRecord`` message over the control
plane once its roles stopped, before the status is agreed (so every rank that joins the
agreement has sent it); rank 0 waits for those still in flight for at most two seconds
after the agreement, and a rank that never answered is listed as missing: never a hang.

A record never fails a job and never slows it: DIR is made 0700 (a directory others can
write is refused: ``security/trust.py``), and whatever cannot be written (a read-only or
full file system) is one warning line on rank 0, the job's status unchanged. Every write
happens after the work: the copies of the output run beside the roles in processes of
their own, the report and the summary at the end.
"""
from __future__ import annotations

import json
import os
import time

from dask_mpi_launch.base.layout import CLIENT, WORKER
from dask_mpi_launch.base.messages import RankRecord
from dask_mpi_launch.base.status import FAILED, NORMAL, SCRIPT, SIGNALLED, TIME_LIMIT, say
from dask_mpi_launch.process.children import descendants
from dask_mpi_launch.roles.record_output import TITLE, log_name
from dask_mpi_launch.security import trust

#: why a job ended, by the priority of its agreed outcome (base/status.py)
ENDED_BY = {NORMAL: "the cluster was closed", SIGNALLED: "a signal",
            SCRIPT: "the script ended", FAILED: "a failure"}
WAIT_FOR_RANKS = 2.0  # seconds rank 0 waits, after the agreement, for facts in flight


def prepare(path: str) -> str | None:
    """Make ``path`` (0700) or check it is ours and private; why not, or None."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.close(trust.open_private_dir(path, create=True))
    except trust.Unsafe as e:
        return f"{path} {e}: choose a directory only you can write"
    except OSError as e:
        return f"{path}: {e.strerror or e}"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable (a read-only file system?)"
    return None


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


def child_facts(child, rank: int, restarts: int) -> dict:
    """One role process as the summary shows it."""
    ended = child.ended
    stats = getattr(child, "stats", None) or {}
    peak = max(getattr(child, "peak_memory", 0) or 0, stats.get("peak_memory", 0) or 0)
    return {"rank": rank, "role": child.role, "label": child.label, "pid": child.pid,
            "status": ended.status if ended else None,
            "ended": ended.describe() if ended else "still running",
            "left": child.left, "restarts": restarts, "peak_memory": peak or None,
            "bytes_sent": stats.get("bytes_sent")}


class NoRecord:
    """Without --record: the supervisor's calls do nothing (so it needs no ``if``)."""

    def __bool__(self) -> bool:
        return False

    def add(self, m) -> None: ...
    def failed(self, rank, host, role, text) -> None: ...
    def send(self) -> None: ...
    def drain(self) -> None: ...
    def write(self, agreed) -> None: ...


def for_job(sup):
    """The rank's recorder: a :class:`Recorder` with --record, else a :class:`NoRecord`."""
    return Recorder(sup) if sup.settings.record else NoRecord()


class Recorder:
    """A rank's part of the record (every rank); rank 0 also gathers and writes."""

    def __init__(self, sup):
        self.sup = sup
        self.dir = sup.settings.record
        self.started = time.time()
        self.problem = prepare(self.dir)
        self.facts: dict[int, dict] = {}
        self.failure: dict | None = None
        if self.problem is None:
            sup.children.log = self.log_path
        elif sup.rank == 0:
            say(f"warning: no record of this job: {self.problem}")

    def log_path(self, label: str) -> str:
        name = log_name(self.sup.rank, label, self.sup.settings.worker_processes)
        return os.path.join(self.dir, name)

    # -- every rank ----------------------------------------------------------
    def mine(self) -> dict:
        sup = self.sup
        fam = sup.children
        children = [*getattr(fam, "gone", ()), *fam]
        return {"rank": sup.rank, "host": sup.host, "roles": list(sup.roles),
                "proposed_status": sup.outcome.status,
                "children": [child_facts(c, sup.rank, fam.restarts.get(c.label, 0))
                             for c in children],
                "record": "ok" if self.problem is None else self.problem}

    def send(self) -> None:
        """Once this rank's roles stopped: its facts to rank 0."""
        if self.sup.rank == 0:
            self.facts[0] = self.mine()
        else:
            self.sup.control.send(0, *RankRecord(self.sup.rank, self.mine()))

    def add(self, m: RankRecord) -> None:
        self.facts[m.rank] = m.facts

    def failed(self, rank: int, host: str, role: str, text: str) -> None:
        """Rank 0 heard of a failure (the first one is the one the summary names)."""
        if self.failure is None:
            self.failure = {"rank": rank, "host": host, "role": role, "message": text}

    def drain(self) -> None:
        drain()

    # -- rank 0 --------------------------------------------------------------
    def write(self, agreed: int | None) -> None:
        """After the agreement (``agreed``: its raw value, None if ranks did not join):
        summary.json, and the one line naming the record. Never raises."""
        if self.sup.rank != 0 or self.problem is not None:  # said once, at the start
            return
        try:
            self._gather(agreed is not None)
            summary = self.summary(agreed)
            _write_json(os.path.join(self.dir, "summary.json"), summary)
            say(f"record of this job: {self.dir} (summary.json, "
                f"{len(summary['logs'])} logs{', report.html' if summary['report'] else ''})")
        except OSError as e:
            say(f"warning: the record in {self.dir} is incomplete: {e.strerror or e}")
        except Exception as e:  # a record never fails a job
            say(f"warning: the record in {self.dir} is incomplete: {type(e).__name__}: {e}")

    def _gather(self, wait: bool) -> None:
        deadline = time.monotonic() + (WAIT_FOR_RANKS if wait else 0.0)
        control = self.sup.control
        while len(self.facts) < self.sup.size and time.monotonic() < deadline:
            for message in control.poll():
                if message and message[0] == RankRecord.KIND:
                    self.add(RankRecord(*message[1:]))
            time.sleep(0.005)

    def summary(self, agreed: int | None) -> dict:
        from dask_mpi_launch.process.coordinator import job_id

        sup = self.sup
        ended = time.time()
        priority = (agreed // 256) if agreed is not None else FAILED
        status = (agreed % 256) if agreed is not None else (sup.outcome.status or 1)
        ranks = [{**self.facts[r], "exit_status": status} if r in self.facts
                 else {"rank": r, "missing": True} for r in range(sup.size)]
        ready = getattr(sup.coordinator, "all_ready_at", None)
        listing = os.listdir(self.dir)
        return {
            "job_id": job_id(), "ranks": sup.size,
            "hosts": sorted({f["host"] for f in ranks if "host" in f}),
            "roles": {str(f["rank"]): f.get("roles") for f in ranks},
            "start": _iso(self.started),
            "ready": _iso(ended - (time.monotonic() - ready)) if ready else None,
            "end": _iso(ended), "seconds": round(ended - self.started, 3),
            "status": status, "ended_by": ENDED_BY.get(priority, f"priority {priority}"),
            "why": self.why(priority, status, agreed is None),
            "first_failure": self.first_failure(priority, status),
            "missing_ranks": [f["rank"] for f in ranks if f.get("missing")],
            **workers_summary(ranks),
            "rank_facts": ranks,
            "logs": sorted(n for n in listing if n.endswith(".log")),
            "report": "report.html" if "report.html" in listing else None,
        }

    def why(self, priority: int, status: int, lost: bool) -> str:
        if lost:
            return "ranks did not end in time: the job was aborted"
        if self.failure is not None and priority == FAILED:
            f = self.failure
            return f"rank {f['rank']} ({f['role']}, host {f['host']}): {f['message']}"
        if priority == SCRIPT:
            return f"the script ended with status {status}"
        if priority == SIGNALLED and status == TIME_LIMIT:
            return f"the job's time limit: it stopped itself before it (status {status})"
        if priority == SIGNALLED:
            return f"the job was signalled (status {status})"
        return f"{ENDED_BY.get(priority, f'priority {priority}')} (status {status})"

    def first_failure(self, priority: int, status: int) -> dict | None:
        """The rank and role that failed first: a failure rank 0 heard of, else the
        script's own failing status."""
        if self.failure is not None and priority >= SCRIPT:
            return self.failure
        if status and priority == SCRIPT:
            rank = self.sup.layout.client_rank
            facts = self.facts.get(rank, {})
            return {"rank": rank, "host": facts.get("host"), "role": CLIENT,
                    "message": f"the script ended with status {status}"}
        return None


def workers_summary(ranks: list) -> dict:
    """The workers' restarts, peak memory (bytes, by worker) and the bytes they moved."""
    workers = [c for f in ranks for c in f.get("children", ()) if c["role"] == WORKER]
    return {"worker_restarts": sum({c["label"]: c["restarts"] for c in workers}.values()),
            "peak_memory": {c["label"]: c["peak_memory"] for c in workers},
            "bytes_moved": sum(c["bytes_sent"] or 0 for c in workers)}


def drain(timeout: float = 1.0) -> None:
    """Let the copies of the roles' output below this process end (they end at the roles'
    end of file, a moment after them), so that none is taken for a process the job left
    running (the rank's, or the node zygote's, last look)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_title(p) == TITLE for p in descendants()):  # zombies left out
            return
        time.sleep(0.01)


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _write_json(path: str, data: dict) -> None:
    """Write ``path`` anew (0600, through a temporary name: a reader never sees half)."""
    directory, name = os.path.split(path)
    text = json.dumps(data, indent=1, default=str).encode()
    tmp = trust.temporary_name(name)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.close(trust.new_file(tmp, text, dir_fd))
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        trust.remove(tmp, dir_fd)
        raise
    finally:
        os.close(dir_fd)
