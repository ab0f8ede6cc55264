"""Which rank plays which role. Pure: no MPI, no Dask.

=========  ===============================  ============================  ========
layout     rank 0                           rank 1                        others
=========  ===============================  ============================  ========
dedicated  scheduler                        client (the script)           workers
compact    scheduler + client               worker                        workers
full       scheduler + client + worker      worker                        workers
=========  ===============================  ============================  ========

Without a client (cluster-only mode, no script), the client role simply disappears:
``dedicated`` and ``compact`` then both put the scheduler on rank 0 and workers on the
others. Without a scheduler (join mode, ``--no-scheduler``), every rank runs workers that
join a running cluster.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError, WorldTooSmallError

SCHEDULER = "scheduler"
CLIENT = "client"
WORKER = "worker"

LAYOUTS = ("dedicated", "compact", "full")


@dataclass(frozen=True)
class Layout:
    name: str
    size: int
    has_client: bool = True
    has_scheduler: bool = True  # False: join mode, every rank adds workers to a cluster

    def __post_init__(self):
        if self.name not in LAYOUTS:
            raise UsageError(
                f"unknown layout {self.name!r}: choose one of {', '.join(LAYOUTS)}"
            )

    @property
    def client_rank(self) -> int | None:
        if not self.has_client or not self.has_scheduler:
            return None
        return 1 if self.name == "dedicated" else 0

    def roles(self, rank: int) -> tuple[str, ...]:
        """The roles of ``rank``, in start order."""
        if not self.has_scheduler:
            return (WORKER,)
        if rank == 0:
            roles = [SCHEDULER]
            if self.client_rank == 0:
                roles.append(CLIENT)
            if self.name == "full":
                roles.append(WORKER)
            return tuple(roles)
        if rank == self.client_rank:
            return (CLIENT,)
        return (WORKER,)

    @property
    def worker_ranks(self) -> list[int]:
        return [r for r in range(self.size) if WORKER in self.roles(r)]

    @property
    def min_size(self) -> int:
        return min_size(self.name, self.has_client) if self.has_scheduler else 1

    def check(self) -> None:
        """Raise WorldTooSmallError with the fix when the world cannot hold the layout."""
        need = self.min_size
        if self.size < need:
            hint = f"run with mpiexec -n {need} or more"
            if self.name == "dedicated" and self.has_client:
                hint += " (or --layout compact from 2 ranks, --layout full from 1)"
            raise WorldTooSmallError(
                f"needs at least {need} ranks (got {self.size}): {hint}"
            )


def min_size(name: str, has_client: bool = True) -> int:
    """Smallest world with a scheduler, the client (if any) and at least one worker."""
    if name == "full":
        return 1
    if name == "dedicated" and has_client:
        return 3
    return 2
