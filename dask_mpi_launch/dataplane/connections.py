"""A connection between two data-plane peers: its socket for messages, MPI for bulk frames.

Every ``mpi://`` connection is an ordinary TCP or TLS connection (distributed's own
:class:`~distributed.comm.tcp.TCP`/``TLS`` comm, subclassed here), so small messages (a
task's result of a few bytes, every scheduler and control message) go at a socket's speed:
the reading event loop wakes the moment they arrive, with no thread between. During
distributed's handshake each side says whether it is a data-plane peer, of which job and
rank (:meth:`BulkMixin.handshake_info`); when both are peers of the same job, every later
message on that connection is framed as :mod:`~dask_mpi_launch.dataplane.wire` says: an
announcement first, then the frames, where each frame of :data:`~.wire.BULK_MIN` bytes or
more is an empty placeholder and travels over MPI instead. The writer posts its ``Isend``
calls right after writing the announcement; the reader posts ``Irecv`` into freshly
allocated buffers (which become the frames: NumPy arrays end up backed by them, no copy)
the moment it reads it. The progress engine tests those requests only while they are in
flight.

Failure: a bulk transfer still incomplete after ``distributed.comm.timeouts.tcp`` plus one
second per 100 MB, or an MPI error, aborts the connection with ``CommClosedError``; a socket
that closes does what it does for TCP.
"""
from __future__ import annotations

import struct

from distributed.comm.core import CommClosedError
from distributed.comm.tcp import (
    TCP, TLS, TCPConnector, TCPListener, TLSConnector, TLSListener, _add_frames_header,
    convert_stream_closed_error, read_bytes_rw)
from distributed.comm.utils import from_frames, to_frames
from distributed.protocol.utils import host_array, unpack_frames
from distributed.utils import ensure_memoryview
from ssl import SSLError
from tornado.iostream import StreamClosedError

from dask_mpi_launch.dataplane.engine import engine
from dask_mpi_launch.dataplane.wire import (
    NO_SPLIT, cheap_to_serialize, pack_announce, split_frames, unpack_announce)

C_INT_MAX = 2**31 - 1  # bytes per write into the stream (as distributed's TCP)


class BulkMixin:
    """Over distributed's TCP/TLS comm: bulk frames over MPI once both ends are peers."""

    _peer_rank: int | None = None  # decided after the handshake; -1: not a peer

    def handshake_info(self):
        info = super().handshake_info()
        eng = engine()
        if eng is not None:
            info["mpi_dataplane"] = {"job": eng.job, "rank": eng.rank}
            info["compression"] = None  # MPI moves bytes faster than lz4 squeezes them
        return info

    def bulk_peer(self) -> int | None:
        """The peer's rank when bulk frames go over MPI, else None (before and during the
        handshake, with a process that is no peer, or one of another job)."""
        rank = self._peer_rank
        if rank is None:
            if not self.remote_info:
                return None
            rank = self._peer_rank = _peer_rank(self.local_info, self.remote_info)
        return rank if rank >= 0 else None

    async def write(self, msg, serializers=None, on_error="message"):
        peer = self.bulk_peer()
        if peer is None:
            return await super().write(msg, serializers, on_error)
        if self.stream is None:
            raise CommClosedError()
        cheap = cheap_to_serialize(msg)
        frames = await to_frames(
            msg, allow_offload=self.allow_offload and not cheap, serializers=serializers,
            on_error=on_error, context={"sender": self.local_info, "recipient": self.remote_info,
                                        **self.handshake_options},
            frame_split_size=NO_SPLIT)
        frames, big = split_frames(frames)
        eng = engine() if big else None
        if big and eng is None:
            raise CommClosedError("the MPI data plane is shut down")
        tag = eng.new_tag() if big else 0
        n = self._write_frames([pack_announce(tag, cheap, big), *frames])
        if big:
            n += await self._bulk(eng.send, peer, tag, big)
        return n

    async def read(self, deserializers=None):
        peer = self.bulk_peer()
        if peer is None:
            return await super().read(deserializers)
        frames = await self._read_frames()
        try:
            tag, cheap, big = unpack_announce(frames[0])
        except ValueError:
            self.abort()
            raise CommClosedError("garbage from a data-plane peer") from None
        frames = frames[1:]
        if big:
            eng = engine()
            if eng is None:
                raise CommClosedError("the MPI data plane is shut down")
            buffers = []
            for i, size in sorted(big.items()):
                frames[i] = host_array(size)
                buffers.append(frames[i])
            await self._bulk(eng.receive, peer, tag, buffers)
        try:
            return await from_frames(frames, deserialize=self.deserialize,
                                     deserializers=deserializers,
                                     allow_offload=self.allow_offload and not cheap)
        except EOFError:
            self.abort()
            raise CommClosedError("aborted stream on truncated data") from None

    async def _bulk(self, call, peer, tag, what) -> int:
        """Post the MPI side of a message and wait for it; a failure ends the connection."""
        try:
            return await call(peer, tag, what)
        except CommClosedError:
            self.abort()
            raise

    def _write_frames(self, frames) -> int:
        """distributed's TCP framing of ``frames`` into the stream (as ``TCP.write``)."""
        stream = self.stream
        frames, frames_nbytes, total = _add_frames_header(frames)
        try:
            for nb, frame in zip(frames_nbytes, frames):
                frame = ensure_memoryview(frame)
                for i in range(0, nb, C_INT_MAX):
                    if stream._write_buffer is None:
                        raise StreamClosedError()
                    chunk = frame[i:i + C_INT_MAX]
                    stream._write_buffer.append(chunk)
                    stream._total_write_index += chunk.nbytes
            stream.write(b"")
        except StreamClosedError as e:
            self.stream = None
            self._closed = True
            convert_stream_closed_error(self, e)
        except BaseException:
            self.abort()
            raise
        return total

    async def _read_frames(self) -> list:
        """One message's frames from the stream (as ``TCP.read``)."""
        stream = self.stream
        if stream is None:
            raise CommClosedError()
        try:
            (nosplit,) = struct.unpack("Q", await stream.read_bytes(8))
            frames, buffers_nbytes = unpack_frames(await read_bytes_rw(stream, nosplit),
                                                   partial=True)
            for n in buffers_nbytes:
                frames.append(await read_bytes_rw(stream, n))
        except (StreamClosedError, SSLError) as e:
            self.stream = None
            self._closed = True
            convert_stream_closed_error(self, e)
        except BaseException:
            self.abort()
            raise
        return frames


def _peer_rank(local: dict, remote: dict) -> int:
    """The peer's rank when both ends are data-plane peers of one job, else -1.

    >>> me = {"mpi_dataplane": {"job": "tls://10.0.0.1:8786", "rank": 2}}
    >>> _peer_rank(me, {"mpi_dataplane": {"job": "tls://10.0.0.1:8786", "rank": 3}})
    3
    >>> _peer_rank(me, {"mpi_dataplane": {"job": "tls://10.0.0.9:8786", "rank": 3}})
    -1
    >>> _peer_rank(me, {"compression": None}), _peer_rank({}, me)
    (-1, -1)
    """
    mine, theirs = local.get("mpi_dataplane"), remote.get("mpi_dataplane")
    if not (isinstance(mine, dict) and isinstance(theirs, dict)):
        return -1
    rank = theirs.get("rank")
    if theirs.get("job") != mine.get("job") or not isinstance(rank, int) or rank < 0:
        return -1
    return rank if rank != mine.get("rank") else -1


class MPITCP(BulkMixin, TCP):
    """A TCP connection that moves bulk frames over MPI between peers."""


class MPITLS(BulkMixin, TLS):
    """A TLS connection that moves bulk frames over MPI between peers."""


class MPITCPConnector(TCPConnector):
    comm_class = MPITCP


class MPITLSConnector(TLSConnector):
    comm_class = MPITLS


class MPITCPListener(TCPListener):
    comm_class = MPITCP


class MPITLSListener(TLSListener):
    comm_class = MPITLS
