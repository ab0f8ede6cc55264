"""The data plane's progress engine: one thread per process that makes its MPI calls.

One progress thread per process makes the data plane's MPI calls (so the event loops never
block in MPI; only a message's non-blocking ``Isend`` calls are posted by the writing loop
itself, MPI_THREAD_MULTIPLE allowing it, to save a hand-off), polls with
``Iprobe``/``Testall`` and backs off exponentially to
:data:`IDLE_MAX_SLEEP` when nothing is in flight (an idle rank uses well under 2% of a core);
while a transfer is in flight it keeps calling MPI so the library progresses the copy.

:class:`Engine` holds the communicator, the connections and the requests in flight, and runs
the loop (:meth:`Engine._run`) with its back-off; what it does per connection and message
(set-up, sends, receives, delivery, close) it inherits from
:class:`~dask_mpi_launch.dataplane.connections.Connections`. :func:`join` makes the process's
one engine, :func:`engine` returns it, :func:`shutdown` stops it.
"""
from __future__ import annotations

import atexit
import collections
import itertools
import logging
import os
import threading
import time

import dask
from dask.utils import parse_timedelta
from distributed.comm.core import CommClosedError

from dask_mpi_launch.dataplane.connections import Connections, _Op
from dask_mpi_launch.dataplane.wire import CHUNK, DATA_TAG_BASE, TAG_CONNECT, TAG_HEADER

logger = logging.getLogger(__name__)

HOT_MAX_SLEEP = 0.0001  # seconds: longest back-off in the first HOT_FOR s after traffic
HOT_FOR = 0.25  # (a request's answer, or the next request, usually follows within it)
BUSY_MAX_SLEEP = 0.001  # seconds: longest back-off in the first IDLE_AFTER s of quiet
IDLE_AFTER = 2.0
ANSWER_WINDOW = 0.05  # s: a read this soon after its comm's write waits for the answer
IDLE_MAX_SLEEP = 0.01  # seconds: the longest back-off of an idle progress thread


class Engine(Connections):
    """Owns the data-plane communicator; its thread makes the MPI calls (but the Isends of
    :meth:`send`) and tests every request."""

    def __init__(self, comm, stall_timeout: float | None = None, chunk: int = CHUNK):
        from mpi4py import MPI

        self.MPI = MPI
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise RuntimeError(
                "the mpi protocol needs MPI initialized with MPI_THREAD_MULTIPLE "
                f"(this MPI gave level {MPI.Query_thread()}); leave mpi4py.rc.thread_level "
                "at its default 'multiple'")
        self.comm = comm
        self.pid = os.getpid()
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        tag_ub = comm.Get_attr(MPI.TAG_UB) or 32767
        self.id_limit = tag_ub - DATA_TAG_BASE
        if stall_timeout is None:
            stall_timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.tcp"),
                                            default="seconds")
        self.stall = float(stall_timeout)
        self.chunk = int(chunk)
        self.stats = {"sent_bytes": 0, "received_bytes": 0, "sent_messages": 0,
                      "received_messages": 0, "connections": 0}
        self.spin_until = 0.0  # poll without pause until then (transfers expected to run)
        self.awaiting = 0  # reads waiting for the answer to their comm's own request ...
        self.awaiting_since = 0.0  # ... the latest since then: poll at the hot step for it
        self.oversubscribed = _crowded()  # more ranks on this node than cores
        self.crowded = self.oversubscribed  # ... and the node's cores are busy now
        self.cpu_before = _cpu_times() if self.oversubscribed else None  # at the last look
        self.crowded_checked = time.monotonic()  # (the first verdict comes a second later)
        self.cpu_seconds = 0.0  # CPU time of the progress thread, updated when it idles
        self.lock = threading.Lock()
        self.todo: collections.deque = collections.deque()
        self.wake = threading.Event()
        self.conns: dict = {}  # local id -> MPIComm (touched in the thread only)
        self.connecting: dict[int, tuple] = {}  # local id -> (comm, loop, future)
        self.listeners: dict = {}  # (host, port) -> MPIListener
        self.ops: list[_Op] = []
        self.posted: collections.deque = collections.deque()  # ops posted by other threads
        self.inbox: dict[int, collections.deque] = {}  # local id -> [_Incoming] in order
        self._closing: dict = {}  # local id -> MPIComm closed locally, may still get the marker
        self._ids = itertools.count(1)
        self._used: set[int] = set()
        self.stopping = False
        self.drain_until: float | None = None
        self.thread = threading.Thread(target=self._run, name="dask-mpi-progress", daemon=True)
        self.thread.start()

    # called from any thread
    def expect_answer(self, delta: int) -> None:
        """A read starts (+1) or stops (-1) waiting for the answer to its own request."""
        with self.lock:
            self.awaiting += delta
        if delta > 0:
            self.awaiting_since = time.monotonic()
            self.wake.set()

    def send(self, comm, frames, fut, loop, cheap=False) -> None:
        """Post a message's sends right here, in the caller's (the event loop's) thread:
        MPI_THREAD_MULTIPLE allows it, and it saves a hand-off to the progress thread
        (which then tests them). Messages of one comm stay in order: its writes come one
        after the other from its loop."""
        if self.stopping:
            raise CommClosedError("the MPI data plane is shut down")
        self._send(comm, frames, fut, loop, cheap)
        self.wake.set()

    def call(self, fn, *args) -> None:
        """Run ``fn(*args)`` in the progress thread, in submission order."""
        if self.stopping:
            raise CommClosedError("the MPI data plane is shut down")
        with self.lock:
            self.todo.append((fn, args))
        self.wake.set()

    def new_id(self) -> int:
        with self.lock:
            for _ in range(self.id_limit):
                i = next(self._ids) % self.id_limit or 1
                if i not in self._used:
                    self._used.add(i)
                    return i
        raise CommClosedError("no free MPI connection ids")

    def free_id(self, i: int) -> None:
        with self.lock:
            self._used.discard(i)

    def stop(self, timeout: float = 5.0) -> None:
        """Finish what is queued and in flight (up to half the timeout), then stop."""
        if threading.current_thread() is self.thread:
            self.stopping = True
            return
        self.drain_until = time.monotonic() + timeout / 2
        self.wake.set()
        self.thread.join(timeout / 2 + 0.5)
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout / 2)

    # the progress thread
    def _run(self) -> None:
        """The progress loop: run what other threads queued; then back off when nothing is
        in flight or arriving, else take in requests and headers and test the requests in
        flight, and pause as the work in flight asks."""
        MPI = self.MPI
        status = MPI.Status()
        sleep = idle_since = 0.0
        while not self.stopping:
            busy = self._run_queued()
            try:
                # (an op posted by send() after the check below sets the wake-up again: the
                # wait returns at once)
                if (not (self.ops or self.posted or busy)
                        and not self.comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)):
                    sleep, idle_since = self._idle(sleep, idle_since)
                    continue
                busy = self._receive(status) or busy
                busy = self._test_ops() or busy
            except Exception:  # noqa: BLE001
                logger.exception("MPI data plane: progress failed")
            if self._drained():
                break
            sleep = self._pause(busy, sleep)

    def _run_queued(self) -> bool:
        """Take the ops other threads posted and run the calls they queued, in order;
        whether there were calls."""
        busy = False
        while self.posted:
            self.ops.append(self.posted.popleft())
        while True:
            with self.lock:
                if not self.todo:
                    self.wake.clear()
                    break
                fn, args = self.todo.popleft()
            busy = True
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - keep the engine alive
                logger.exception("MPI data plane: %s failed", getattr(fn, "__name__", fn))
        return busy

    def _idle(self, sleep: float, idle_since: float) -> tuple[float, float]:
        """Idle: one MPI call per wake-up, then back off (further after a while); the new
        (sleep, idle_since)."""
        now = time.monotonic()
        if sleep == 0.0:
            idle_since = now
        self._check_crowded(now)
        cap = _max_sleep(now - idle_since, self.crowded)
        if self.awaiting and now - self.awaiting_since < HOT_FOR:
            cap = HOT_MAX_SLEEP  # an answer is due (even on a crowded node)
        sleep = min(max(sleep * 2, 20e-6), cap)
        self.cpu_seconds = time.thread_time()
        self.wake.wait(sleep)
        return sleep, idle_since

    def _check_crowded(self, now: float) -> None:
        """On an oversubscribed node, look at the cores' use every :data:`CROWDED_EVERY` s."""
        if self.oversubscribed and now > self.crowded_checked + CROWDED_EVERY:
            self.crowded_checked = now
            times = _cpu_times()
            if times is not None and self.cpu_before is not None:
                self.crowded = cores_busy(self.cpu_before, times)
            self.cpu_before = times

    def _receive(self, status) -> bool:
        """Take in up to 64 connect requests and 64 headers; whether there were any."""
        MPI = self.MPI
        busy = False
        for tag, handler in ((TAG_CONNECT, self._on_connect),
                             (TAG_HEADER, self._on_header)):
            for _ in range(64):
                # plain probe, then receive from that source and tag: this thread
                # is the only receiver of these tags (matched probes misbehaved
                # under Open MPI)
                if not self.comm.Iprobe(MPI.ANY_SOURCE, tag, status):
                    break
                busy = True
                buf = bytearray(status.Get_count(MPI.BYTE))
                source = status.Get_source()
                self.comm.Recv([buf, MPI.BYTE], source=source, tag=tag)
                handler(source, buf)
        return busy

    def _drained(self) -> bool:
        """Stopping, and nothing queued and nothing in flight (or the drain time is up)."""
        return self.drain_until is not None and not self.todo and (
            not (self.ops or self.posted) or time.monotonic() > self.drain_until)

    def _pause(self, busy: bool, sleep: float) -> float:
        """After a pass that found work: go on at once, yield, or back off gently; the new
        sleep."""
        if busy or self.posted:
            sleep = 0.0
        elif self.ops and time.monotonic() < self.spin_until:
            # transfers in flight: keep calling MPI so the library moves the bytes, but
            # let a process waiting for this core (the peer, on a crowded node) run
            os.sched_yield()
        else:  # something slow or stuck: keep polling, gently
            sleep = min(max(sleep * 2, 20e-6), BUSY_MAX_SLEEP)
            self.wake.wait(sleep)
        return sleep

    def _test_ops(self) -> bool:
        if not self.ops:
            return False
        MPI = self.MPI
        now = time.monotonic()
        keep, changed = [], False
        for op in self.ops:
            try:
                finished = MPI.Request.Testall(op.reqs)
            except MPI.Exception as e:
                changed = True
                self._call_safely(op.fail, CommClosedError(f"MPI error: {e}"))
                continue
            if finished:
                changed = True
                self._call_safely(op.done)
            elif op.deadline is not None and now > op.deadline:
                changed = True
                for r in op.reqs:  # receives can be cancelled; sends stay until they end
                    try:
                        if r != MPI.REQUEST_NULL:
                            r.Cancel()
                    except MPI.Exception:
                        pass
                op.deadline = None
                self._call_safely(op.fail, CommClosedError("MPI transfer stalled"))
                keep.append(op)  # buffers stay alive until MPI lets go of them
            else:
                keep.append(op)
        self.ops = keep
        return changed
    @staticmethod
    def _call_safely(fn, *args):
        try:
            fn(*args)
        except Exception:  # noqa: BLE001
            logger.exception("MPI data plane: completion callback failed")


def _max_sleep(quiet_for: float, crowded: bool = False) -> float:
    """The longest back-off of the progress thread after ``quiet_for`` s without traffic:
    short right after traffic (answers are on their way), longer as the quiet lasts. On a
    crowded node (more ranks than cores, and the cores busy) polling that often would take
    the cores from the ranks doing the work, so the short step is left out.

    >>> _max_sleep(0.0), _max_sleep(1.0), _max_sleep(60.0), _max_sleep(0.0, crowded=True)
    (0.0001, 0.001, 0.01, 0.001)
    """
    if quiet_for < HOT_FOR and not crowded:
        return HOT_MAX_SLEEP
    return BUSY_MAX_SLEEP if quiet_for < IDLE_AFTER else IDLE_MAX_SLEEP


CROWDED_EVERY = 1.0  # seconds between looks at the node's CPU use (oversubscribed nodes)
CROWDED_IDLE = 0.1  # a node with less than this share of its CPU time idle is crowded


def cpu_times(stat: str) -> tuple[int, int]:
    """(idle, total) jiffies of the node from ``/proc/stat``'s first line (idle and iowait
    count as idle).

    >>> cpu_times("cpu  100 0 50 800 50 0 0 0 0 0\\ncpu0 ...")
    (850, 1000)
    """
    fields = [int(x) for x in stat.split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])


def cores_busy(before: tuple[int, int], after: tuple[int, int]) -> bool:
    """Whether the node's cores were (nearly) all busy between two :func:`cpu_times`:
    measured use over the last interval, not the load average, which lags by a minute.

    >>> cores_busy((850, 1000), (880, 2000)), cores_busy((850, 1000), (1500, 2000))
    (True, False)
    """
    total = after[1] - before[1]
    return total > 0 and (after[0] - before[0]) / total < CROWDED_IDLE


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            return cpu_times(f.readline())
    except (OSError, ValueError, IndexError):
        return None


def _crowded(env=os.environ) -> bool:
    """More ranks on this node (as the launcher tells it) than the node has cores.

    >>> _crowded({"MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": str(10**6)})
    True
    >>> _crowded({})
    False
    """
    from dask_mpi_launch.hpc.launchers import local_rank

    local = local_rank(env)
    return local is not None and local[1] > (os.cpu_count() or 1)


_ENGINE: Engine | None = None
_ENGINE_LOCK = threading.Lock()


def join(comm, stall_timeout: float | None = None, chunk: int = CHUNK) -> Engine:
    """Make this process a data-plane peer on ``comm`` (idempotent; one communicator only).

    ``stall_timeout``: seconds (plus one per 100 MB) a message may take before its connection
    fails (default ``distributed.comm.timeouts.tcp``); ``chunk``: bytes per MPI message.
    """
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is not None and not _ENGINE.stopping:
            if _ENGINE.comm != comm:
                raise RuntimeError("this process already joined an MPI data plane")
            return _ENGINE
        _ENGINE = Engine(comm, stall_timeout, chunk)
        atexit.register(shutdown)
        return _ENGINE


def engine() -> Engine | None:
    """The process's data-plane engine, or None when this process is not a peer."""
    e = _ENGINE
    if e is None or e.stopping or e.pid != os.getpid():  # a forked child is not a peer
        return None
    return e


def shutdown(timeout: float = 5.0) -> None:
    """Stop the progress thread (call before MPI_Finalize; idempotent)."""
    global _ENGINE
    with _ENGINE_LOCK:
        e, _ENGINE = _ENGINE, None
    if e is not None:
        e.stop(timeout)
