"""Where the time of one worker-to-worker transfer over ``--protocol mpi`` goes.

Run as the client script of a 4-rank job (rank 0 scheduler, 1 this script, 2 and 3 the
workers A and B)::

    mpiexec -n 4 dask-mpi-launch --protocol mpi --interface lo --no-dashboard \\
        benchmarks/dataplane_profile.py [--repeat 7] 8 64 256 1024

For each size (MiB) an array is made on A and a task on B needs it; the data plane of both
workers is instrumented (time stamps around the comm's ``read``/``write``, the engine's
``send``/``receive`` (the MPI calls posted by the event loop) and ``_end`` (the progress
thread sees them complete), and ``from_frames``) and the transfer that B's own log reports
is cut into phases, median over the timed repeats:

- request: B starts writing ``get_data`` (on the socket) -> A's read returns it;
- A's handler: -> A's comm.write starts (distributed's ``get_data`` handler);
- A serializes: -> A starts posting its ``Isend`` calls (the announcement is on the socket);
- both posted: -> A's ``Isend`` and B's ``Irecv`` calls (into fresh buffers, once B has
  read the announcement) are all posted;
- copy: -> B's progress thread sees the receives complete (MPI's own work);
- deserialize: -> B's read returns the array (B's loop wakes, ``from_frames``);
- other: the rest of B's logged duration (a connection from B's pool, B's bookkeeping).

Prints a Markdown table; the copy column next to mpi4py's own Send/Recv tells how close the
transport is, the other columns what Dask and the progress thread add.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from distributed import Client, wait


def _install(dask_worker):
    """Time stamps around the engine's steps in this worker's rank (idempotent)."""
    # the launcher's MPI data plane, whose steps this profiles; imported here because this
    # function runs in the worker (client.run), where the engine lives
    from dask_mpi_launch.dataplane import backend, connections

    eng = backend.engine()
    eng._profile = []
    if getattr(backend, "_profiled", False):
        return
    backend._profiled = True
    engine_class = backend.Engine

    def wrap(name):
        orig = getattr(engine_class, name)

        def timed(self, *args, **kwargs):
            t = time.time()
            try:
                return orig(self, *args, **kwargs)
            finally:
                getattr(self, "_profile", []).append((name, t, time.time()))

        setattr(engine_class, name, timed)

    for name in ("send", "receive", "_end"):
        wrap(name)
    for comm_class in (connections.MPITCP, connections.MPITLS):
        for name in ("read", "write"):  # the comm's coroutines, in the worker's loop
            orig = getattr(comm_class, name)

            def make(orig, name):
                async def timed(self, *args, **kwargs):
                    t = time.time()
                    try:
                        return await orig(self, *args, **kwargs)
                    finally:
                        if self.bulk_peer() is not None:
                            getattr(backend.engine(), "_profile", []).append(
                                (name, t, time.time()))
                return timed

            setattr(comm_class, name, make(orig, name))
    from_frames = connections.from_frames

    async def timed_from_frames(*args, **kwargs):
        t = time.time()
        try:
            return await from_frames(*args, **kwargs)
        finally:
            getattr(backend.engine(), "_profile", []).append(("from_frames", t, time.time()))

    connections.from_frames = timed_from_frames


def _collect(dask_worker):
    from dask_mpi_launch.dataplane import backend  # in the worker, as in _install

    eng = backend.engine()
    events, eng._profile = list(eng._profile), []
    log = list(dask_worker.transfer_incoming_log)
    return events, (log[-1]["duration"] if log else None)


def _nbytes(x):
    return x.nbytes


def _first(events, name, after=0.0):
    return next((e for e in events if e[0] == name and e[1] >= after), None)


def phases(a_events, b_events):
    """The phases (seconds) of one transfer, from both workers' time stamps."""
    b_write = _first(b_events, "write")  # B's get_data request
    a_read = min((e for e in a_events if e[0] == "read" and e[2] >= b_write[1]),
                 key=lambda e: e[2])
    a_write = _first(a_events, "write", a_read[2])
    a_send = _first(a_events, "send", a_write[1])
    b_recv = _first(b_events, "receive", a_write[1])  # (may start before A's Isend)
    posted = max(a_send[2], b_recv[2])
    b_done = _first(b_events, "_end", b_recv[1])
    b_read = min((e for e in b_events if e[0] == "read" and e[2] >= b_done[1]),
                 key=lambda e: e[2])
    return {"request": a_read[2] - b_write[1],
            "A's handler": a_write[1] - a_read[2],
            "A serializes": a_send[1] - a_write[1],
            "both posted": posted - a_send[1],
            "copy": b_done[1] - posted,
            "deserialize": b_read[2] - b_done[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sizes", nargs="*", default=["8", "64", "256", "1024"],
                    help="MiB, or bytes with a B suffix (8B: the latency of a tiny array)")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    client = Client()
    client.wait_for_workers(2)
    a, b = sorted(client.scheduler_info()["workers"])[:2]
    client.run(_install, workers=[a, b])
    names = ["request", "A's handler", "A serializes", "both posted", "copy", "deserialize",
             "other"]
    print("| size | transfer ms (B's log) | GB/s | " + " | ".join(f"{n} ms" for n in names)
          + " |")
    print("|---" * (len(names) + 3) + "|")
    for size in args.sizes:
        n = int(size[:-1]) if size.endswith("B") else int(size) * 2**20
        label = size if size.endswith("B") else f"{size} MiB"
        rows, totals = [], []
        for rep in range(args.repeat + 1):  # the first is a warm-up
            x = client.submit(np.ones, n // 8, workers=[a], pure=False)
            wait(x)
            client.run(_collect, workers=[a, b])
            client.submit(_nbytes, x, workers=[b], pure=False).result()
            got = client.run(_collect, workers=[a, b])
            del x
            if rep:
                row = phases(got[a][0], got[b][0])
                row["other"] = got[b][1] - sum(row.values())
                rows.append(row)
                totals.append(got[b][1])
        total = statistics.median(totals)
        print(f"| {label} | {total * 1e3:.2f} | {n / total / 1e9:.2f} | "
              + " | ".join(f"{statistics.median(r[k] for r in rows) * 1e3:.2f}" for k in names)
              + " |", flush=True)
    client.close()


if __name__ == "__main__":
    main()
