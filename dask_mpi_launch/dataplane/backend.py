"""Worker-to-worker data over MPI point-to-point: distributed's ``mpi`` comm backend.

With ``--protocol mpi`` every worker runs *inside* its MPI rank process, in a thread of its
own with its own asyncio loop (forked role processes cannot call MPI), and listens on a
hybrid address ``mpi://HOST:PORT/RANK``: an ordinary TCP or TLS listener (TLS when the job's
``Security`` has TLS) at ``HOST:PORT``, the rank of the data-plane communicator after the
slash. Every connection to it is a TCP/TLS connection, so the cluster's outside door stays
what it was and small messages go at a socket's speed; when both ends joined this job's data
plane (:func:`join`, done by :func:`start_worker_thread`), the connection's bulk frames go
over MPI point-to-point (:mod:`~dask_mpi_launch.dataplane.connections`). MPI traffic never
leaves the job: only ranks of the communicator take part, and only between peers that
announced the same job in distributed's handshake, over the job's TLS.

The backend is registered under the entry-point group ``distributed.comm.backends`` (name
``mpi``), so ``distributed`` finds it without patches.

Where the code is
-----------------
This module holds distributed's side: the connector, the listener and :class:`MPIBackend`,
the name in the entry point. Below it: :mod:`~dask_mpi_launch.dataplane.wire` (addresses,
the announcement format), :mod:`~dask_mpi_launch.dataplane.engine` (the progress thread),
:mod:`~dask_mpi_launch.dataplane.connections` (the comm: socket plus MPI) and
:mod:`~dask_mpi_launch.dataplane.worker` (a rank's worker thread,
:func:`start_worker_thread`: the supervisor's API). Their public names are importable from
here too.
"""
from __future__ import annotations

from distributed.comm.addressing import parse_host_port, unparse_host_port
from distributed.comm.core import BaseListener, Connector
from distributed.comm.registry import Backend
from distributed.utils import ensure_ip, get_ip

from dask_mpi_launch.dataplane.connections import (
    MPITCPConnector, MPITCPListener, MPITLSConnector, MPITLSListener)
from dask_mpi_launch.dataplane.engine import Engine, engine, join, shutdown
from dask_mpi_launch.dataplane.wire import (
    BULK_MIN, CHEAP, CHUNK, NO_SPLIT, cheap_to_serialize, chunk_spans, pack_announce,
    parse_mpi_address, split_frames, unpack_announce, unparse_mpi_address)
from dask_mpi_launch.dataplane.worker import WorkerThread, start_worker_thread

__all__ = [  # distributed's side, and the names of the modules below re-exported
    "MPIBackend", "MPIConnector", "MPIListener", "Engine", "engine", "join", "shutdown",
    "BULK_MIN", "CHEAP", "CHUNK", "NO_SPLIT", "cheap_to_serialize", "chunk_spans",
    "pack_announce", "parse_mpi_address", "split_frames", "unpack_announce",
    "unparse_mpi_address", "WorkerThread", "start_worker_thread"]


def _classes(connection_args, peer: bool):
    """(connector, listener) classes: TLS when the job's security has TLS; the MPI-capable
    ones for a data-plane peer, distributed's own for everyone else."""
    from distributed.comm.tcp import TCPConnector, TLSConnector

    if connection_args.get("ssl_context") is not None:
        return (MPITLSConnector if peer else TLSConnector), MPITLSListener
    return (MPITCPConnector if peer else TCPConnector), MPITCPListener


def _strip(connection_args):
    return {k: v for k, v in connection_args.items() if k != "mpi_only"}


class MPIConnector(Connector):
    async def connect(self, address, deserialize=True, **connection_args):
        host, port, rank = parse_mpi_address(address)
        eng = engine()
        peer = eng is not None and rank is not None and 0 <= rank < eng.size
        connector_class, _ = _classes(connection_args, peer)
        comm = await connector_class().connect(unparse_host_port(host, port),
                                               deserialize=deserialize,
                                               **_strip(connection_args))
        if peer:
            comm._peer_addr = "mpi://" + unparse_mpi_address(host, port, rank)
        return comm


class MPIListener(BaseListener):
    """A TCP/TLS listener whose connections move bulk frames over MPI between peers."""

    prefix = "mpi://"

    def __init__(self, loc, handle_comm, deserialize=True, allow_offload=True,
                 default_host=None, **connection_args):
        super().__init__()
        host, port, _ = parse_mpi_address(loc)
        _, listener_class = _classes(connection_args, True)
        self.fallback = listener_class(unparse_host_port(host, port), handle_comm,
                                       deserialize=deserialize, allow_offload=allow_offload,
                                       default_host=default_host, **_strip(connection_args))

    async def start(self):
        await self.fallback.start()

    def stop(self):
        self.fallback.stop()

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
