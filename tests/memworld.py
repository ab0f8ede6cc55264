"""An in-memory MPI world for the supervisor's protocol (like dask-jobqueue's
``AsyncCommWorld``): every rank's Supervisor runs in a thread of the test, messages go
through queues (as JSON, the strictest control plane), collectives are checked to match, and
role processes are scripted fakes with real pipes. A whole job runs in milliseconds."""
from __future__ import annotations

import itertools
import json
import os
import queue
import signal
import threading
import time

from dask_mpi_launch.process.children import Child
from dask_mpi_launch.base.status import Ended


class Aborted(Exception):
    pass


class MemoryWorld:
    def __init__(self, size: int):
        self.size = size
        self.inboxes = [queue.Queue() for _ in range(size)]
        self.rounds: dict[int, dict[int, tuple]] = {}
        self.cond = threading.Condition()
        self.aborted: int | None = None

    def control(self, rank: int) -> "MemoryControl":
        return MemoryControl(self, rank)


class MemoryControl:
    def __init__(self, world: MemoryWorld, rank: int):
        self.world, self.rank, self.size = world, rank, world.size
        self._round = 0
        self.finalized = False

    def send(self, dest: int, *message) -> None:
        self.world.inboxes[dest].put(json.loads(json.dumps(message)))

    def broadcast(self, *message) -> None:
        for dest in range(self.size):
            if dest != self.rank:
                self.send(dest, *message)

    def poll(self) -> list:
        received = []
        while True:
            try:
                received.append(self.world.inboxes[self.rank].get_nowait())
            except queue.Empty:
                return received

    def flush(self, timeout: float) -> None:
        pass

    def _allreduce(self, op: str, value: int, timeout: float, poll):
        self._round += 1
        key = self._round
        with self.world.cond:
            self.world.rounds.setdefault(key, {})[self.rank] = (op, value)
            self.world.cond.notify_all()
        deadline = time.monotonic() + timeout
        while True:
            with self.world.cond:
                entries = dict(self.world.rounds[key])
                if len(entries) < self.size:
                    self.world.cond.wait(0.001)
            if len(entries) == self.size:
                break
            if time.monotonic() > deadline:
                return None
            if poll is not None:
                poll()
        ops = {o for o, _ in entries.values()}
        assert ops == {op}, f"ranks entered different collectives in round {key}: {entries}"
        values = [v for _, v in entries.values()]
        return max(values) if op == "max" else sum(values)

    def allreduce_max(self, value, timeout, poll=None):
        return self._allreduce("max", value, timeout, poll)

    def allreduce_sum(self, value, timeout, poll=None):
        return self._allreduce("sum", value, timeout, poll)

    def finish(self) -> None:
        pass

    def finalize(self) -> None:
        self.finalized = True

    def abort(self, status: int) -> None:
        self.world.aborted = status
        raise Aborted(status)


_pids = itertools.count(10_000_000)


class FakeChild(Child):
    """A role 'process': a real pipe, a behaviour in a thread, a scripted end."""

    def __init__(self, role, label, spec, log):
        read_fd, self.write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        super().__init__(role, label, next(_pids), read_fd, spec)
        self.signals: list[int] = []
        self.got_signal = threading.Event()
        self.end: Ended | None = None
        self.log = log

    # the behaviour's side
    def send(self, event: str, **fields) -> None:
        os.write(self.write_fd, (json.dumps({"event": event, **fields}) + "\n").encode())

    def exit(self, status: int = 0, signum: int | None = None, leaving: bool = True) -> None:
        """``leaving``: a worker ending with 0 says so first, as roles.run_worker does once
        Dask closed it (without it, its end is a death)."""
        if leaving and not signum and status == 0 and self.role == "worker":
            self.send("leaving", reason="scheduler-close")
        os.close(self.write_fd)
        self.end = Ended(signal=signum) if signum else Ended(exited=status)

    def wait_signal(self, timeout: float = 10.0) -> int | None:
        self.got_signal.wait(timeout)
        return self.signals[0] if self.signals else None

    # the rank's side
    def reap(self) -> bool:
        if self.ended is None and self.end is not None:
            self.ended = self.end
            return True
        return False

    def signal(self, signum: int) -> None:
        if self.end is None:
            self.log.append((time.monotonic(), self.label, signum))
            self.signals.append(signum)
            self.got_signal.set()
            if signum == signal.SIGKILL:
                self.exit(signum=signal.SIGKILL)


def serve_until_signalled(child: FakeChild, first_event=None) -> None:
    if first_event:
        child.send(*first_event[:1], **first_event[1])
    signum = child.wait_signal()
    child.exit(0 if signum else 1)


def default_behaviour(child: FakeChild) -> None:
    run = child.spec.runs
    if run == "scheduler":
        serve_until_signalled(child, ("address", {"address": "tcp://fake:1",
                                                  "identity": {}, "dashboard": None}))
    elif run == "worker":
        serve_until_signalled(child, ("ready", {"name": str(child.spec.name)}))
    else:  # the script: waits for a signal like a long computation
        signum = child.wait_signal()
        child.exit(128 + signum if signum else 0)


class FakeLauncher:
    """Starts FakeChild roles; ``behaviours[(rank, run)]`` overrides what one does."""

    def __init__(self, rank: int, behaviours: dict, log: list, check=None):
        self.rank, self.behaviours, self.log = rank, behaviours, log
        self._check = check
        self.started: list[FakeChild] = []

    def start(self, role, label, spec, *, stdin=None, returns=False):
        if stdin is not None:
            os.close(stdin)
        child = FakeChild(role, label, spec, self.log)
        self.started.append(child)
        behaviour = self.behaviours.get((self.rank, spec.runs), default_behaviour)
        threading.Thread(target=behaviour, args=(child,), daemon=True).start()
        return child

    def check(self, what, value):
        return self._check(self.rank, what, value) if self._check else None

    def close(self) -> None:
        pass


def run_job(size: int, settings, behaviours=None, check=None, timeout: float = 20.0):
    """Run every rank's Supervisor in a thread; return (statuses, launchers, log)."""
    from dask_mpi_launch.process.supervisor import Supervisor

    world = MemoryWorld(size)
    log: list = []
    launchers = [FakeLauncher(r, behaviours or {}, log, check) for r in range(size)]
    statuses: dict[int, object] = {}

    def rank(r):
        try:
            statuses[r] = Supervisor(settings, world.control(r), launchers[r]).run()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            statuses[r] = e

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), f"ranks still running: {statuses}"
    return [statuses[r] for r in range(size)], launchers, log
