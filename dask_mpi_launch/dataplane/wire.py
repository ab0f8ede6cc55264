"""The data plane's wire format, pure functions only (no MPI, no threads).

- addresses: ``mpi://HOST:PORT/RANK`` parsed and written (:func:`parse_mpi_address`);
- tags: :data:`TAG_CONNECT` (connect requests), :data:`TAG_HEADER` (a message's header, an
  accept, a close), ``DATA_TAG_BASE + receiver's connection id`` (large frames);
- a message's header (:func:`pack_header`/:func:`unpack_header`): magic, kind, connection
  id, frame count, chunk size, then each frame's size, small frames inline; large frames
  follow on the data tag in :func:`chunk_spans` of at most :data:`CHUNK` bytes;
- how long a message may take (:func:`transfer_deadline`) and whether it is cheap to
  (de)serialize in the event loop (:func:`cheap_to_serialize`, the header's :data:`CHEAP` bit).
"""
from __future__ import annotations

import struct
import sys

from distributed.comm.addressing import parse_host_port, unparse_host_port
from distributed.sizeof import safe_sizeof
from distributed.utils import ensure_memoryview

TAG_CONNECT = 101
TAG_HEADER = 103
DATA_TAG_BASE = 1024
CHUNK = 2**30  # bytes per MPI message: well below the C int count limit (2**31 - 1)
INLINE_MAX = 64 * 2**10  # frames up to this size travel inside the header ...
INLINE_TOTAL = 2**20  # ... while the header's inline bytes stay below this
NO_SPLIT = 2**62  # distributed splits frames at 64 MiB unless told a larger size; we chunk
# ourselves, and unsplit frames need no merging copy on the receiving side
RATE_FLOOR = 100e6  # bytes/s a transfer is granted on top of the stall timeout

MAGIC = b"DMLM"
KIND_DATA, KIND_CLOSE, KIND_ACCEPT = 0, 1, 2
CHEAP = 0x80  # bit of a KIND_DATA header's kind: the frames are plain buffers (NumPy arrays,
# bytes) that deserialize in O(1), so the receiver does it in its loop instead of a thread
_HEAD = struct.Struct("<4sBxxxIIQ")  # magic, kind, connection id, nframes, chunk
_INLINE_BIT = 1 << 63


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
