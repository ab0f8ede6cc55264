"""scale.py's parent side: the settings variants, the children it starts (each in a session of
its own, killed at the end of every trial), one trial and the job's teardown.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load1  # noqa: E402

# the entry point the children run (python scale.py _scheduler|_workers|_real|_model ...)
SCALE_PY = str(Path(__file__).resolve().parent / "scale.py")

# name -> Dask config applied in every process; "ramp=S" variants are handled separately.
SWEEP = {
    "default": {},
    "connect=5s": {"distributed.comm.timeouts.connect": "5s"},
    "connect=120s": {"distributed.comm.timeouts.connect": "120s"},
    "tcp=120s": {"distributed.comm.timeouts.tcp": "120s"},
    "backlog=128": {"distributed.comm.socket-backlog": 128},
    "backlog=4096": {"distributed.comm.socket-backlog": 4096},  # the kernel caps at somaxconn
    "conns=1000": {"distributed.worker.connections.outgoing": 1000,
                   "distributed.worker.connections.incoming": 1000},
    "ramp=2s": {},
    "scaled": {},  # dask_mpi_launch.tuning.scale.for_job(--at): the launcher's defaults for that size
}


# Short names usable in --sweep as NAME=VALUE (e.g. backlog=16, connect=10s).
ALIASES = {
    "backlog": ["distributed.comm.socket-backlog"],
    "connect": ["distributed.comm.timeouts.connect"],
    "tcp": ["distributed.comm.timeouts.tcp"],
    "conns": ["distributed.worker.connections.outgoing",
              "distributed.worker.connections.incoming"],
}


# Scheduler-side cost model: the version comparison every registration makes against all
# connected workers (Scheduler.add_worker -> distributed.versions.error_message), timed alone.
MODEL_SIZES = [1000, 3000, 10000, 30000]


class Child:
    """A child in its own session; stdout lines pumped into a queue; stderr to a temp file."""

    def __init__(self, argv: list[str], env: dict, cwd: str):
        self.err = tempfile.TemporaryFile("w+")
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.err, text=True, env=env, cwd=cwd,
                                  start_new_session=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.p.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, prefix: str, deadline: float) -> str | None:
        while True:
            left = deadline - time.time()
            if left <= 0:
                return None
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                return None
            if line.startswith(prefix):
                return line[len(prefix):]

    def send(self, text: str) -> None:
        try:
            self.p.stdin.write(text)
            self.p.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    def stderr_tail(self, n: int = 4) -> list[str]:
        try:
            self.err.seek(0)
            return self.err.read().strip().splitlines()[-n:]
        except (OSError, ValueError):
            return []

    def kill(self, grace: float = 0.0) -> None:
        if grace:
            try:
                self.p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.err.close()


_LIVE: list[Child] = []


def _kill_all(*_):
    for c in list(_LIVE):
        c.kill()
    _LIVE.clear()


def split(n: int, parts: int) -> list[int]:
    """N workers over `parts` processes, as even as possible.

    >>> split(1000, 8), split(10, 3)
    ([125, 125, 125, 125, 125, 125, 125, 125], [4, 3, 3])
    """
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _reap(child: "Child") -> tuple[bool, float | None]:
    """Whether the child has ended (reaped here), and its CPU seconds if it has."""
    try:
        pid, status, ru = os.wait4(child.p.pid, os.WNOHANG)
    except ChildProcessError:
        return True, None
    if pid == 0:
        return False, None
    child.p.returncode = os.waitstatus_to_exitcode(status)
    return True, ru.ru_utime + ru.ru_stime


def teardown(sched: "Child", workers: list["Child"], order: str, timeout: float) -> dict:
    """The end of the job, from the moment every worker is registered, in ``order``:

    * ``scheduler-first`` (what the launcher does): the scheduler role gets SIGTERM and
      closes (its ``close`` tells every worker to close); once it is gone, the worker
      processes close what is still running;
    * ``workers-first`` (the launcher before): every worker closes itself (the worker
      role's SIGTERM handling), then the scheduler role gets SIGTERM.

    Returns seconds from the job's end until the scheduler process and until every
    process ended, and the scheduler's CPU seconds meanwhile; bounded by ``timeout``
    (then the rest is killed and ``teardown_status`` says so)."""
    t0 = time.time()
    deadline = t0 + timeout
    sched.send("END\n")
    line = sched.expect("ENDCPU=", t0 + 30)
    cpu0 = float(line) if line else None
    ended: dict = {}

    def wait_for(kids: list[Child]) -> bool:
        while time.time() < deadline:
            for c in kids:
                if c not in ended:
                    if c is sched:
                        gone, cpu = _reap(c)
                        if gone:
                            ended[c] = (time.time(), cpu)
                    elif c.p.poll() is not None:
                        ended[c] = (time.time(), None)
            if all(c in ended for c in kids):
                return True
            time.sleep(0.01)
        return False

    def close_workers() -> None:
        for c in workers:
            c.send("CLOSE\n")

    if order == "scheduler-first":
        os.kill(sched.p.pid, signal.SIGTERM)
        ok = wait_for([sched])
        close_workers()
        ok = wait_for(workers) and ok
    else:
        close_workers()
        ok = wait_for(workers)
        os.kill(sched.p.pid, signal.SIGTERM)
        ok = wait_for([sched]) and ok
    phases = {}
    while True:  # what the scheduler printed meanwhile (its pipe is read by a thread)
        try:
            line = sched.lines.get_nowait()
        except queue.Empty:
            break
        if line and line.startswith("PHASE="):
            name, t = line[len("PHASE="):].split()
            phases[name] = round(float(t) - t0, 3)
    out = {"teardown_order": order, "teardown_status": "ok" if ok else "timeout",
           "teardown_phases": phases,
           "t_sched_gone": round(ended[sched][0] - t0, 3) if sched in ended else None,
           "t_all_gone": round(max(t for t, _ in ended.values()) - t0, 3) if ok else None}
    cpu1 = ended.get(sched, (None, None))[1]
    out["cpu_teardown"] = round(cpu1 - cpu0, 3) if None not in (cpu0, cpu1) else None
    return out


def run_trial(n: int, variant: str, config: dict, ramp: float, args, tmp: Path,
              which: str = "ours", order: str | None = None) -> dict:
    real = min(args.real, n)
    res: dict = {"n": n, "variant": variant, "config": config, "ramp": ramp,
                 "procs": args.procs, "scheduler": which, "tls": bool(args.tls_file),
                 "real": real, "load1": load1()}
    spawn = _Spawner(args, tmp, config)
    try:
        return _trial(spawn, res, n, real, ramp, which, order)
    finally:
        spawn.end_all()


class _Spawner:
    """Starts one trial's children (python scale.py _scheduler|_workers|_real ...), each in a
    session of its own, and ends them all."""

    def __init__(self, args, tmp: Path, config: dict):
        self.args, self.tmp, self.config = args, tmp, config
        self.env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.local_dir = tempfile.mkdtemp(prefix="scratch-", dir=tmp)
        self.setup_deadline = time.time() + args.setup_timeout
        self.children: list[Child] = []

    def start(self, role: str, *argv: str) -> Child:
        c = Child([sys.executable, SCALE_PY, role, *argv], self.env, str(self.tmp))
        self.children.append(c)
        _LIVE.append(c)
        return c

    def end_all(self) -> None:
        # workers first (SIGKILL: closing them politely is not what we measure), then the
        # scheduler, which may need a moment to write its profile
        children = self.children
        for c in children[1:] + children[:1]:
            c.send("STOP\n")
            c.kill(grace=60.0 if c is children[0] and os.environ.get("BENCH_SCALE_PROFILE")
                   else 0.0)
            if c in _LIVE:
                _LIVE.remove(c)


def _trial(spawn: _Spawner, res: dict, n: int, real: int, ramp: float, which: str,
           order: str | None) -> dict:
    """Start the scheduler, then the workers; GO; the scheduler's and the workers' reports."""
    args, config = spawn.args, spawn.config
    sched = spawn.start("_scheduler", str(n), json.dumps(config), str(args.timeout),
                        str(args.settle), args.tls_file or "-", which)
    event = sched.expect('{"event": ', spawn.setup_deadline)  # the role's channel
    event = json.loads('{"event": ' + event) if event else {}
    address = event.get("address")
    if address is None:
        return {**res, "status": "error", "why": "scheduler did not start: "
                + event.get("message", ""), "stderr": sched.stderr_tail()}
    for i, k in enumerate(split(n - real, args.procs)):
        spawn.start("_workers", address, str(k), str(i), json.dumps(config),
                    str(args.timeout), str(ramp), spawn.local_dir, args.tls_file or "-",
                    "spread" if args.spread else "lo")
    if real:
        spawn.start("_real", address, str(real), "0", str(args.timeout),
                    args.tls_file or "-", json.dumps(config))
    workers = spawn.children[1:]
    for c in workers:
        if c.expect("READY", spawn.setup_deadline) is None:
            return {**res, "status": "error", "why": "a worker process did not start",
                    "stderr": c.stderr_tail()}
    go = time.time()
    for c in spawn.children:
        c.send(f"GO {go!r}\n")
    done = sched.expect("DONE=", go + args.timeout + args.settle + 30)
    reports = []
    for c in workers:
        r = c.expect("WORKERS=", time.time() + 10)
        reports.append(json.loads(r) if r else None)
    if done is None:
        return {**res, "status": "error", "why": "no report from the scheduler",
                "stderr": sched.stderr_tail()}
    res.update(json.loads(done))
    res["workers"] = reports
    res["status"] = "ok" if res["connected"] >= n else "timeout"
    if order:
        res.update(teardown(sched, workers, order, args.timeout))
    return res


def _read_int(path: str) -> str:
    try:
        return Path(path).read_text().split()[0]
    except (OSError, IndexError):
        return "?"


def parse_variant(spec: str) -> tuple[dict, float]:
    """A --sweep entry: a name of SWEEP, ``ramp=SECONDS`` or ``dask.key=value``, or several
    joined by ``+``.

    >>> parse_variant("backlog=128")
    ({'distributed.comm.socket-backlog': 128}, 0.0)
    >>> parse_variant("backlog=16")
    ({'distributed.comm.socket-backlog': 16}, 0.0)
    >>> parse_variant("ramp=2s")
    ({}, 2.0)
    >>> parse_variant("distributed.comm.timeouts.connect=10s")
    ({'distributed.comm.timeouts.connect': '10s'}, 0.0)
    >>> parse_variant("backlog=128+connect=5s+ramp=1")
    ({'distributed.comm.socket-backlog': 128, 'distributed.comm.timeouts.connect': '5s'}, 1.0)
    """
    if "+" in spec:
        config, ramp = {}, 0.0
        for part in spec.split("+"):
            c, r = parse_variant(part)
            config.update(c)
            ramp = max(ramp, r)
        return config, ramp
    if spec.startswith("ramp="):
        return {}, float(spec.split("=", 1)[1].rstrip("s"))
    if spec in SWEEP:
        return dict(SWEEP[spec]), 0.0
    key, sep, value = spec.partition("=")
    if not sep or ("." not in key and key not in ALIASES):
        raise argparse.ArgumentTypeError(f"not a variant: {spec!r}")
    try:
        val = json.loads(value)
    except json.JSONDecodeError:
        val = value
    return {k: val for k in ALIASES.get(key, [key])}, 0.0
