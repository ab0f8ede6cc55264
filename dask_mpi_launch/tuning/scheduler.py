"""Our scheduler role's changes to ``distributed.Scheduler``: registration in O(1), a
close in O(workers) (see :meth:`Scheduler.remove_worker`), departures announced in
batches (:meth:`Scheduler.worker_send`) and full garbage collections that skip the
registered workers (:class:`HeapFreezer`).

Every ``Scheduler.add_worker`` (distributed up to at least 2026.8) compares the new worker's
package versions with those of *every* connected worker::

    version_module.error_message(..., {w: ws.versions for w, ws in self.workers.items()}, ...)

so a burst of N workers costs O(N^2) scheduler CPU: at 10,000 workers each registration
spends tens of milliseconds there (``bin/bench-scale``'s cost model), and the scheduler's
event loop stalls while thousands of workers wait (dask/distributed#3691: a 33-s stall at
~5,500 workers on Summit; dask/dask-mpi#82: handshake timeouts at ~1,300 workers).

The comparison depends only on the *distinct* version sets among the workers, not on how
many workers share each one. This subclass counts the workers of each distinct set (a
scheduler plugin updated on every add and remove) and gives ``error_message`` one
representative per set instead of every worker. The warning is the same text, so a real
mismatch is still reported to the worker (and the client) exactly as before; only the cost
changes, from O(workers) to O(distinct version sets), normally 1.

The change is made on upstream's own ``add_worker`` source, replacing that one expression;
if a future ``distributed`` no longer contains it, ``Scheduler`` is upstream's method
unchanged (``PATCHED`` is False, and tests/test_scheduler_ext.py says so). Upstream fix:
the same index kept in ``Scheduler`` itself (add_worker/remove_worker), or compare the new
worker against the scheduler's versions and the distinct sets only.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import json
import logging
import textwrap

import distributed
import distributed.scheduler as _upstream
from distributed.core import AsyncTaskGroupClosedError
from distributed.diagnostics.plugin import SchedulerPlugin

logger = logging.getLogger(__name__)

UPSTREAM_EXPRESSION = "{w: ws.versions for w, ws in self.workers.items()}"
REPLACEMENT = "self._distinct_worker_versions()"


def version_key(versions) -> str:
    """What ``distributed.versions.error_message`` looks at in one worker's versions, as a
    hashable key: its ``packages`` (or "UNKNOWN" when the worker sent none).

    >>> version_key({"packages": {"dask": "1", "python": "3"}, "host": {"OS": "x"}})
    '{"dask": "1", "python": "3"}'
    >>> version_key(None) == version_key({})
    True
    """
    packages = versions.get("packages") if versions else "UNKNOWN"
    return json.dumps(packages, sort_keys=True, default=repr)


class VersionIndex(SchedulerPlugin):
    """Workers per distinct version set, kept up to date on every add and remove."""

    name = "dask-mpi-launch-version-index"

    def __init__(self):
        self.groups: dict[str, list] = {}  # key -> [number of workers, their versions]
        self.key_of: dict[str, str] = {}  # worker address -> key

    def add_worker(self, scheduler, worker: str) -> None:
        ws = scheduler.workers.get(worker)
        if ws is None or worker in self.key_of:
            return
        key = version_key(ws.versions)
        self.key_of[worker] = key
        group = self.groups.setdefault(key, [0, ws.versions])
        group[0] += 1

    def remove_worker(self, scheduler, worker: str, **kwargs) -> None:
        key = self.key_of.pop(worker, None)
        if key is None:
            return
        group = self.groups[key]
        group[0] -= 1
        if group[0] <= 0:
            del self.groups[key]

    def distinct(self) -> dict:
        """One entry per distinct version set: what ``error_message`` needs of the workers."""
        return {f"<{i} of {len(self.groups)} version sets>": versions
                for i, (_, versions) in enumerate(self.groups.values())}


def _patched_add_worker():
    """Upstream's ``add_worker`` with the O(workers) expression replaced, or None."""
    try:
        lines, first = inspect.getsourcelines(_upstream.Scheduler.add_worker)
    except (OSError, TypeError):
        return None
    # upstream's line numbers in tracebacks
    source = "\n" * (first - 1) + textwrap.dedent("".join(lines))
    if source.count(UPSTREAM_EXPRESSION) != 1:
        return None
    namespace: dict = {}
    filename = inspect.unwrap(_upstream.Scheduler.add_worker).__code__.co_filename
    code = compile(source.replace(UPSTREAM_EXPRESSION, REPLACEMENT), filename, "exec")
    exec(code, vars(_upstream), namespace)  # upstream's globals: its names resolve as before
    function = namespace.get("add_worker")
    if function is None:
        return None
    function.__qualname__ = "Scheduler.add_worker"
    function.__doc__ = _upstream.Scheduler.add_worker.__doc__
    return function


_ADD_WORKER = _patched_add_worker()
PATCHED = _ADD_WORKER is not None
if not PATCHED:
    logger.debug("distributed %s: Scheduler.add_worker changed upstream; registering "
                 "workers with its own version check", distributed.__version__)


class HeapFreezer(SchedulerPlugin):
    """Keeps the scheduler's long-lived objects out of Python's full garbage collections.

    A full (generation 2) collection walks every tracked object of the process, and it runs
    each time the long-lived heap has grown by a quarter: during a registration burst that
    is every few hundred workers, each one longer than the last. At 10,000 TLS workers the
    scheduler's collections took 70 s of its event loop (up to 5 s each, during which no
    connection is accepted, so the accept queue overflows and the connecting workers back
    off for tens of seconds; ``BENCH_SCALE_STALLS`` in ``benchmarks/scale.py``).

    What a registered worker leaves in the scheduler lives as long as the worker, so each
    time the cluster has grown by :attr:`growth` since the last time (from :attr:`from_workers`
    workers on), the young generations are collected (cheap) and everything that survived
    is frozen (``gc.freeze``): later collections skip it. The imported modules are frozen
    at the scheduler's start. The price: a reference cycle among frozen objects is freed
    only by its reference counts, never by the collector (distributed's state of a worker
    that leaves is freed by reference counting; a cycle left behind costs its memory only).
    """

    name = "dask-mpi-launch-heap-freezer"
    from_workers: int = 500
    growth: float = 1.25

    def __init__(self):
        self.frozen_at = 0
        self.freezes = 0
        self.freeze()

    def freeze(self) -> None:
        gc.collect(1)
        gc.freeze()
        self.freezes += 1

    def add_worker(self, scheduler, worker: str) -> None:
        self.grown(len(scheduler.workers))

    def grown(self, n: int) -> None:
        """The process now holds ``n`` workers: freeze if they grew enough since the last."""
        if n >= self.from_workers and n >= self.frozen_at * self.growth:
            self.frozen_at = n
            self.freeze()


class Scheduler(_upstream.Scheduler):
    """``distributed.Scheduler`` whose version check on registration costs O(distinct
    version sets) instead of O(workers), whose close and departures cost O(workers) in
    all, and whose heap is frozen as the cluster grows; everything else is upstream's."""

    def __init__(self, *args, **kwargs):
        import dask.config
        from dask.utils import parse_timedelta

        self._notices: dict = {}  # departed address -> its "remove-worker" notice, pending
        super().__init__(*args, **kwargs)
        self._version_index = VersionIndex()
        self.add_plugin(self._version_index)
        self._heap_freezer = HeapFreezer()
        self.add_plugin(self._heap_freezer)
        # quiet when idle (tuning/idle.py): on small clusters distributed asks for a heartbeat
        # from every worker every 0.5-1 s, the scheduler's main idle cost
        self._min_heartbeat = parse_timedelta(
            dask.config.get("mpi-launch.min-heartbeat-interval", 0) or 0, default="s")

    def heartbeat_worker(self, *args, **kwargs):
        reply = super().heartbeat_worker(*args, **kwargs)
        if self._min_heartbeat and isinstance(reply, dict) and "heartbeat-interval" in reply:
            reply["heartbeat-interval"] = max(reply["heartbeat-interval"], self._min_heartbeat)
        return reply

    #: seconds ``close()`` gives the workers to leave by themselves before it closes
    #: their connections (the scheduler role sets a share of its shutdown grace)
    leave_timeout: float = 5.0

    async def close(self, timeout=None, reason: str = "unknown"):
        """Upstream's, after the workers had the chance to leave politely: every worker is
        told to close (one message each, as upstream's close does) and given
        :attr:`leave_timeout` seconds to go, so that none is cut off mid-request (a
        heartbeat whose connection the scheduler closes is logged with a traceback)."""
        Status = _upstream.Status
        if self.status not in (Status.closing, Status.closed) and self.stream_comms:
            self._ending = set()  # remove_worker records departures only, from here
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.leave_timeout
            for comm in list(self.stream_comms.values()):
                with contextlib.suppress(Exception):
                    comm.send({"op": "close", "reason": "scheduler-close"})
            while (not self._ending >= set(self.stream_comms) and loop.time() < deadline):
                await asyncio.sleep(0.02)
        return await super().close(timeout=timeout, reason=reason)

    #: the close reason that makes a worker's rank start it again (roles.life.RESTART_REASON)
    restart_reason = "dask-mpi-launch-restart"

    async def restart_workers(self, workers=None, **kwargs):
        """Upstream's, where the workers' ranks play the nanny: upstream shuts the workers
        without a nanny down "hoping an external deployment system will restart them", so
        ``client.restart()`` with the default ``distributed.Worker`` left no worker and
        timed out. Here their close message says "restart" and each worker's rank starts
        it again at once (the same name, a fresh process); upstream then waits for them
        to come back as it waits for a nanny's worker."""
        addresses = list(self.workers) if workers is None else workers
        self._restarting = {a for a in addresses
                            if a in self.workers and not self.workers[a].nanny}
        try:
            return await super().restart_workers(workers, **kwargs)
        finally:
            self._restarting = set()

    async def remove_worker(self, address: str, *, stimulus_id: str, expected: bool = False,
                            close: bool = True):
        """Upstream's, except while the scheduler closes: then nothing to do.

        ``close()`` tells every worker to close; each connection that then ends runs
        ``remove_worker`` (``handle_worker``'s cleanup), and each removal notifies every
        remaining worker ("remove-worker") and walks them all again for the bandwidth
        table: O(N) per worker, O(N^2) for a cluster of N (≈5 s of scheduler CPU at 1,000
        workers, minutes at 10,000; bin/bench-scale's teardown column). Nothing is
        gained: no task is rescheduled and every worker is closing anyway. Upstream's
        ``close`` never calls ``remove_worker`` itself (its FIXME names
        dask/distributed#6390, the inconsistent notion of a closed worker), and the
        workers' reports are skipped once the scheduler shuts down (dask/distributed#5032):
        here the removals that are only the echo of the close are skipped too, as they
        already are once it is "closed". Upstream fix: return early in ``remove_worker``
        when ``status`` is closing, or send "remove-worker" once per batch of removals."""
        ending = getattr(self, "_ending", None)
        if ending is not None or self.status == _upstream.Status.closing:
            if ending is not None:
                ending.add(address)
            return "already-removed"
        if close and address in getattr(self, "_restarting", ()):
            bs = self.stream_comms.get(address)
            if bs is not None:
                with contextlib.suppress(Exception):
                    bs.send({"op": "close", "reason": self.restart_reason})
                close = False
        return await super().remove_worker(address, stimulus_id=stimulus_id,
                                           expected=expected, close=close)

    #: seconds during which the "remove-worker" notices of departures are gathered, to go
    #: out as one batch per remaining worker
    notice_delay: float = 0.05

    def worker_send(self, worker, msg):
        """Upstream's, except for the "remove-worker" notice of a departure: upstream's
        ``remove_worker`` sends it to every remaining worker, one ``BatchedSend.send``
        each (about 14 us), so a burst of M departures among N workers costs M x N sends
        in one stretch of the event loop. At 10,000 TLS workers, 126 departures during the
        registration burst (connections given up) stalled the scheduler's loop for 36 s
        (``bin/bench-scale``, its profile: ``remove_worker`` -> 1.07 million sends). Here
        the notices of :attr:`notice_delay` seconds are gathered and each remaining worker
        gets them in one send: O(N) per burst. The workers learn of a departure up to
        50 ms later, which upstream already allows for (a fetch from a worker that is gone
        fails and is retried elsewhere). Upstream fix: the same batching in
        ``remove_worker``."""
        if isinstance(msg, dict) and msg.get("op") == "remove-worker":
            pending = self._notices
            if not pending:
                try:
                    asyncio.get_running_loop().call_later(self.notice_delay, self._send_notices)
                except RuntimeError:  # no loop running here: as upstream
                    return super().worker_send(worker, msg)
            pending[msg.get("worker")] = msg  # the same notice, once per departed worker
            return None
        return super().worker_send(worker, msg)

    def _send_notices(self) -> None:
        pending, self._notices = self._notices, {}
        if self.status in (_upstream.Status.closing, _upstream.Status.closed):
            return  # every worker is told to close: no news for them
        # not about a worker that is back already (same address, registered again)
        msgs = [m for address, m in pending.items() if address not in self.workers]
        if not msgs:
            return
        for w in list(self.workers):
            bs = self.stream_comms.get(w)
            if bs is None:
                continue
            try:
                bs.send(*msgs)
            except (_upstream.CommClosedError, AttributeError):  # what upstream does
                with contextlib.suppress(AsyncTaskGroupClosedError):  # closing meanwhile
                    self._ongoing_background_tasks.call_soon(
                        self.remove_worker, address=w,
                        stimulus_id=f"worker-send-comm-fail-{_upstream.time()}")

    def _distinct_worker_versions(self) -> dict:
        index = self._version_index
        if len(index.key_of) != len(self.workers):  # never expected: then be exact
            return {w: ws.versions for w, ws in self.workers.items()}
        return index.distinct()

    if PATCHED:
        add_worker = _ADD_WORKER
