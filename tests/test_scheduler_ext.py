"""Our scheduler's O(1) version check (dask_mpi_launch/tuning/scheduler.py): the same warnings
as upstream's, a real version mismatch still reported. In-process, no MPI."""
from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import random
import re

import distributed
import pytest
from distributed.versions import error_message, get_versions

from dask_mpi_launch.tuning import scheduler


def test_the_change_applies_to_the_installed_distributed():
    # if this fails, upstream's add_worker changed: look whether it still compares every
    # worker (then adapt UPSTREAM_EXPRESSION) or was fixed upstream (then drop the module)
    assert scheduler.PATCHED, distributed.__version__
    assert scheduler.Scheduler.add_worker is not distributed.Scheduler.add_worker
    assert issubclass(scheduler.Scheduler, distributed.Scheduler)
    patched = inspect.unwrap(scheduler.Scheduler.add_worker).__code__
    assert "_distinct_worker_versions" in patched.co_names
    assert "_distinct_worker_versions" not in \
        inspect.unwrap(distributed.Scheduler.add_worker).__code__.co_names


class _WS:
    def __init__(self, versions):
        self.versions = versions


class _Sched:
    def __init__(self):
        self.workers = {}


def _variant(base, **packages):
    v = copy.deepcopy(base)
    v["packages"].update(packages)
    return v


def test_distinct_sets_give_upstreams_message_after_adds_and_removes():
    base = get_versions()
    choices = [base, copy.deepcopy(base), _variant(base, dask="0.0.1"),
               _variant(base, numpy=None), None]
    rnd = random.Random(1)
    sched, index = _Sched(), scheduler.VersionIndex()
    for step in range(300):
        if sched.workers and rnd.random() < 0.4:
            address = rnd.choice(sorted(sched.workers))
            del sched.workers[address]
            index.remove_worker(sched, address)
        else:
            address = f"tls://10.0.0.{step}:1"
            sched.workers[address] = _WS(copy.deepcopy(rnd.choice(choices)))
            index.add_worker(sched, address)
        everyone = {w: ws.versions for w, ws in sched.workers.items()}
        source = rnd.choice(choices)
        ours = error_message(base, index.distinct(), source)
        upstream = error_message(base, everyone, source)
        # the same table, but for the order within a set of versions (hash order)
        assert bool(ours["warning"]) == bool(upstream["warning"])
        assert _words(ours["warning"]) == _words(upstream["warning"])
        assert ours["error"] == upstream["error"]
        assert len(index.distinct()) <= len(choices) - 1  # None and {} are one set


async def _registrations(scheduler_class) -> list[str]:
    """The version warning each of five workers receives when it registers: two alike,
    one with another dask version, one alike while that one is connected, one after it
    left."""
    warnings: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            if "Mismatched versions" in record.getMessage():
                warnings[-1] = record.getMessage()

    handler = Catch()
    log = logging.getLogger("distributed.worker")
    log.addHandler(handler)
    real = distributed.worker.get_versions
    workers = []
    try:
        async with scheduler_class(host="127.0.0.1", port=0, dashboard=False) as s:
            for i, odd in enumerate([False, False, True, False, None]):
                if odd is None:  # the odd one leaves first
                    await workers.pop(2).close()
                    while len(s.workers) != len(workers):
                        await asyncio.sleep(0.01)
                warnings.append("")
                if odd:
                    distributed.worker.get_versions = \
                        lambda: _variant(real(), dask="0.0.bad")
                try:
                    w = await distributed.Worker(s.address, nthreads=1, memory_limit=0,
                                                 dashboard=False, host="127.0.0.1",
                                                 name=f"w{i}")
                finally:
                    distributed.worker.get_versions = real
                workers.append(w)
            for w in workers:
                await w.close()
    finally:
        distributed.worker.get_versions = real
        log.removeHandler(handler)
    return warnings


@pytest.mark.timeout(120)
def test_a_real_mismatch_is_reported_as_upstream_reports_it():
    ours = asyncio.run(_registrations(scheduler.Scheduler))
    upstream = asyncio.run(_registrations(distributed.Scheduler))
    assert [bool(w) for w in ours] == [False, False, True, True, False]
    assert "dask" in ours[2] and "0.0.bad" in ours[2]
    # the same table, but for the worker's id and the order within a set of versions
    assert [_words(w) for w in ours] == [_words(w) for w in upstream]


def _words(text: str) -> list[str]:
    return sorted(re.findall(r"[\w.]+", re.sub(r"Worker-[0-9a-f-]+", "Worker-ID", text)))


def test_min_heartbeat_interval_slows_small_clusters_heartbeats():
    import dask.config

    async def interval(minimum):
        with dask.config.set({"mpi-launch.min-heartbeat-interval": minimum}):
            async with scheduler.Scheduler(dashboard_address=":0", port=0) as s:
                async with distributed.Worker(s.address, nthreads=1) as w:
                    reply = s.heartbeat_worker(address=w.address, metrics=await w.get_metrics())
                    return reply["heartbeat-interval"]

    assert asyncio.run(interval("0s")) == 0.5  # distributed's for one worker
    assert asyncio.run(interval("2s")) == 2.0


def _counting(scheduler_class):
    """The scheduler class, counting the "remove-worker" notices it sends to workers."""

    class Counting(scheduler_class):
        def __init__(self, *args, **kwargs):
            self.notices = 0
            super().__init__(*args, **kwargs)

        def worker_send(self, worker, msg):
            if msg.get("op") == "remove-worker":
                self.notices += 1
            return super().worker_send(worker, msg)

    return Counting


async def _cluster_then(scheduler_class, end: str, n: int = 12) -> tuple[int, int, list]:
    """n in-process workers; then one worker leaves (``end="one"``) or the scheduler
    closes (``"close"``, what the role does when the job ends). Returns the notices sent
    for it, the workers the scheduler still counts, and the workers' statuses at the end."""
    s = await _counting(scheduler_class)(host="127.0.0.1", port=0, dashboard=False)
    workers = await asyncio.gather(*(
        distributed.Worker(s.address, nthreads=1, memory_limit=0, dashboard=False,
                           host="127.0.0.1", name=f"w{i}") for i in range(n)))
    try:
        if end == "one":
            await workers[0].close()
            while len(s.workers) == n:
                await asyncio.sleep(0.01)
        else:
            await s.close(reason="dask-mpi-launch: job ending")
            await asyncio.wait_for(asyncio.gather(*(w.finished() for w in workers)), 60)
            if isinstance(s, scheduler.Scheduler):  # every worker left by itself first
                assert getattr(s, "_ending", None) == {w.address for w in workers}
        return s.notices, len(s.workers), [w.status.name for w in workers]
    finally:
        await asyncio.gather(*(w.close() for w in workers))
        await s.close()


@pytest.mark.timeout(180)
def test_closing_the_scheduler_sends_no_notice_per_worker():
    # upstream: each connection that ends during close() is a removal that notifies every
    # remaining worker (O(n^2) at the end of a big job); ours: none, and every worker
    # still closes because the scheduler told it to
    notices, _, statuses = asyncio.run(_cluster_then(scheduler.Scheduler, "close"))
    assert notices == 0
    assert statuses == ["closed"] * 12
    upstream, _, statuses = asyncio.run(_cluster_then(distributed.Scheduler, "close"))
    assert upstream > 12  # what the change avoids (if 0, upstream fixed it: drop ours)
    assert statuses == ["closed"] * 12


@pytest.mark.timeout(120)
def test_a_worker_leaving_a_running_cluster_is_removed_as_upstream_does():
    notices, left, statuses = asyncio.run(_cluster_then(scheduler.Scheduler, "one"))
    assert left == 11 and notices == 11  # every other worker is told
    assert statuses[0] == "closed" and statuses[1:] == ["running"] * 11


def test_a_heartbeat_cut_by_the_workers_own_close_is_not_logged():
    from types import SimpleNamespace

    from distributed.core import Status

    from dask_mpi_launch.roles.run import _quiet_heartbeat_at_close

    log = logging.getLogger("distributed.worker")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    worker = SimpleNamespace(status=Status.running)
    handler, filters = Keep(), list(log.filters)
    log.addHandler(handler)
    try:
        _quiet_heartbeat_at_close(worker)
        log.error("Failed to communicate with scheduler during heartbeat.")  # running: kept
        worker.status = Status.closing
        log.error("Failed to communicate with scheduler during heartbeat.")  # dropped
        log.error("Worker stream died during communication")  # anything else: kept
    finally:
        log.removeHandler(handler)
        log.filters[:] = filters
    assert seen == ["Failed to communicate with scheduler during heartbeat.",
                    "Worker stream died during communication"]


async def _burst(scheduler_class, n: int = 10, leave: int = 4):
    """n in-process workers, ``leave`` of them close at once. Returns, per remaining
    worker, the departures it was told of and the batched sends that carried notices."""
    s = await scheduler_class(host="127.0.0.1", port=0, dashboard=False)
    s.notice_delay = 2.0  # every departure of the burst in one batch (default 50 ms)
    workers = await asyncio.gather(*(
        distributed.Worker(s.address, nthreads=1, memory_limit=0, dashboard=False,
                           host="127.0.0.1", name=f"w{i}") for i in range(n)))
    gone, stay = workers[:leave], workers[leave:]
    told = {w.address: [] for w in stay}
    sends = {w.address: 0 for w in stay}
    try:
        for w in stay:
            handler = w.stream_handlers["remove-worker"]

            def record(_handler=handler, _told=told[w.address], **msg):
                _told.append(msg["worker"])
                return _handler(**msg)

            w.stream_handlers["remove-worker"] = record
            bs = s.stream_comms[w.address]
            send = bs.send

            def counting(*msgs, _send=send, _a=w.address):
                if any(m.get("op") == "remove-worker" for m in msgs):
                    sends[_a] += 1
                return _send(*msgs)

            bs.send = counting
        await asyncio.gather(*(w.close() for w in gone))
        deadline = asyncio.get_running_loop().time() + 30
        while (any(len(t) < leave for t in told.values())
               and asyncio.get_running_loop().time() < deadline):
            await asyncio.sleep(0.05)
        return {w.address for w in gone}, {a: list(t) for a, t in told.items()}, dict(sends)
    finally:  # (closing the others sends more notices: not counted)
        await asyncio.gather(*(w.close() for w in stay))
        await s.close()


@pytest.mark.timeout(180)
def test_a_burst_of_departures_reaches_every_worker_in_one_send_each():
    gone, told, sends = asyncio.run(_burst(scheduler.Scheduler))
    assert all(sorted(t) == sorted(gone) for t in told.values()), told  # each told of all 4
    assert set(sends.values()) == {1}, sends  # ... in one send
    gone, told, sends = asyncio.run(_burst(distributed.Scheduler))  # upstream: 4 each
    assert all(sorted(t) == sorted(gone) for t in told.values()), told
    assert set(sends.values()) == {4}, sends


def test_the_heap_is_frozen_as_the_cluster_grows_so_full_collections_skip_it():
    """HeapFreezer: from ``from_workers`` on, each growth by ``growth`` freezes what
    survived (gc.freeze), so a full collection no longer walks the registered workers."""
    import gc

    sched = _Sched()
    try:
        freezer = scheduler.HeapFreezer()
        assert freezer.freezes == 1  # the imported modules, at the scheduler's start
        freezes_at, kept = [], []
        for i in range(2000):
            sched.workers[f"tls://10.0.0.1:{i}"] = _WS({"packages": {"n": str(i)}})
            kept.append([{"state": i}])  # what a worker leaves in the scheduler
            before = freezer.freezes
            freezer.add_worker(sched, f"tls://10.0.0.1:{i}")
            if freezer.freezes > before:
                freezes_at.append(i + 1)
        assert freezes_at == [500, 625, 782, 978, 1223, 1529, 1912]
        frozen = gc.get_freeze_count()
        assert frozen > 2 * 1912  # every worker's objects up to the last freeze
        tracked_ids = {id(o) for o in gc.get_objects()}  # the generations a collection walks
        assert id(kept[100]) not in tracked_ids and id(kept[1900]) not in tracked_ids
        assert id(kept[1999]) in tracked_ids  # joined after the last freeze: still collected
    finally:
        gc.unfreeze()


def test_the_scheduler_role_has_the_heap_freezer():
    async def main():
        async with scheduler.Scheduler(dashboard_address=":0", host="127.0.0.1") as s:
            return [p for p in s.plugins.values() if isinstance(p, scheduler.HeapFreezer)]

    assert len(asyncio.run(main())) == 1


async def _notice_due_after_close() -> list:
    """A departure's notice still pending when the scheduler has closed (issue 21: at the
    end of a --protocol mpi job, ``_send_notices`` raised AsyncTaskGroupClosedError from
    the event loop, a traceback of ours). Returns what the loop reported."""
    s = await scheduler.Scheduler(host="127.0.0.1", port=0, dashboard=False)
    s.notice_delay = 3600.0  # the timer never fires by itself: sent by hand below
    s.leave_timeout = 1.0
    reported = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx))
    workers = [await distributed.Worker(s.address, nthreads=1, memory_limit=0,
                                        dashboard=False, host="127.0.0.1", name=f"w{i}")
               for i in range(3)]
    try:
        await workers[0].close()  # its departure's notice is now pending
        deadline = asyncio.get_running_loop().time() + 30
        while not s._notices and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        assert s._notices, "no departure notice pending"
        await s.close()
        s._send_notices()  # what the timer would run now
        await asyncio.sleep(0.1)
    finally:
        await asyncio.gather(*(w.close() for w in workers[1:]))
    return reported


@pytest.mark.timeout(120)
def test_a_notice_due_after_the_scheduler_closed_is_dropped_quietly():
    assert asyncio.run(_notice_due_after_close()) == []
