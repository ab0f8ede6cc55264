"""A control plane without MPI: messages through files in a shared directory.

For sites where mpi4py cannot match the site's MPI (``--bootstrap slurm``): each task knows
its rank and the number of tasks from Slurm (``SLURM_PROCID``, ``SLURM_NTASKS``), and the
ranks exchange the same small messages as over MPI (``control.py``) through a directory
scoped to the job step, on a file system every node sees. Every wait is bounded; the
directory is removed at the end.

Layout of the directory ``<dir>/dask-mpi-launch-<jobid>.<stepid>/``::

    inbox-<rank>/<seq>-<sender>.msg     one pickled message, written atomically
    reduce-<round>/<rank>               one rank's value for a bounded all-reduce
"""
from __future__ import annotations

import os
import pickle
import shutil
import time

from .errors import UsageError

POLL = 0.02  # seconds between looks at the file system while waiting


class FileControl:
    def __init__(self, directory: str, rank: int, size: int):
        self.rank = rank
        self.size = size
        self.directory = directory
        self._seq = 0
        self._round = 0
        self._seen: set[str] = set()
        self.inbox = os.path.join(directory, f"inbox-{rank}")
        os.makedirs(self.inbox, exist_ok=True)

    # -- point to point ---------------------------------------------------
    def send(self, dest: int, *message) -> None:
        inbox = os.path.join(self.directory, f"inbox-{dest}")
        os.makedirs(inbox, exist_ok=True)
        self._seq += 1
        name = f"{self._seq:08d}-{self.rank}.msg"
        _write_atomically(os.path.join(inbox, name), pickle.dumps(message))

    def broadcast(self, *message) -> None:
        for dest in range(self.size):
            if dest != self.rank:
                self.send(dest, *message)

    def poll(self) -> list[tuple]:
        received = []
        try:
            names = sorted(n for n in os.listdir(self.inbox) if n.endswith(".msg"))
        except FileNotFoundError:
            return received
        for name in names:
            if name in self._seen:
                continue
            self._seen.add(name)
            try:
                with open(os.path.join(self.inbox, name), "rb") as f:
                    received.append(pickle.load(f))
            except (OSError, EOFError, pickle.UnpicklingError):
                continue
        return received

    # -- collectives with a bound ----------------------------------------
    def _allreduce(self, value: int, combine, timeout: float, poll) -> int | None:
        self._round += 1
        folder = os.path.join(self.directory, f"reduce-{self._round}")
        os.makedirs(folder, exist_ok=True)
        _write_atomically(os.path.join(folder, str(self.rank)), str(value).encode())
        deadline = time.monotonic() + timeout
        while True:
            values = []
            for rank in range(self.size):
                try:
                    with open(os.path.join(folder, str(rank))) as f:
                        values.append(int(f.read()))
                except (OSError, ValueError):
                    break
            if len(values) == self.size:
                return combine(values)
            if time.monotonic() > deadline:
                return None
            if poll is not None:
                poll()
            time.sleep(POLL)

    def allreduce_max(self, value: int, timeout: float, poll=None) -> int | None:
        return self._allreduce(value, max, timeout, poll)

    def allreduce_sum(self, value: int, timeout: float, poll=None) -> int | None:
        return self._allreduce(value, sum, timeout, poll)

    def finish(self) -> None:
        pass

    def finalize(self) -> None:
        """The job's end (after the last all-reduce): every rank says it has left, and rank 0
        removes the directory once all have (bounded)."""
        left = os.path.join(self.directory, "left")
        os.makedirs(left, exist_ok=True)
        if self.rank != 0:
            _write_atomically(os.path.join(left, str(self.rank)), b"")
            return
        deadline = time.monotonic() + 10.0
        while len(os.listdir(left)) < self.size - 1 and time.monotonic() < deadline:
            time.sleep(POLL)
        shutil.rmtree(self.directory, ignore_errors=True)

    def abort(self, status: int) -> None:
        self.broadcast("stop", status, 3)
        os._exit(status)


def from_slurm(directory: str, env=os.environ) -> FileControl:
    """Rank and size from Slurm, the exchange directory scoped to this job step."""
    try:
        rank, size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        job = env["SLURM_JOB_ID"]
    except (KeyError, ValueError):
        raise UsageError(
            "--bootstrap slurm needs to run as the tasks of a Slurm job step "
            "(srun dask-mpi-launch --bootstrap slurm ...): SLURM_PROCID, SLURM_NTASKS and "
            "SLURM_JOB_ID are not all set"
        ) from None
    step = env.get("SLURM_STEP_ID", "batch")
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(
            f"--bootstrap-dir {directory} is not a writable directory: give one on a file "
            "system every node of the job sees (the home or project directory)"
        )
    return FileControl(os.path.join(os.path.abspath(directory),
                                    f"dask-mpi-launch-{job}.{step}"), rank, size)


def _write_atomically(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
