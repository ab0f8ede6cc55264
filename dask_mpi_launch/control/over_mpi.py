"""The control plane between ranks: small pickled messages over MPI, never a blocking wait.

Every wait here polls (``improbe`` / ``Test``) against a deadline, so a rank that died or
hangs turns into a bounded error instead of a job that sits in a collective until walltime.

Messages are typed records (``base/messages.py``), sent as tuples ``(kind, *fields)`` of
plain data (str, int, float, list, dict, None); their table is ``docs/messages.rst``.

Two implementations share the :class:`ControlPlane` interface: :class:`Control` over an MPI
communicator, and ``control.over_files.FileControl`` (files in a shared directory, no MPI).
"""
from __future__ import annotations

import time
from array import array
from collections.abc import Callable

TAG = 0x6D6C  # "ml"


class ControlPlane:
    """What a supervisor needs from the messages between ranks (an interface, duck-typed:
    not ``typing.Protocol``, which thin ranks do not import). Nothing blocks without a
    bound; ``poll`` is called while a collective waits (to keep serving children)."""

    rank: int
    size: int

    def send(self, dest: int, *message) -> None: ...

    def broadcast(self, *message) -> None: ...

    def poll(self) -> list: ...

    def flush(self, timeout: float) -> None: ...

    def allreduce_max(self, value: int, timeout: float,
                      poll: Callable[[], None] | None = None) -> int | None: ...

    def allreduce_sum(self, value: int, timeout: float,
                      poll: Callable[[], None] | None = None) -> int | None: ...

    def finish(self) -> None: ...

    def finalize(self) -> None: ...

    def abort(self, status: int) -> None: ...


class Control:
    def __init__(self, comm):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self._sends = []
        self._loopback = []

    # -- point to point ---------------------------------------------------
    def send(self, dest: int, *message) -> None:
        if dest == self.rank:
            self._loopback.append(message)
            return
        self._sends.append(self.comm.isend(message, dest=dest, tag=TAG))
        self._reap_sends()

    def broadcast(self, *message) -> None:
        for dest in range(self.size):
            if dest != self.rank:
                self.send(dest, *message)

    def poll(self) -> list[tuple]:
        """All messages that have arrived, without waiting."""
        received, self._loopback = self._loopback, []
        while True:
            msg = self.comm.improbe(source=self.MPI.ANY_SOURCE, tag=TAG)
            if msg is None:
                break
            received.append(msg.recv())
        self._reap_sends()
        return received

    def _reap_sends(self) -> None:
        self._sends = [r for r in self._sends if not r.Test()]

    def flush(self, timeout: float) -> None:
        """Wait (bounded) until every message sent so far has left."""
        deadline = time.monotonic() + timeout
        while self._sends and time.monotonic() < deadline:
            self._reap_sends()
            time.sleep(0.001)

    # -- collectives with a bound ----------------------------------------
    def allreduce_max(self, value: int, timeout: float, poll=None) -> int | None:
        """Max of ``value`` over all ranks, or None if not every rank joined in time.

        ``poll`` is called while waiting (to keep reaping children, reading pipes...).
        """
        send = array("l", [value])
        recv = array("l", [0])
        req = self.comm.Iallreduce(send, recv, op=self.MPI.MAX)
        if not self._wait(req, timeout, poll):
            return None
        return recv[0]

    def allreduce_sum(self, value: int, timeout: float, poll=None) -> int | None:
        send = array("l", [value])
        recv = array("l", [0])
        req = self.comm.Iallreduce(send, recv, op=self.MPI.SUM)
        if not self._wait(req, timeout, poll):
            return None
        return recv[0]

    def _wait(self, req, timeout, poll) -> bool:
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while not req.Test():
            if time.monotonic() > deadline:
                return False
            if poll is not None:
                poll()
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
        return True

    def finish(self) -> None:
        """Drop unread messages and finished sends; call before MPI_Finalize."""
        self._loopback = []
        while True:
            msg = self.comm.improbe(source=self.MPI.ANY_SOURCE, tag=TAG)
            if msg is None:
                break
            msg.recv()
        self.flush(1.0)
        for req in self._sends:
            try:
                req.Cancel()
                req.Free()
            except Exception:
                pass
        self._sends = []

    def finalize(self) -> None:
        self.MPI.Finalize()

    def abort(self, status: int) -> None:
        self.comm.Abort(status)
