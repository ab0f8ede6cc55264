"""Worker-to-worker data over MPI point-to-point: distributed's ``mpi`` comm backend.

With ``--protocol mpi`` every worker runs *inside* its MPI rank process, in a thread of its
own with its own asyncio loop (forked role processes cannot call MPI), and listens on a
hybrid address ``mpi://HOST:PORT/RANK``:

- a process that joined this job's data plane (:func:`join`, done by
  :func:`start_worker_thread`) reaches another data-plane peer over MPI point-to-point on the
  data-plane communicator, rank ``RANK``;
- any other process (the scheduler, the script, a notebook on the login node) connects to
  ``HOST:PORT``, an ordinary TCP or TLS listener (TLS when the job's ``Security`` has TLS), so
  the cluster's outside door stays what it was. MPI traffic never leaves the job: only ranks
  of the communicator can reach the MPI side, and a request is accepted only when its
  ``HOST:PORT`` is the listener's own (an address from another job falls back to TCP/TLS).

The backend is registered under the entry-point group ``distributed.comm.backends`` (name
``mpi``), so ``distributed`` finds it without patches.

API for the rank's supervisor
-----------------------------
MPI must be initialized with ``MPI_THREAD_MULTIPLE`` (mpi4py's default request; both wheels
provide it). Create the data-plane communicator collectively, e.g. ``dp =
MPI.COMM_WORLD.Dup()`` on every rank (or a ``Split`` of the worker ranks), then on each worker
rank::

    from dask_mpi_launch.dataplane import backend
    handle = backend.start_worker_thread(
        dp, scheduler_address, name=name, nthreads=2, memory_limit="auto",
        security=security,            # distributed.Security of the job (TLS door), or None
        host="10.0.0.5",              # or interface="ib0"; the fallback TCP/TLS listener's host
        worker_options={...},         # any further distributed.Worker keyword arguments
    )
    handle.wait_started(timeout=60)   # -> the worker's address; raises if it failed to start
    ...
    handle.stop()                     # ask the worker to close (thread-safe, returns at once)
    handle.join(timeout=30)           # True when the thread has ended
    handle.status                     # "starting", "running", "closed" or "failed"
    handle.error                      # the exception when "failed", else None
    handle.asked_to_close             # True when stop(), the scheduler or a client closed it
    backend.shutdown()                # stop the progress thread; before MPI_Finalize

The worker thread ends when the worker closes (scheduler shutdown, ``handle.stop()``, or a
fatal error). A worker in the rank cannot be restarted when it dies: the rank is the worker.

Transport
---------
One progress thread per process makes the data plane's MPI calls (so the event loops never
block in MPI; only a message's non-blocking ``Isend`` calls are posted by the writing loop
itself, MPI_THREAD_MULTIPLE allowing it, to save a hand-off), polls with
``Iprobe``/``Testall`` and backs off exponentially to
:data:`IDLE_MAX_SLEEP` when nothing is in flight (an idle rank uses well under 2% of a core);
while a transfer is in flight it keeps calling MPI so the library progresses the copy.

- Connect: a request on :data:`TAG_CONNECT` carries the requester's connection id and the
  address it meant; the listener's rank answers on :data:`TAG_HEADER` (so that the answer
  stays ahead of the connection's first message) with its own id, or a refusal, and the
  requester falls back to TCP/TLS.
- Messages: distributed's frames (unsplit: the transport chunks) go as one header on
  :data:`TAG_HEADER` (connection id, frame sizes, small frames inline), then each large frame
  on the connection's data tag ``DATA_TAG_BASE + receiver's id`` in chunks of at most
  :data:`CHUNK` bytes (MPI counts are C ints). The receiver posts ``Irecv`` straight into a
  freshly allocated buffer per frame, which is the frame ``distributed`` deserializes
  (NumPy arrays end up backed by it: no copy). MPI's non-overtaking rule keeps frames in order.
- Failure: a message still incomplete after ``distributed.comm.timeouts.tcp`` plus one second
  per 100 MB, or an MPI error, closes the connection with ``CommClosedError``; so does a
  ``close`` from the peer. A rank that dies usually ends the whole MPI job (the launcher's
  choice), which the supervisor reports.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import itertools
import json
import logging
import os
import struct
import sys
import threading
import time
import weakref

import dask
from dask.utils import parse_timedelta
from distributed.comm.addressing import parse_host_port, unparse_host_port
from distributed.comm.core import BaseListener, Comm, CommClosedError, Connector
from distributed.comm.registry import Backend
from distributed.comm.utils import from_frames, to_frames
from distributed.protocol.utils import host_array
from distributed.sizeof import safe_sizeof
from distributed.utils import ensure_ip, ensure_memoryview, get_ip

logger = logging.getLogger(__name__)


def _post(loop, callback, *args) -> None:
    """Run ``callback`` in ``loop``'s thread; nothing when that loop has closed already (a
    worker that ended while a message for it was still arriving)."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # "Event loop is closed"
        pass

TAG_CONNECT = 101
TAG_HEADER = 103
DATA_TAG_BASE = 1024
CHUNK = 2**30  # bytes per MPI message: well below the C int count limit (2**31 - 1)
INLINE_MAX = 64 * 2**10  # frames up to this size travel inside the header ...
INLINE_TOTAL = 2**20  # ... while the header's inline bytes stay below this
HOT_MAX_SLEEP = 0.0001  # seconds: longest back-off in the first HOT_FOR s after traffic
HOT_FOR = 0.25  # (a request's answer, or the next request, usually follows within it)
BUSY_MAX_SLEEP = 0.001  # seconds: longest back-off in the first IDLE_AFTER s of quiet
IDLE_AFTER = 2.0
ANSWER_WINDOW = 0.05  # s: a read this soon after its comm's write waits for the answer
IDLE_MAX_SLEEP = 0.01  # seconds: the longest back-off of an idle progress thread
NO_SPLIT = 2**62  # distributed splits frames at 64 MiB unless told a larger size; we chunk
# ourselves, and unsplit frames need no merging copy on the receiving side
RATE_FLOOR = 100e6  # bytes/s a transfer is granted on top of the stall timeout

MAGIC = b"DMLM"
KIND_DATA, KIND_CLOSE, KIND_ACCEPT = 0, 1, 2
CHEAP = 0x80  # bit of a KIND_DATA header's kind: the frames are plain buffers (NumPy arrays,
# bytes) that deserialize in O(1), so the receiver does it in its loop instead of a thread
_HEAD = struct.Struct("<4sBxxxIIQ")  # magic, kind, connection id, nframes, chunk
_INLINE_BIT = 1 << 63


# --- pure parts ----------------------------------------------------------------------------

def parse_mpi_address(loc: str) -> tuple[str, int, int | None]:
    """``"HOST:PORT/RANK"`` (scheme-less) -> (host, port, rank); rank None when absent.

    >>> parse_mpi_address("10.0.0.5:8786/3")
    ('10.0.0.5', 8786, 3)
    >>> parse_mpi_address("[::1]:0")
    ('::1', 0, None)
    """
    hostport, sep, rank = loc.partition("/")
    if sep and not rank.isdigit():
        raise ValueError(f"invalid mpi address {loc!r}: the rank after '/' must be a number")
    host, port = parse_host_port(hostport, 0)
    return host, int(port), (int(rank) if sep else None)


def unparse_mpi_address(host: str, port: int, rank: int | None) -> str:
    """
    >>> unparse_mpi_address("::1", 5, 2)
    '[::1]:5/2'
    """
    loc = unparse_host_port(host, port)
    return loc if rank is None else f"{loc}/{rank}"


def chunk_spans(nbytes: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """Byte ranges of the MPI messages one frame travels in (at least one, even when empty).

    >>> chunk_spans(5, 2)
    [(0, 2), (2, 4), (4, 5)]
    >>> chunk_spans(0)
    [(0, 0)]
    >>> len(chunk_spans(3 * 2**30 + 1)), chunk_spans(3 * 2**30 + 1)[-1]
    (4, (3221225472, 3221225473))
    """
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    return [(i, min(i + chunk, nbytes)) for i in range(0, max(nbytes, 1), chunk)]


def pack_header(kind: int, conn_id: int, frames, chunk: int = CHUNK,
                inline_max: int = INLINE_MAX, inline_total: int = INLINE_TOTAL):
    """(header bytes, [(index, memoryview)] of the frames that travel on the data tag).

    >>> head, big = pack_header(KIND_DATA, 7, [b"ab", bytes(10)], inline_max=4)
    >>> [i for i, _ in big]
    [1]
    >>> unpack_header(head)[:4]
    (0, 7, 1073741824, [2, 10])
    """
    views = [ensure_memoryview(f) for f in frames]
    sizes, inline, big, total = [], [], [], 0
    for i, v in enumerate(views):
        n = v.nbytes
        if n <= inline_max and total + n <= inline_total:
            sizes.append(n | _INLINE_BIT)
            inline.append(v)
            total += n
        else:
            sizes.append(n)
            big.append((i, v))
    head = bytearray(_HEAD.pack(MAGIC, kind, conn_id, len(views), chunk))
    head += struct.pack(f"<{len(sizes)}Q", *sizes)
    for v in inline:
        head += v
    return head, big


def unpack_header(buf):
    """header -> (kind, conn_id, chunk, sizes, {index: inline frame}, [indices on data tag]).

    Inline frames are zero-copy slices of ``buf``.

    >>> unpack_header(pack_header(KIND_CLOSE, 3, [])[0])
    (1, 3, 1073741824, [], {}, [])
    >>> unpack_header(b"nonsense-nonsense-nonsense")
    Traceback (most recent call last):
    ValueError: not a dask-mpi-launch data-plane header
    """
    mv = memoryview(buf).cast("B")
    if mv.nbytes < _HEAD.size:
        raise ValueError("not a dask-mpi-launch data-plane header")
    magic, kind, conn_id, n, chunk = _HEAD.unpack_from(mv)
    if magic != MAGIC or mv.nbytes < _HEAD.size + 8 * n:
        raise ValueError("not a dask-mpi-launch data-plane header")
    raw = struct.unpack_from(f"<{n}Q", mv, _HEAD.size)
    pos = _HEAD.size + 8 * n
    sizes, inline, big = [], {}, []
    for i, s in enumerate(raw):
        size = s & ~_INLINE_BIT
        sizes.append(size)
        if s & _INLINE_BIT:
            inline[i] = mv[pos:pos + size]
            pos += size
        else:
            big.append(i)
    if pos != mv.nbytes:
        raise ValueError("not a dask-mpi-launch data-plane header")
    return kind, conn_id, chunk, sizes, inline, big


def transfer_deadline(nbytes: int, stall: float) -> float:
    """Seconds a message of ``nbytes`` may take before its connection counts as stalled.

    >>> transfer_deadline(10**9, 30.0)
    40.0
    """
    return stall + nbytes / RATE_FLOOR


CHEAP_SMALL = 2**20  # bytes: an object below this is cheap to serialize whatever its type


def cheap_to_serialize(msg) -> bool:
    """Whether serializing ``msg`` (and deserializing it at the other end) is cheap: its
    large leaves are C- or Fortran-contiguous NumPy arrays without Python objects, or bytes,
    bytearray or memoryview, which distributed sends as they are (a ``get_data`` answer full
    of array chunks); everything else in it comes to less than :data:`CHEAP_SMALL` bytes.
    distributed hands a message above ``distributed.comm.offload`` (10 MiB) to a thread to
    keep the event loop free while it is (de)serialized; for a cheap message that costs two
    thread hand-offs and buys nothing, so it is done in the loop instead. Anything else (a
    DataFrame, a pickled object) keeps distributed's choice.

    >>> import numpy as np
    >>> from distributed.protocol import to_serialize
    >>> cheap_to_serialize({"status": "OK", "data": {"x": to_serialize(np.ones(2**21))}})
    True
    >>> cheap_to_serialize({"data": {"x": to_serialize(np.ones((2**11, 2**11))[:, ::2])}})
    False
    >>> cheap_to_serialize({"data": {k: to_serialize([0.5] * 2**10) for k in range(64)}})
    False
    """
    budget = [CHEAP_SMALL, 100_000]  # bytes of real (de)serializing work; objects visited
    return _cheap(msg, budget, 0)


def _cheap(obj, budget, depth) -> bool:
    budget[1] -= 1
    if budget[1] < 0 or depth > 8:
        return False
    if isinstance(obj, (int, float, bool, type(None))):
        return True
    if isinstance(obj, (bytes, bytearray, memoryview, str)):  # msgpack copies these
        budget[0] -= len(obj)
        return budget[0] > 0
    if isinstance(obj, dict):
        return all(_cheap(v, budget, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_cheap(v, budget, depth + 1) for v in obj)
    if type(obj).__name__ in ("Serialize", "ToPickle"):
        obj = obj.data
        if isinstance(obj, (bytes, bytearray, memoryview)):
            return True
        np = sys.modules.get("numpy")
        if (np is not None and type(obj) is np.ndarray and not obj.dtype.hasobject
                and (obj.flags.c_contiguous or obj.flags.f_contiguous)):
            return True
    budget[0] -= safe_sizeof(obj, default_size=CHEAP_SMALL)
    return budget[0] > 0


# --- the progress engine (one per process) -------------------------------------------------

SPIN_RATE = 5e8  # bytes/s: the progress thread spins while transfers may still run at this


class _Op:
    """MPI requests in flight, with what to do when they all complete or fail."""

    __slots__ = ("reqs", "done", "fail", "deadline", "keep")

    def __init__(self, reqs, done, fail, deadline, keep=None):
        self.reqs, self.done, self.fail, self.deadline, self.keep = (
            reqs, done, fail, deadline, keep)


class _Incoming:
    __slots__ = ("frames", "left", "error", "cheap")

    def __init__(self, frames, left, cheap=False):
        self.frames, self.left, self.error, self.cheap = frames, left, None, cheap


class Engine:
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
        self.conns: dict[int, MPIComm] = {}  # local id -> comm (touched in the thread only)
        self.connecting: dict[int, tuple] = {}  # local id -> (comm, loop, future)
        self.listeners: dict[tuple[str, int], MPIListener] = {}
        self.ops: list[_Op] = []
        self.posted: collections.deque = collections.deque()  # ops posted by other threads
        self.inbox: dict[int, collections.deque] = {}  # local id -> [_Incoming] in order
        self._closing: dict[int, MPIComm] = {}  # closed locally, may still get the marker
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
        MPI = self.MPI
        status = MPI.Status()
        sleep = idle_since = 0.0
        while not self.stopping:
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
            try:
                # (an op posted by send() after the check below sets the wake-up again: the
                # wait returns at once)
                if (not (self.ops or self.posted or busy)
                        and not self.comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)):
                    # idle: one MPI call per wake-up, then back off (further after a while)
                    now = time.monotonic()
                    if sleep == 0.0:
                        idle_since = now
                    if self.oversubscribed and now > self.crowded_checked + CROWDED_EVERY:
                        self.crowded_checked = now
                        times = _cpu_times()
                        if times is not None and self.cpu_before is not None:
                            self.crowded = cores_busy(self.cpu_before, times)
                        self.cpu_before = times
                    cap = _max_sleep(now - idle_since, self.crowded)
                    if self.awaiting and now - self.awaiting_since < HOT_FOR:
                        cap = HOT_MAX_SLEEP  # an answer is due (even on a crowded node)
                    sleep = min(max(sleep * 2, 20e-6), cap)
                    self.cpu_seconds = time.thread_time()
                    self.wake.wait(sleep)
                    continue
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
                busy = self._test_ops() or busy
            except Exception:  # noqa: BLE001
                logger.exception("MPI data plane: progress failed")
            if self.drain_until is not None and not self.todo and (
                    not (self.ops or self.posted) or time.monotonic() > self.drain_until):
                break
            if busy or self.posted:
                sleep = 0.0
            elif self.ops and time.monotonic() < self.spin_until:
                # transfers in flight: keep calling MPI so the library moves the bytes, but
                # let a process waiting for this core (the peer, on a crowded node) run
                os.sched_yield()
            else:  # something slow or stuck: keep polling, gently
                sleep = min(max(sleep * 2, 20e-6), BUSY_MAX_SLEEP)
                self.wake.wait(sleep)

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

    def _spin(self, nbytes: int) -> None:
        self.spin_until = max(self.spin_until, time.monotonic() + 0.05 + nbytes / SPIN_RATE)

    @staticmethod
    def _call_safely(fn, *args):
        try:
            fn(*args)
        except Exception:  # noqa: BLE001
            logger.exception("MPI data plane: completion callback failed")

    # connection set-up
    def _post_connect(self, comm, rank, target):
        payload = struct.pack("<I", comm.local_id) + json.dumps(
            {"target": target, "from": comm.local_address}).encode()
        req = self.comm.Isend([payload, self.MPI.BYTE], dest=rank, tag=TAG_CONNECT)
        self.ops.append(_Op([req], _noop, _noop, None, payload))

    def _on_connect(self, source, buf):
        (their_id,) = struct.unpack_from("<I", buf)
        try:
            info = json.loads(bytes(buf[4:]))
            host, port, _ = parse_mpi_address(info["target"])
            listener = self.listeners.get((host, port))
        except (ValueError, KeyError, TypeError):
            listener = None
        my_id = -1
        if listener is not None and listener.loop is not None and not listener.loop.is_closed():
            my_id = self.new_id()
            comm = MPIComm(self, my_id, source, listener.contact_address,
                           _peer_address(info.get("from"), source),
                           listener.deserialize, listener.loop)
            comm.remote_id = their_id
            comm.allow_offload = listener.allow_offload
            self.conns[my_id] = comm
            self.inbox[my_id] = collections.deque()
        # the answer goes on the header tag: MPI keeps it ahead of this connection's data
        reply, _ = pack_header(KIND_ACCEPT, their_id, [], chunk=max(my_id, 0))
        req = self.comm.Isend([reply, self.MPI.BYTE], dest=source, tag=TAG_HEADER)
        self.ops.append(_Op([req], _noop, _noop, None, reply))
        if my_id > 0:
            _post(listener.loop, listener._accept, comm)

    def _on_accept(self, source, mine, theirs):
        entry = self.connecting.pop(mine, None)
        if entry is None:  # the connect was given up: tell the peer
            if theirs > 0:
                self._send_close(source, theirs)
            self.free_id(mine)
            return
        comm, loop, fut = entry
        if theirs <= 0:
            self.free_id(mine)
            _post(loop, _resolve, fut, None)
            return
        comm.remote_id = theirs
        self.stats["connections"] += 1
        self.conns[mine] = comm
        self.inbox[mine] = collections.deque()
        _post(loop, _resolve, fut, comm)

    # messages
    def _send(self, comm, frames, fut, loop, cheap=False):
        if comm.remote_id is None or comm._broken:
            _post(loop, _fail, fut, CommClosedError("MPI comm closed"))
            return
        MPI = self.MPI
        head, big = pack_header(KIND_DATA | (CHEAP if cheap else 0), comm.remote_id, frames,
                                chunk=self.chunk)
        reqs = [self.comm.Isend([head, MPI.BYTE], dest=comm.peer, tag=TAG_HEADER)]
        tag = DATA_TAG_BASE + comm.remote_id
        nbytes = len(head)
        try:
            for _, v in big:
                nbytes += v.nbytes
                for a, b in chunk_spans(v.nbytes, self.chunk):
                    reqs.append(self.comm.Isend([v[a:b], MPI.BYTE], dest=comm.peer, tag=tag))
        except MPI.Exception as e:
            comm._broken = True
            _post(loop, _fail, fut, CommClosedError(f"MPI error: {e}"))
            self.posted.append(_Op(reqs, _noop, _noop, None, (head, big)))
            return

        def failed(exc):
            comm._broken = True
            _post(loop, _fail, fut, exc)

        self._spin(nbytes)

        def sent():
            self.stats["sent_bytes"] += nbytes
            self.stats["sent_messages"] += 1
            _post(loop, _resolve, fut, nbytes)

        self.posted.append(_Op(reqs, sent, failed,
                               time.monotonic() + transfer_deadline(nbytes, self.stall),
                               (head, big)))

    def _send_close(self, rank, remote_id):
        head, _ = pack_header(KIND_CLOSE, remote_id, [])
        req = self.comm.Isend([head, self.MPI.BYTE], dest=rank, tag=TAG_HEADER)
        self.ops.append(_Op([req], _noop, _noop, None, head))

    def _close(self, comm, notify):
        if self.conns.pop(comm.local_id, None) is not None:
            if notify and comm.remote_id is not None and not comm._broken:
                self._send_close(comm.peer, comm.remote_id)
            # frames already announced keep being drained (see _on_header)
        if not self.inbox.get(comm.local_id):
            self.inbox.pop(comm.local_id, None)
            self._closing.pop(comm.local_id, None)
            self.free_id(comm.local_id)

    def _on_header(self, source, buf):
        MPI = self.MPI
        try:
            kind, cid, chunk, sizes, inline, big = unpack_header(buf)
        except ValueError:
            logger.error("MPI data plane: garbage header from rank %d dropped", source)
            return
        cheap = bool(kind & CHEAP)
        kind &= ~CHEAP
        if kind == KIND_ACCEPT:
            self._on_accept(source, cid, chunk)
            return
        comm = self.conns.get(cid)
        queue = self.inbox.get(cid)
        if queue is None:  # an unknown connection: nothing to drain into
            queue = self.inbox[cid] = collections.deque()
            with self.lock:
                self._used.add(cid)
        if kind == KIND_CLOSE:
            item = _Incoming(None, 0)
            item.error = CommClosedError("the MPI peer closed the connection")
            queue.append(item)
            if comm is not None:
                comm._broken = True
            self._deliver(cid)  # after what came before it; forgets the connection
            return
        self.stats["received_messages"] += 1
        self.stats["received_bytes"] += len(buf) + sum(sizes[i] for i in big)
        frames = [None] * len(sizes)
        for i, v in inline.items():
            frames[i] = v
        item = _Incoming(frames, len(big), cheap)
        queue.append(item)
        if not big:
            self._deliver(cid)
            return
        reqs, nbytes, tag = [], 0, DATA_TAG_BASE + cid
        for i in big:
            out = host_array(sizes[i])
            frames[i] = out
            nbytes += sizes[i]
            for a, b in chunk_spans(sizes[i], chunk):
                reqs.append(self.comm.Irecv([out[a:b], MPI.BYTE], source=source, tag=tag))

        self._spin(nbytes)

        def done():
            item.left = 0
            self._deliver(cid)

        def failed(exc):
            item.error = exc
            item.left = 0
            if cid in self.conns:
                self.conns[cid]._broken = True
            self._deliver(cid)

        self.ops.append(_Op(reqs, done, failed,
                            time.monotonic() + transfer_deadline(nbytes, self.stall), frames))

    def _deliver(self, cid):
        queue = self.inbox.get(cid)
        comm = self.conns.get(cid)
        while queue and queue[0].left == 0:
            item = queue.popleft()
            target = comm
            if target is None:
                # a closed connection: its comm may still wait for the close marker
                target = self._closing.get(cid)
            if target is not None and target.loop is not None:
                _post(target.loop, target._deliver, item.error or (item.frames, item.cheap))
            if item.error is not None and comm is not None:
                self.conns.pop(cid, None)
        if not queue and cid not in self.conns:
            self.inbox.pop(cid, None)
            self._closing.pop(cid, None)
            self.free_id(cid)

def _peer_address(announced, rank: int) -> str:
    """The address a connecting peer announced, if it is an ``mpi://`` one.

    >>> _peer_address("mpi://10.0.0.5:41000/2", 2), _peer_address(None, 3)
    ('mpi://10.0.0.5:41000/2', 'mpi://0.0.0.0:0/3')
    """
    if isinstance(announced, str) and announced.startswith("mpi://"):
        try:
            parse_mpi_address(announced[6:])
            return announced
        except ValueError:
            pass
    return "mpi://" + unparse_mpi_address("0.0.0.0", 0, rank)


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


def _noop(*_):
    pass


def _resolve(fut, value):
    if not fut.done():
        fut.set_result(value)


def _fail(fut, exc):
    if not fut.done():
        fut.set_exception(exc)


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


# --- distributed's Comm, Connector, Listener, Backend ----------------------------------------

class MPIComm(Comm):
    """One connection between two data-plane peers."""

    def __init__(self, eng: Engine, local_id: int, peer: int, local_addr: str, peer_addr: str,
                 deserialize: bool = True, loop=None):
        super().__init__(deserialize=deserialize)
        self.engine = eng
        self.local_id = local_id
        self.remote_id: int | None = None
        self.peer = peer
        self._local_addr = local_addr
        self._peer_addr = peer_addr
        self.loop = loop
        self._closed = False
        self._broken = False
        self._inbox: collections.deque = collections.deque()
        self._waiter = None
        self._wrote_at = float("-inf")
        self.asks = False  # the connecting side (rpc, get_data), whose reads await answers
        self._finalizer = weakref.finalize(self, _finalize, eng, local_id, peer)
        self._finalizer.atexit = False

    # called in the loop thread (from the progress thread via call_soon_threadsafe)
    def _deliver(self, item):
        self._inbox.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self, deserializers=None):
        while not self._inbox:
            if self._closed:
                raise CommClosedError(f"{self!r} is closed")
            self._waiter = asyncio.get_running_loop().create_future()
            # the connecting side's read right after its write waits for the answer (the
            # get_data of a transfer): the progress thread polls at its shortest step until
            # it comes
            answer = self.asks and time.monotonic() - self._wrote_at < ANSWER_WINDOW
            if answer:
                self.engine.expect_answer(1)
            try:
                await self._waiter
            finally:
                self._waiter = None
                if answer:
                    self.engine.expect_answer(-1)
        item = self._inbox.popleft()
        if isinstance(item, BaseException):
            self._mark_closed(notify=False)
            raise item
        frames, cheap = item
        try:
            return await from_frames(frames, deserialize=self.deserialize,
                                     deserializers=deserializers,
                                     allow_offload=self.allow_offload and not cheap)
        except EOFError:
            self.abort()
            raise CommClosedError("aborted MPI comm on truncated data") from None

    async def write(self, msg, serializers=None, on_error="message"):
        if self._closed or self._broken:
            raise CommClosedError(f"{self!r} is closed")
        cheap = cheap_to_serialize(msg)
        frames = await to_frames(
            msg, allow_offload=self.allow_offload and not cheap, serializers=serializers,
            on_error=on_error,
            context={"sender": self.local_info, "recipient": self.remote_info,
                     **self.handshake_options},
            frame_split_size=NO_SPLIT)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.engine.send(self, frames, fut, loop, cheap)
        try:
            n = await fut
            self._wrote_at = time.monotonic()
            return n
        except CommClosedError:
            self._mark_closed(notify=False)
            raise

    def _mark_closed(self, notify: bool) -> None:
        if not self._closed:
            self._closed = True
            self._finalizer.detach()
            self.engine._closing[self.local_id] = self
            try:
                self.engine.call(self.engine._close, self, notify)
            except CommClosedError:
                pass
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    async def close(self):
        self._mark_closed(notify=True)

    def abort(self):
        self._mark_closed(notify=True)

    def closed(self):
        return self._closed

    @property
    def local_address(self) -> str:
        return self._local_addr

    @property
    def peer_address(self) -> str:
        return self._peer_addr

    @property
    def extra_info(self):
        return {"mpi_peer_rank": self.peer}

    def handshake_info(self):
        info = super().handshake_info()
        info["compression"] = None  # MPI moves bytes faster than lz4 squeezes them
        return info


def _finalize(eng, local_id, peer):
    if not eng.stopping:
        dummy = type("Closed", (), {"local_id": local_id, "remote_id": None, "peer": peer,
                                    "_broken": True})()
        try:
            eng.call(eng._close, dummy, False)
        except CommClosedError:
            pass


def _fallback_classes(connection_args):
    from distributed.comm.tcp import TCPConnector, TCPListener, TLSConnector, TLSListener

    if connection_args.get("ssl_context") is not None:
        return TLSConnector, TLSListener
    return TCPConnector, TCPListener


def _strip(connection_args):
    return {k: v for k, v in connection_args.items() if k != "mpi_only"}


class MPIConnector(Connector):
    async def connect(self, address, deserialize=True, **connection_args):
        host, port, rank = parse_mpi_address(address)
        eng = engine()
        if eng is not None and rank is not None and rank != eng.rank and 0 <= rank < eng.size:
            comm = await self._connect_mpi(eng, host, port, rank, deserialize)
            if comm is not None:
                return comm
        connector_class, _ = _fallback_classes(connection_args)
        return await connector_class().connect(unparse_host_port(host, port),
                                               deserialize=deserialize,
                                               **_strip(connection_args))

    @staticmethod
    async def _connect_mpi(eng, host, port, rank, deserialize):
        loop = asyncio.get_running_loop()
        local_id = eng.new_id()
        listener = next(iter(eng.listeners.values()), None)
        local = (listener.contact_address if listener is not None
                 else "mpi://" + unparse_mpi_address("0.0.0.0", 0, eng.rank))
        comm = MPIComm(eng, local_id, rank, local,
                       "mpi://" + unparse_mpi_address(host, port, rank), deserialize, loop)
        comm.asks = True  # this side sends requests; the listener's side answers them
        comm._finalizer.detach()
        fut = loop.create_future()

        def register():
            eng.connecting[local_id] = (comm, loop, fut)
            eng._post_connect(comm, rank, unparse_mpi_address(host, port, rank))

        eng.call(register)
        try:
            got = await fut
        except BaseException:
            # given up (timeout, cancel): a late accept is answered with a close, and an
            # accept that came just before is closed here
            def give_up():
                if eng.connecting.pop(local_id, None) is None and local_id in eng.conns:
                    eng._close(eng.conns[local_id], True)

            try:
                eng.call(give_up)
            except CommClosedError:
                pass
            raise
        if got is None:
            return None  # refused: not this job's listener at that address
        comm._finalizer = weakref.finalize(comm, _finalize, eng, local_id, rank)
        comm._finalizer.atexit = False
        return comm


class MPIListener(BaseListener):
    prefix = "mpi://"

    def __init__(self, loc, handle_comm, deserialize=True, allow_offload=True,
                 default_host=None, **connection_args):
        super().__init__()
        host, port, _ = parse_mpi_address(loc)
        _, listener_class = _fallback_classes(connection_args)
        self.fallback = listener_class(unparse_host_port(host, port), handle_comm,
                                       deserialize=deserialize, allow_offload=allow_offload,
                                       default_host=default_host, **_strip(connection_args))
        self.comm_handler = handle_comm
        self.deserialize = deserialize
        self.allow_offload = allow_offload
        self.loop = None
        self._key = None

    async def start(self):
        await self.fallback.start()
        self.loop = asyncio.get_running_loop()
        eng = engine()
        if eng is not None:
            host, port = self._host_port()
            self._key = (host, port)
            listen_host, _ = self.fallback.get_host_port()
            keys = {(host, port), (listen_host, port)}
            self._keys = keys

            def register():
                for k in keys:
                    eng.listeners[k] = self

            eng.call(register)

    def _host_port(self):
        loc = self.fallback.contact_address.split("://", 1)[1]
        return parse_host_port(loc)

    def stop(self):
        eng = engine()
        if eng is not None and self._key is not None:
            keys = self._keys

            def unregister():
                for k in keys:
                    if eng.listeners.get(k) is self:
                        del eng.listeners[k]

            try:
                eng.call(unregister)
            except CommClosedError:
                pass
        self.fallback.stop()

    def _accept(self, comm):  # in the loop thread
        asyncio.ensure_future(self._handle(comm))

    async def _handle(self, comm):
        try:
            await self.on_connection(comm)
        except CommClosedError:
            logger.info("MPI connection from %s closed before handshake", comm.peer_address)
            return
        await self.comm_handler(comm)

    @property
    def listen_address(self):
        return self.prefix + self._loc(self.fallback.listen_address)

    @property
    def contact_address(self):
        return self.prefix + self._loc(self.fallback.contact_address)

    @staticmethod
    def _loc(addr):
        host, port = parse_host_port(addr.split("://", 1)[1])
        eng = engine()
        return unparse_mpi_address(host, port, eng.rank if eng is not None else None)


class MPIBackend(Backend):
    """``mpi://HOST:PORT/RANK``: MPI between data-plane peers, TCP/TLS for everyone else."""

    def get_connector(self):
        return MPIConnector()

    def get_listener(self, loc, handle_comm, deserialize, **connection_args):
        return MPIListener(loc, handle_comm, deserialize, **connection_args)

    def get_address_host(self, loc):
        return parse_mpi_address(loc)[0]

    def get_address_host_port(self, loc):
        host, port, _ = parse_mpi_address(loc)
        return host, port

    def resolve_address(self, loc):
        host, port, rank = parse_mpi_address(loc)
        return unparse_mpi_address(ensure_ip(host), port, rank)

    def get_local_address_for(self, loc):
        host, _, _ = parse_mpi_address(loc)
        return unparse_host_port(get_ip(ensure_ip(host)), None)


# --- a worker in a thread of the rank --------------------------------------------------------

class WorkerThread:
    """Handle on a ``distributed.Worker`` running in a thread of this process."""

    def __init__(self, scheduler_address, kwargs):
        self.status = "starting"
        self.error: BaseException | None = None
        self.address: str | None = None
        self.worker = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._stop_asked = False
        self.closing = False  # told to close by the scheduler or a client
        self.close_reason: str | None = None  # the first reason its close was called with
        self._args = (scheduler_address, kwargs)
        self.thread = threading.Thread(target=self._run, name="dask-mpi-worker", daemon=True)

    def _run(self):
        try:
            asyncio.run(self._main())
            if self.status != "failed":
                self.status = "closed"
        except BaseException as e:  # noqa: BLE001 - reported through the handle
            self.error, self.status = e, "failed"
            logger.debug("worker in the rank failed: %r", e)  # the caller says it
        finally:
            self._started.set()

    async def _main(self):
        from distributed import Worker

        scheduler_address, kwargs = self._args
        self.loop = asyncio.get_running_loop()
        worker = Worker(scheduler_address, **kwargs)
        self.worker = worker
        self._note_close_requests(worker)
        await worker
        self.address = worker.address
        self.status = "running"
        self._started.set()
        if self._stop_asked:
            await worker.close()
        await worker.finished()

    @property
    def asked_to_close(self) -> bool:
        """True when :meth:`stop`, the scheduler or a client told the worker to close: its
        end (or a failure during that close) is then no death."""
        return self._stop_asked or self.closing

    def _note_close_requests(self, worker) -> None:
        """Set :attr:`closing` when the scheduler (or a client) tells the worker to close,
        and :attr:`close_reason` when anything closes it (the worker's own calls go
        through the instance's ``close``)."""
        def noting(close):
            async def handler(*args, **kwargs):  # a coroutine function, as Worker.close:
                self.closing = True  # distributed awaits handlers that are
                return await close(*args, **kwargs)
            return handler

        for table, op in ((worker.stream_handlers, "close"), (worker.handlers, "terminate")):
            if op in table:
                table[op] = noting(table[op])
        close = worker.close

        async def recording(*args, **kwargs):
            if self.close_reason is None:
                self.close_reason = str(kwargs.get("reason", "worker-close"))
            return await close(*args, **kwargs)

        worker.close = recording

    def wait_started(self, timeout: float | None = None) -> str:
        """The worker's address once it runs; raises its error, or TimeoutError."""
        if not self._started.wait(timeout):
            raise TimeoutError(f"the worker did not start within {timeout} s")
        if self.error is not None:
            raise self.error
        if self.address is None:
            raise RuntimeError("the worker closed before it started")
        return self.address

    def stop(self) -> None:
        """Ask the worker to close; returns at once (thread-safe, idempotent)."""
        self._stop_asked = True
        loop, worker = self.loop, self.worker
        if loop is not None and worker is not None and not loop.is_closed():
            _post(loop, lambda: asyncio.ensure_future(worker.close()))  # (closed: nothing)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; True when it has."""
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def is_alive(self) -> bool:
        return self.thread.is_alive()


def start_worker_thread(comm, scheduler_address: str, *, name=None, nthreads: int = 1,
                        memory_limit="auto", security=None, host: str | None = None,
                        interface: str | None = None, worker_options: dict | None = None,
                        stall_timeout: float | None = None) -> WorkerThread:
    """Join the data plane on ``comm`` and start a Worker over ``mpi`` in a new thread.

    ``comm`` is a communicator reserved for the data plane (e.g. ``MPI.COMM_WORLD.Dup()``,
    created collectively by the caller); worker addresses carry ranks of ``comm``.
    ``security``: the job's ``distributed.Security`` (its TLS, if any, guards the TCP/TLS door
    of the worker's listener and its connections to the scheduler). ``host``/``interface``:
    where that door listens. ``worker_options``: further ``distributed.Worker`` arguments.
    """
    join(comm, stall_timeout)
    kwargs = dict(worker_options or {})
    kwargs.update(name=name, nthreads=nthreads, memory_limit=memory_limit, protocol="mpi")
    if security is not None:
        kwargs["security"] = security
    if host is not None:
        kwargs["host"] = host
    if interface is not None:
        kwargs["interface"] = interface
    handle = WorkerThread(scheduler_address, kwargs)
    handle.thread.start()
    return handle


def _register() -> None:
    """Make ``mpi://`` known even where the package's entry point is not installed (yet)."""
    from distributed.comm import registry

    registry.backends.setdefault("mpi", MPIBackend())


_register()
