"""The data plane's wire format, pure functions only (no MPI, no threads).

- addresses: ``mpi://HOST:PORT/RANK`` parsed and written (:func:`parse_mpi_address`);
- a message between two data-plane peers travels on their ordinary TCP/TLS connection as
  distributed frames it: first an announcement (:func:`pack_announce`: the MPI tag, the
  :data:`CHEAP` bit, each bulk frame's index and size), then the message's frames, where a
  bulk frame (:data:`BULK_MIN` bytes or more, :func:`split_frames`) is an empty placeholder;
  the bulk frames follow over MPI on that tag (at least :data:`BULK_TAG_BASE`), in
  :func:`chunk_spans` of at most :data:`CHUNK` bytes;
- how long a message may take (:func:`transfer_deadline`) and whether it is cheap to
  (de)serialize in the event loop (:func:`cheap_to_serialize`).
"""
from __future__ import annotations

import struct
import sys

from distributed.comm.addressing import parse_host_port, unparse_host_port
from distributed.sizeof import safe_sizeof
from distributed.utils import ensure_memoryview

BULK_TAG_BASE = 1024  # MPI tags of bulk frames: BULK_TAG_BASE .. the MPI's TAG_UB
CHUNK = 2**30  # bytes per MPI message: well below the C int count limit (2**31 - 1)
BULK_MIN = 2**18  # bytes: a frame this large goes over MPI, smaller ones on the socket
# (measured, bin/bench-data: at 64 KiB the socket's wake-up beats the progress thread's
# hand-offs; from a few hundred KiB MPI's single copy wins)
NO_SPLIT = 2**62  # distributed splits frames at 64 MiB unless told a larger size; we chunk
# ourselves, and unsplit frames need no merging copy on the receiving side
RATE_FLOOR = 100e6  # bytes/s a transfer is granted on top of the stall timeout

MAGIC = b"DMLB"
CHEAP = 0x80  # flag of an announcement: the frames are plain buffers (NumPy arrays, bytes)
# that deserialize in O(1), so the receiver does it in its loop instead of a thread
_ANNOUNCE = struct.Struct("<4sBxxxQI")  # magic, flags, tag, number of bulk frames
_BIG = struct.Struct("<IQ")  # a bulk frame's index and size


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


def split_frames(frames, bulk_min: int = BULK_MIN):
    """(the frames for the socket, [(index, memoryview)] of the bulk frames): a bulk frame
    (``bulk_min`` bytes or more) leaves an empty placeholder on the socket and goes over MPI.

    >>> sock, big = split_frames([b"ab", bytes(10)], bulk_min=4)
    >>> [bytes(f) for f in sock], [(i, v.nbytes) for i, v in big]
    ([b'ab', b''], [(1, 10)])
    """
    sock, big = [], []
    for i, f in enumerate(frames):
        v = ensure_memoryview(f)
        if v.nbytes >= bulk_min:
            big.append((i, v))
            sock.append(b"")
        else:
            sock.append(f)
    return sock, big


def pack_announce(tag: int, cheap: bool, big) -> bytes:
    """The first frame of every message between two data-plane peers: the MPI tag its bulk
    frames travel on, whether it is cheap to deserialize, each bulk frame's index and size.

    >>> unpack_announce(pack_announce(1500, True, [(2, memoryview(bytes(7)))]))
    (1500, True, {2: 7})
    """
    head = bytearray(_ANNOUNCE.pack(MAGIC, CHEAP if cheap else 0, tag, len(big)))
    for i, v in big:
        head += _BIG.pack(i, v.nbytes)
    return bytes(head)


def unpack_announce(buf) -> tuple[int, bool, dict[int, int]]:
    """announcement -> (tag, cheap, {frame index: size}).

    >>> unpack_announce(b"nonsense-nonsense-nonsense")
    Traceback (most recent call last):
    ValueError: not a dask-mpi-launch data-plane announcement
    """
    mv = memoryview(buf).cast("B")
    if mv.nbytes < _ANNOUNCE.size:
        raise ValueError("not a dask-mpi-launch data-plane announcement")
    magic, flags, tag, n = _ANNOUNCE.unpack_from(mv)
    if magic != MAGIC or mv.nbytes != _ANNOUNCE.size + n * _BIG.size:
        raise ValueError("not a dask-mpi-launch data-plane announcement")
    big = dict(_BIG.iter_unpack(mv[_ANNOUNCE.size:]))
    return tag, bool(flags & CHEAP), big


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
