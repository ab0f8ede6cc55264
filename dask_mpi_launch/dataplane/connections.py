"""What the data plane's progress thread does for each connection and message.

:class:`Connections` is the part of :class:`~dask_mpi_launch.dataplane.engine.Engine` (which
inherits it, and owns the state it uses) that speaks the wire format of
:mod:`~dask_mpi_launch.dataplane.wire`:

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

Requests in flight are :class:`_Op` objects that the engine tests; results reach the
event loops through :func:`_post`.
"""
from __future__ import annotations

import collections
import json
import logging
import struct
import time

from distributed.comm.core import CommClosedError
from distributed.protocol.utils import host_array

from dask_mpi_launch.dataplane.wire import (
    CHEAP, DATA_TAG_BASE, KIND_ACCEPT, KIND_CLOSE, KIND_DATA, TAG_CONNECT, TAG_HEADER,
    chunk_spans, pack_header, parse_mpi_address, transfer_deadline, unpack_header)

logger = logging.getLogger(__name__)

SPIN_RATE = 5e8  # bytes/s: the progress thread spins while transfers may still run at this


def _post(loop, callback, *args) -> None:
    """Run ``callback`` in ``loop``'s thread; nothing when that loop has closed already (a
    worker that ended while a message for it was still arriving)."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # "Event loop is closed"
        pass


def _noop(*_):
    pass


def _resolve(fut, value):
    if not fut.done():
        fut.set_result(value)


def _fail(fut, exc):
    if not fut.done():
        fut.set_exception(exc)


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


class Connections:
    """Connection set-up, a message's sends and receives, delivery and close: the steps the
    progress thread (and, for :meth:`_send`, the writing loop) takes on the state of the
    :class:`~dask_mpi_launch.dataplane.engine.Engine` that inherits them."""

    def _spin(self, nbytes: int) -> None:
        self.spin_until = max(self.spin_until, time.monotonic() + 0.05 + nbytes / SPIN_RATE)

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
            comm = listener._new_comm(self, my_id, source, info.get("from"))
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
