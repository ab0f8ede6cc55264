"""Run under ``mpiexec -n N python mpicomm_harness.py SCENARIO``: a Dask cluster whose workers
talk over ``mpi`` (dask_mpi_launch.dataplane.backend).

Rank 0 runs an MPI-free scheduler (a thread with its own loop, TLS with in-memory
``Security.temporary()`` credentials sent to the other ranks) and the client; ranks 1..N-1 run
a worker each in a thread of the rank (``backend.start_worker_thread``). The client runs
SCENARIO, prints ``RESULT name=value`` lines, shuts the cluster down; every rank exits 0 when
all went well. Scenarios (comma-separated, run in order on one cluster): array, shuffle,
big, replicate, kill, idle.
"""
from __future__ import annotations

import asyncio
import json
import os
import queue
import sys
import threading
import time

from mpi4py import MPI

from dask_mpi_launch.dataplane import backend
SCENARIO = sys.argv[1]
world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
dp = world.Dup()  # the data-plane communicator, collectively


def say(*args):
    print(f"[rank {rank}]", *args, file=sys.stderr, flush=True)


def result(name, value):
    print(f"RESULT {name}={json.dumps(value)}", flush=True)


def security_from(pems):
    from distributed.security import Security

    return Security(require_encryption=True, tls_ca_file=pems["ca"],
                    tls_scheduler_cert=pems["cert"], tls_scheduler_key=pems["key"],
                    tls_worker_cert=pems["cert"], tls_worker_key=pems["key"],
                    tls_client_cert=pems["cert"], tls_client_key=pems["key"])


# --- rank 0: credentials and the scheduler --------------------------------------------------
if rank == 0:
    from distributed.security import Security

    tmp = Security.temporary()
    pems = {"ca": tmp.tls_ca_file, "cert": tmp.tls_scheduler_cert,
            "key": tmp.tls_scheduler_key}
else:
    pems = None
pems = world.bcast(pems, root=0)
security = security_from(pems)

if rank == 0:
    import dask

    # replicas made by client.replicate stay until the test looks (the AMM would trim them)
    dask.config.set({"distributed.scheduler.active-memory-manager.start": False})
    addresses: queue.Queue = queue.Queue()

    def scheduler_thread():
        from distributed import Scheduler

        async def main():
            s = await Scheduler(host="127.0.0.1", port=0, protocol="tls", security=security,
                                dashboard=False, dashboard_address=None)
            addresses.put(s.address)
            await s.finished()

        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001
            addresses.put(e)

    sched = threading.Thread(target=scheduler_thread, daemon=True)
    sched.start()
    address = addresses.get(timeout=60)
    if isinstance(address, BaseException):
        raise address
else:
    address = None
address = world.bcast(address, root=0)

# --- worker ranks --------------------------------------------------------------------------
if rank > 0:
    chunk = int(os.environ.get("HARNESS_CHUNK", backend.CHUNK))
    backend.join(dp, chunk=chunk)
    handle = backend.start_worker_thread(
        dp, address, name=f"rank-{rank}", nthreads=1, memory_limit=0, security=security,
        host="127.0.0.1")
    say("worker at", handle.wait_started(timeout=120))
    world.Barrier()  # every worker started
    ok = handle.join(timeout=float(os.environ.get("HARNESS_TIMEOUT", "600")))
    backend.shutdown()
    say("worker ended:", handle.status, handle.error)
    sys.exit(0 if ok and handle.status == "closed" else 3)

# --- rank 0: the client --------------------------------------------------------------------
world.Barrier()
import dask  # noqa: E402
import numpy as np  # noqa: E402
from distributed import Client, wait  # noqa: E402


def stats(dask_worker):
    from dask_mpi_launch.dataplane import backend as m

    e = m.engine()
    return dict(e.stats, in_flight=len(e.ops)) if e is not None else None


client = Client(address, security=security, timeout=60)
client.wait_for_workers(size - 1, timeout=60)
workers = sorted(client.scheduler_info()["workers"].items(), key=lambda kv: str(kv[1]["name"]))
addrs = [a for a, _ in workers]
result("workers", addrs)
status = 0
T = 300

for scenario in SCENARIO.split(","):
    if scenario == "array":
        import dask.array as da

        n = 5200  # 5200**2 * 8 B = 216 MB
        x = da.random.RandomState(0).random((n, n), chunks=(n, n // 8)).persist()
        wait(x)
        y = x.rechunk((n // 8, n)).T  # every block from every worker: all-to-all
        diff = abs(y - x.T).max()
        total = (y.sum() - x.sum())
        d, t = client.compute([diff, total], sync=False)
        result("max_abs_diff", float(d.result(timeout=T)))
        result("sum_diff", float(t.result(timeout=T)))
        result("nbytes", int(x.nbytes))
        del x, y, diff, total, d, t
    elif scenario == "shuffle":
        import dask.dataframe as dd
        import pandas as pd

        rows = 400_000
        pdf = pd.DataFrame({"k": np.arange(rows) % 1009, "v": np.arange(rows)})
        df = dd.from_pandas(pdf, npartitions=16)
        with dask.config.set({"dataframe.shuffle.method": "p2p"}):
            out = df.shuffle("k", shuffle_method="p2p")
            parts = client.compute(out.to_delayed(), sync=False)
            frames = [f.result(timeout=T) for f in parts]
        keysets = [set(p["k"]) for p in frames]
        result("rows", int(sum(len(p) for p in frames)))
        result("v_sum_ok", int(sum(int(p["v"].sum()) for p in frames)) == rows * (rows - 1) // 2)
        result("keys_disjoint", sum(len(k) for k in keysets) == len(set().union(*keysets)))
    elif scenario == "big":
        nbytes = int(os.environ.get("HARNESS_BIG_BYTES", 3 * 2**30))
        a, b = addrs[0], addrs[1]

        def make(n):
            x = np.arange(n // 8, dtype=np.float64)
            return x

        def check(x):
            n = x.size
            idx = np.linspace(0, n - 1, 1001).astype(np.int64)
            return int(x.nbytes), bool((x[idx] == idx).all())

        src = client.submit(make, nbytes, workers=[a], pure=False)
        wait(src)
        got = client.submit(check, src, workers=[b], pure=False).result(timeout=T)
        result("moved_nbytes", got[0])
        result("values_ok", got[1])
    elif scenario == "replicate":
        futs = client.map(lambda i: np.full(2**20, i, dtype=np.float64), range(12),
                          workers=[addrs[0]], pure=False)
        wait(futs)
        client.replicate(futs, n=3)
        copies = {f.key: len(w) for f, w in zip(futs, [client.who_has(f)[f.key] for f in futs])}
        result("min_copies", min(copies.values()))
        client.rebalance(futs)
        total = client.submit(lambda *xs: float(sum(x[0] for x in xs)), *futs,
                              workers=[addrs[-1]], pure=False).result(timeout=T)
        result("sum_ok", total == float(sum(range(12))))
        holders = set().union(*client.who_has(futs).values())
        result("holders", len(holders))
    elif scenario == "kill":
        a, b = addrs[0], addrs[1]
        src = client.submit(np.ones, 2**30 // 8, workers=[a], pure=False)
        wait(src)

        def die_soon(dask_worker):
            def kill():
                time.sleep(0.3)
                os.kill(os.getpid(), 9)

            threading.Thread(target=kill, daemon=True).start()
            return True

        many = [client.submit(lambda x, i: x.sum() + i, src, i, workers=[b], pure=False)
                for i in range(4)]
        client.run(die_soon, workers=[a])
        try:
            res = client.gather(many, errors="raise")
            result("completed", len(res))
        except Exception as e:  # noqa: BLE001
            result("client_error", type(e).__name__)
    elif scenario == "idle":
        time.sleep(1.0)

        def cpu(dask_worker):
            from dask_mpi_launch.dataplane import backend as m

            e = m.engine()
            c0, t0 = e.cpu_seconds, time.monotonic()
            time.sleep(3.0)
            return (e.cpu_seconds - c0) / (time.monotonic() - t0)

        result("idle_cpu_fraction", max(client.run(cpu).values()))
    else:
        status = 2
        say("unknown scenario", scenario)

result("mpi_stats", client.run(stats))
client.shutdown()
client.close()
sched.join(timeout=60)
sys.exit(status)
