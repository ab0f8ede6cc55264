"""Preload of scale.py's scheduler role (``distributed.scheduler.preload``): times every
registration from GO, reports DONE with the scheduler's CPU, memory and log counts, then the
teardown's phases. Loaded by Dask from this file's path in the scheduler child.
"""
from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_roles import _cpu, _fds, _quiet_logging, listen_drops  # noqa: E402


def dask_setup(scheduler) -> None:
    """Preload of the scheduler role: count registrations from GO (stdin), report DONE."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    expect = int(os.environ["BENCH_SCALE_EXPECT"])
    timeout = float(os.environ["BENCH_SCALE_TIMEOUT"])
    settle = float(os.environ["BENCH_SCALE_SETTLE"])
    counter: dict = {}
    keep: list = []
    _quiet_logging(counter, keep)
    arrivals: list[float] = []

    class Arrivals(SchedulerPlugin):
        name = "bench-arrivals"

        def add_worker(self, scheduler, worker):
            arrivals.append(time.time())

        async def before_close(self):  # the teardown's phases, on stdout
            print(f"PHASE=close-starts {time.time()!r}", flush=True)

        async def close(self):
            print(f"PHASE=comms-close {time.time()!r}", flush=True)

    scheduler.add_plugin(Arrivals())
    _finished = scheduler.finished

    async def finished():  # the role's wait: ends when close() is done
        await _finished()
        print(f"PHASE=closed {time.time()!r}", flush=True)

    scheduler.finished = finished

    async def measure() -> None:
        loop = asyncio.get_running_loop()
        line = await loop.run_in_executor(None, sys.stdin.readline)
        go = float(line.split()[1])
        cpu0, drops0 = _cpu(), listen_drops()
        while len(arrivals) < expect and time.time() < go + timeout:
            await asyncio.sleep(0.02)
        t_done, cpu1, drops1 = time.time(), _cpu(), listen_drops()
        await asyncio.sleep(settle)  # steady state: heartbeats only
        t_settle, cpu2 = time.time(), _cpu()
        out = {
            "arrivals": [round(a - go, 4) for a in arrivals],
            "connected": len(scheduler.workers),
            "scheduler_class": f"{type(scheduler).__module__}.{type(scheduler).__name__}",
            "cpu_reg": round(cpu1 - cpu0, 3), "wall_reg": round(t_done - go, 3),
            "cpu_settle": round(cpu2 - cpu1, 3), "wall_settle": round(t_settle - t_done, 3),
            "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "fds": _fds(),
            "listen_drops": drops1 - drops0 if None not in (drops0, drops1) else None,
            "log": counter, "log_sample": keep,
        }
        print("DONE=" + json.dumps(out), flush=True)
        # the parent says STOP (or kills), or END: the job ends, the role's own SIGTERM
        # handling closes the scheduler (its CPU from here is the teardown's)
        line = await loop.run_in_executor(None, sys.stdin.readline)
        prof = getattr(sys.modules.get("scale_roles"), "_PROF", None)  # child_scheduler's

        def dump() -> None:
            if prof is not None:
                prof.disable()
                prof.dump_stats(os.environ["BENCH_SCALE_PROFILE"])

        if line.strip() == "END":
            if prof is not None:  # the teardown's profile: from here to the exit
                import atexit
                prof.disable()
                prof.dump_stats(os.environ["BENCH_SCALE_PROFILE"] + ".registration")
                prof.clear()
                prof.enable()
                atexit.register(dump)
            import atexit
            atexit.register(lambda: print(f"PHASE=exit {time.time()!r}", flush=True))
            print(f"ENDCPU={_cpu()!r}", flush=True)
            return
        dump()
        os._exit(0)

    scheduler._bench_measure = asyncio.ensure_future(measure())
    if os.environ.get("BENCH_SCALE_STALLS"):
        _watch_stalls(os.environ["BENCH_SCALE_STALLS"])


def _watch_stalls(path: str, limit: float = 1.0) -> None:
    """Diagnostics: where the scheduler's event loop is while it stalls.  A loop callback
    beats every 50 ms; a thread samples the loop thread's stack every 0.2 s while the beat
    is more than ``limit`` s old, and times every garbage collection over 50 ms.  Written
    to ``path`` (JSON) every 5 s: stalls (start, seconds, the most frequent stacks) and GCs."""
    import gc
    import threading
    import traceback
    from collections import Counter

    loop = asyncio.get_running_loop()
    state = {"beat": time.monotonic(), "ident": threading.get_ident()}
    t0 = time.monotonic()
    stalls: list[dict] = []
    gcs: list[dict] = []
    gc_start = {}

    def beat() -> None:
        state["beat"] = time.monotonic()
        loop.call_later(0.05, beat)

    def on_gc(phase: str, info: dict) -> None:
        if threading.get_ident() != state["ident"]:
            return
        if phase == "start":
            gc_start["t"] = time.perf_counter()
        elif "t" in gc_start:
            took = time.perf_counter() - gc_start.pop("t")
            if took > 0.05:
                gcs.append({"at": round(time.monotonic() - t0, 2), "s": round(took, 3),
                            "gen": info["generation"], "collected": info["collected"]})

    def watch() -> None:
        current = None
        last_write = time.monotonic()
        while True:
            time.sleep(0.2)
            now = time.monotonic()
            late = now - state["beat"]
            if late > limit:
                if current is None:
                    current = {"at": round(state["beat"] - t0, 2), "stacks": Counter()}
                frame = sys._current_frames().get(state["ident"])
                if frame is not None:
                    stack = traceback.extract_stack(frame)[-14:]
                    current["stacks"][" <- ".join(
                        f"{Path(f.filename).name}:{f.lineno}:{f.name}"
                        for f in reversed(stack))] += 1
            elif current is not None:
                current["s"] = round(now - t0 - current["at"], 2)
                current["stacks"] = current["stacks"].most_common(6)
                stalls.append(current)
                current = None
            if now - last_write > 5:
                last_write = now
                Path(path).write_text(json.dumps({"stalls": stalls, "gcs": gcs}, indent=1))

    gc.callbacks.append(on_gc)
    loop.call_soon(beat)
    threading.Thread(target=watch, daemon=True, name="bench-stalls").start()
