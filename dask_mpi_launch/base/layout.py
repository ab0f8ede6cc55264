"""Which rank plays which role. Pure: no MPI, no Dask.

=========  ==============================  =============================  =======
layout     scheduler rank (S, default 0)   client rank (C)                others
=========  ==============================  =============================  =======
dedicated  scheduler                       client (the script), C != S    workers
compact    scheduler + client (C = S)      --                             workers
full       scheduler (+ client if C = S)   client, when C != S            workers
           + worker                        + worker
=========  ==============================  =============================  =======

``dedicated`` and ``compact`` are dask-mpi's *exclusive workers* (no worker on the
scheduler's or the client's rank); ``full`` is its *inclusive workers*: every rank runs a
worker. The client rank defaults to 1 in ``dedicated`` (0 when the scheduler is on rank 1)
and to the scheduler's rank otherwise, so the defaults are the table of dask-mpi's
``execute()`` (scheduler 0, client 1).

Without a client (cluster-only mode, no script), the client role simply disappears:
``dedicated`` and ``compact`` then both put the scheduler on its rank and workers on the
others. Without a scheduler (join mode, ``--no-scheduler``), every rank runs workers that
join a running cluster.
"""
from __future__ import annotations

from dask_mpi_launch.base.errors import UsageError, WorldTooSmallError
from dask_mpi_launch.base.record import Record

SCHEDULER = "scheduler"
CLIENT = "client"
WORKER = "worker"

LAYOUTS = ("dedicated", "compact", "full")


class Layout(Record):
    name: str
    size: int
    has_client: bool = True
    has_scheduler: bool = True  # False: join mode, every rank adds workers to a cluster
    scheduler_rank: int = 0
    # None: the layout's default; after construction, the rank of the client role, or
    # None when there is none (cluster-only and join modes)
    client_rank: int | None = None

    def __post_init__(self):
        if self.name not in LAYOUTS:
            raise UsageError(
                f"unknown layout {self.name!r}: choose one of {', '.join(LAYOUTS)}"
            )
        for what, value in (("--scheduler-rank", self.scheduler_rank),
                            ("client rank", self.client_rank)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise UsageError(f"invalid {what} {value!r}: give a rank number, 0 or more")
        client = self.client_rank
        if not self.has_client or not self.has_scheduler:
            client = None
        elif client is None:
            client = self.default_client_rank(self.name, self.scheduler_rank)
        elif self.name == "dedicated" and client == self.scheduler_rank:
            raise UsageError(
                f"the dedicated layout runs the client on its own rank, not on the "
                f"scheduler's rank {client}: choose another client rank, or --layout compact"
            )
        elif self.name == "compact" and client != self.scheduler_rank:
            raise UsageError(
                f"the compact layout runs the client on the scheduler's rank "
                f"{self.scheduler_rank}, not {client}: drop the client rank, or use "
                "--layout dedicated"
            )
        object.__setattr__(self, "client_rank", client)

    @staticmethod
    def default_client_rank(name: str, scheduler_rank: int = 0) -> int:
        if name == "dedicated":
            return 0 if scheduler_rank == 1 else 1
        return scheduler_rank

    @property
    def exclusive_workers(self) -> bool:
        """dask-mpi's term: no worker on the scheduler's and the client's ranks."""
        return self.name != "full"

    def roles(self, rank: int) -> tuple[str, ...]:
        """The roles of ``rank``, in start order."""
        if not self.has_scheduler:
            return (WORKER,)
        roles = []
        if rank == self.scheduler_rank:
            roles.append(SCHEDULER)
        if rank == self.client_rank:
            roles.append(CLIENT)
        if self.name == "full" or not roles:
            roles.append(WORKER)
        return tuple(roles)

    @property
    def worker_ranks(self) -> list[int]:
        return [r for r in range(self.size) if WORKER in self.roles(r)]

    @property
    def min_size(self) -> int:
        if not self.has_scheduler:
            return 1
        busy = [self.scheduler_rank]
        if self.client_rank is not None:
            busy.append(self.client_rank)
        need = max(busy) + 1
        if self.exclusive_workers:
            need = max(need, len(set(busy)) + 1)  # and one rank left for a worker
        return max(need, min_size(self.name, self.has_client))

    def check(self) -> None:
        """Raise WorldTooSmallError with the fix when the world cannot hold the layout."""
        need = self.min_size
        if self.size >= need:
            return
        usual = min_size(self.name, self.has_client) if self.has_scheduler else 1
        if need > usual:  # the chosen ranks, not the layout, ask for more
            where = f"the scheduler on rank {self.scheduler_rank}"
            if self.client_rank is not None and self.client_rank != self.scheduler_rank:
                where += f" and the client on rank {self.client_rank}"
            extra = " and a worker" if self.exclusive_workers else ""
            hint = f"{where}{extra} need mpiexec -n {need} or more"
        else:
            hint = f"run with mpiexec -n {need} or more"
            if self.name == "dedicated" and self.has_client:
                hint += " (or --layout compact from 2 ranks, --layout full from 1)"
        raise WorldTooSmallError(f"needs at least {need} ranks (got {self.size}): {hint}")


def min_size(name: str, has_client: bool = True) -> int:
    """Smallest world with a scheduler, the client (if any) and at least one worker, with
    the scheduler on rank 0 and the client on its default rank."""
    if name == "full":
        return 1
    if name == "dedicated" and has_client:
        return 3
    return 2


def layout_name(exclusive_workers: bool, scheduler_rank: int = 0,
                client_rank: int | None = None) -> str:
    """dask-mpi's (exclusive_workers, scheduler_rank, client_rank) as one of our layouts."""
    if not exclusive_workers:
        return "full"
    if client_rank is not None and client_rank == scheduler_rank:
        return "compact"
    return "dedicated"
