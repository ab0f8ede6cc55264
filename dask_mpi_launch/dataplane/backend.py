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

Where the code is
-----------------
This module holds distributed's side: :class:`MPIComm` (one connection), the connector, the
listener (MPI for data-plane peers, its TCP/TLS fallback for everyone else) and
:class:`MPIBackend`, the name in the entry point. Below it:
:mod:`~dask_mpi_launch.dataplane.wire` (addresses, tags, the header format),
:mod:`~dask_mpi_launch.dataplane.engine` (the progress thread and its back-off),
:mod:`~dask_mpi_launch.dataplane.connections` (what that thread does per connection and
message) and :mod:`~dask_mpi_launch.dataplane.worker` (a rank's worker thread,
:func:`start_worker_thread`: the supervisor's API). Their public names are importable from
here too.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
import weakref

from distributed.comm.addressing import parse_host_port, unparse_host_port
from distributed.comm.core import BaseListener, Comm, CommClosedError, Connector
from distributed.comm.registry import Backend
from distributed.comm.utils import from_frames, to_frames
from distributed.utils import ensure_ip, get_ip

from dask_mpi_launch.dataplane.engine import (  # noqa: F401 - re-exported
    ANSWER_WINDOW, IDLE_AFTER, Engine, cores_busy, cpu_times, engine, join, shutdown)
from dask_mpi_launch.dataplane.wire import (  # noqa: F401 - re-exported
    CHEAP, CHUNK, KIND_DATA, NO_SPLIT, TAG_HEADER, _peer_address, cheap_to_serialize,
    chunk_spans, pack_header, parse_mpi_address, unpack_header, unparse_mpi_address)
from dask_mpi_launch.dataplane.worker import WorkerThread, start_worker_thread  # noqa: F401

logger = logging.getLogger(__name__)


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

    def _new_comm(self, eng, local_id, rank, announced):  # in the progress thread
        """The comm of a connection from ``rank`` that this listener accepts."""
        return MPIComm(eng, local_id, rank, self.contact_address,
                       _peer_address(announced, rank), self.deserialize, self.loop)

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


def _register() -> None:
    """Make ``mpi://`` known even where the package's entry point is not installed (yet)."""
    from distributed.comm import registry

    registry.backends.setdefault("mpi", MPIBackend())


_register()
