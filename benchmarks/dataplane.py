#!/usr/bin/env python3
"""Data-plane benchmark: worker-to-worker transfer of NumPy arrays in a dask-mpi-launch cluster,
next to raw mpi4py Send/Recv (the reference) and a raw loopback TCP socket, in GB/s.

Dask side: ``mpiexec -n 4 dask-mpi-launch --interface lo --no-dashboard SCRIPT`` (rank 0
scheduler, rank 1 the script, ranks 2 and 3 the workers A and B).  For each size the script
creates the array on A (``client.submit(np.ones, n, workers=[A], pure=False)``, waits), then
times ``client.submit(nbytes, fut, workers=[B], pure=False).result()``: the transfer A -> B
plus the scheduling overhead of one task ("task" columns).  Worker B's own record of the
transfer (``Worker.transfer_incoming_log``: get_data request -> data deserialised) gives the
"transfer" columns.  Fresh keys every repeat, so nothing is cached; futures are released
between repeats.

MPI side: ``mpiexec -n 2 python SCRIPT``: rank 0 -> rank 1 one-way after a Barrier, closed by
a 1-byte acknowledgement, with ``Comm.Send/Recv`` of the NumPy buffer (the reference),
``comm.send/recv`` (pickle) and a plain TCP socket on 127.0.0.1 (``sendall``/``recv_into``).

Sizes are MiB (2**20 bytes) of float64 ones; GB/s are 10**9 bytes per second; every cell is
the median (min-max) of --repeat timed runs after --warmup untimed ones.  An 8-byte array is
measured too and reported as latency (ms).

tcp runs pass ``--protocol tcp`` (newer dask-mpi-launch versions default to TLS).  tls
(``--protocols tcp tls``): ``dask-mpi-launch --tls`` when the installed CLI has it (its own
credentials, in memory); otherwise certificates from
``distributed.security.Security.temporary()`` (needs ``cryptography``) written to files and
handed to every rank through Dask's config (``DASK_DISTRIBUTED__COMM__TLS__*``) plus
``--protocol tls``.  When neither works the output says so.

Writes results/dataplane.{md,json}.  Usually run through ``bin/bench-data``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (_load, _stats, args_record, command_line, fmt_stat,  # noqa: E402
                    interleave, machine_facts, mpi_of, machine_lines, make_env, results_dir, run_once,
                    write_results)

MIB = 2**20

# --- the scripts run under MPI -------------------------------------------------------------

DASK_BODY = r'''
"""Worker A -> worker B transfers; bench(client, [SIZES_BYTES, REPEAT, WARMUP])."""
import json, sys, time
import numpy as np
from distributed import Client, wait


def nbytes(x):
    return x.nbytes


def incoming(dask_worker):
    return [{"keys": list(e["keys"]), "duration": e["duration"], "total": e["total"]}
            for e in dask_worker.transfer_incoming_log]


def graph(client, n):
    """Wall time of a graph of n tiny tasks summed in a tree of fan-in 10: its small
    results move between the two workers (the 8-byte exchange, thousands of times)."""
    import operator
    import dask

    xs = [dask.delayed(operator.add)(i, 1, dask_key_name=f"t-{i}") for i in range(n)]
    level = 0
    while len(xs) > 1:
        level += 1
        xs = [dask.delayed(sum)(xs[i:i + 10], dask_key_name=f"s-{level}-{i}")
              for i in range(0, len(xs), 10)]
    t0 = time.perf_counter()
    total = client.compute(xs[0]).result()
    dt = time.perf_counter() - t0
    assert total == n * (n + 1) // 2, total
    return dt


def bench(client, argv):
    sizes = [int(s) for s in argv[0].split(",") if s]
    repeat, warmup = int(argv[1]), int(argv[2])
    tasks = int(argv[3]) if len(argv) > 3 else 0
    workers = sorted(client.scheduler_info()["workers"].items(),
                       key=lambda kv: str(kv[1]["name"]))
    (a, ia), (b, ib) = workers[0], workers[1]
    out = {"worker_a": [a, ia["name"]], "worker_b": [b, ib["name"]],
           "protocol": a.split("://")[0], "sizes": {}}
    for size in sizes:
        n = max(1, size // 8)
        task, keys = [], []
        for rep in range(warmup + repeat):
            src = client.submit(np.ones, n, workers=[a], pure=False)
            wait(src)
            t0 = time.perf_counter()
            dst = client.submit(nbytes, src, workers=[b], pure=False)
            got = dst.result()
            dt = time.perf_counter() - t0
            assert got == n * 8, got
            if rep >= warmup:
                task.append(dt)
                keys.append(src.key)
            if rep == 0:
                out.setdefault("moved", client.who_has(src)[src.key])
            del src, dst
            time.sleep(0.05)  # let the release reach the workers before the next array
        log = client.run(incoming, workers=[b])[b]
        transfer = []
        for k in keys:
            durs = [e["duration"] for e in log
                    if k in e["keys"] or str(k) in map(str, e["keys"])]
            if durs:
                transfer.append(durs[-1])
        out["sizes"][str(size)] = {"bytes": n * 8, "task": task, "transfer": transfer}
    if tasks:
        client.run(lambda: None)
        out["graph"] = {"tasks": tasks, "seconds": [graph(client, tasks)]}
    print("DATAPLANE_JSON=" + json.dumps(out), flush=True)
'''

# run on rank 1 by dask-mpi-launch: argv = SIZES_BYTES REPEAT WARMUP
CLI_MAIN = """
bench(Client(), sys.argv[1:])
"""
DASK_SCRIPT = DASK_BODY + CLI_MAIN

# End to end: wall time of a >= 2 GB dask.array rechunk and of a p2p dataframe shuffle.
E2E_BODY = r'''
import json, sys, time
import numpy as np
from distributed import Client


def bench(client, argv):
    import dask
    import dask.array as da
    import dask.dataframe as dd
    from distributed import wait

    n, rows, repeat = int(argv[0]), int(argv[1]), int(argv[2])
    out = {"protocol": next(iter(client.scheduler_info()["workers"])).split("://")[0],
           "workers": len(client.scheduler_info()["workers"]), "array_bytes": n * n * 8,
           "rows": rows, "rechunk": [], "shuffle": []}
    for rep in range(repeat + 1):  # the first is a warm-up
        x = da.random.RandomState(rep).random((n, n), chunks=(n, max(1, n // 32))).persist()
        wait(x)
        t0 = time.perf_counter()
        y = x.rechunk((max(1, n // 32), n)).persist()
        wait(y)
        dt = time.perf_counter() - t0
        del x, y
        if rep:
            out["rechunk"].append(dt)
        df = dd.from_dict({"k": np.arange(rows) % 10007, "v": np.ones(rows)},
                          npartitions=48).persist()
        wait(df)
        t0 = time.perf_counter()
        s = df.shuffle("k", shuffle_method="p2p").persist()
        wait(s)
        dt = time.perf_counter() - t0
        assert int(s.v.sum().compute()) == rows
        del df, s
        if rep:
            out["shuffle"].append(dt)
        time.sleep(0.2)
    print("DATAPLANE_E2E_JSON=" + json.dumps(out), flush=True)
'''
E2E_SCRIPT = E2E_BODY + CLI_MAIN


MPI_SCRIPT = r'''
"""Two ranks, argv = SIZES_BYTES REPEAT WARMUP; rank 0 prints the timings."""
import json, pickle, socket, sys
import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
assert comm.Get_size() == 2, "run with exactly 2 ranks"
sizes = [int(s) for s in sys.argv[1].split(",")]
repeat, warmup = int(sys.argv[2]), int(sys.argv[3])
ack = np.zeros(1, dtype=np.uint8)

# plain TCP socket between the two ranks, on loopback, port chosen by the kernel
if rank == 0:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    comm.bcast(srv.getsockname()[1], root=0)
    sock, _ = srv.accept()
    srv.close()
else:
    port = comm.bcast(None, root=0)
    sock = socket.create_connection(("127.0.0.1", port))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def recv_exactly(s, view):
    got = 0
    while got < len(view):
        k = s.recv_into(view[got:])
        if not k:
            raise ConnectionError("peer closed")
        got += k


def one(kind, buf):
    comm.Barrier()
    t0 = MPI.Wtime()
    if kind == "Send":
        if rank == 0:
            comm.Send(buf, dest=1, tag=1)
            comm.Recv(ack, source=1, tag=2)
        else:
            comm.Recv(buf, source=0, tag=1)
            comm.Send(ack, dest=0, tag=2)
    elif kind == "Send_fresh":  # into new memory, as a Dask transfer's result must be
        if rank == 0:
            comm.Send(buf, dest=1, tag=5)
            comm.Recv(ack, source=1, tag=6)
        else:
            fresh = np.empty_like(buf)
            comm.Recv(fresh, source=0, tag=5)
            comm.Send(ack, dest=0, tag=6)
            assert fresh[-1] == 1.0
            del fresh
    elif kind == "send":
        if rank == 0:
            comm.send(buf, dest=1, tag=3)
            comm.Recv(ack, source=1, tag=4)
        else:
            x = comm.recv(source=0, tag=3)
            assert x.nbytes == buf.nbytes
            comm.Send(ack, dest=0, tag=4)
    else:  # socket
        if rank == 0:
            sock.sendall(memoryview(buf).cast("B"))
            recv_exactly(sock, memoryview(bytearray(1)))
        else:
            recv_exactly(sock, memoryview(buf).cast("B"))
            sock.sendall(b"k")
    return MPI.Wtime() - t0


out = {"library": MPI.Get_library_version().splitlines()[0].strip(), "sizes": {}}
for size in sizes:
    n = max(1, size // 8)
    buf = np.ones(n) if rank == 0 else np.empty(n)
    res = {"bytes": n * 8}
    for kind in ("Send_fresh", "Send", "send", "socket"):
        times = [one(kind, buf) for _ in range(warmup + repeat)][warmup:]
        res[kind] = times
    if rank == 0:  # the machine's ceiling: one copy within one process
        dst = np.empty_like(buf)
        np.copyto(dst, buf)
        res["memcpy"] = []
        for _ in range(repeat):
            t0 = MPI.Wtime()
            np.copyto(dst, buf)
            res["memcpy"].append(MPI.Wtime() - t0)
        del dst
    if rank == 1:
        assert buf[0] == 1.0 and buf[-1] == 1.0
    out["sizes"][str(size)] = res
    del buf
sock.close()
if rank == 0:
    print("DATAPLANE_JSON=" + json.dumps(out), flush=True)
'''

TLS_UNSUPPORTED = "tls: not supported yet by dask-mpi-launch"
REF = "mpi4py"  # the variant holding the mpi4py/socket reference
ARENA = "-arena"  # suffix of a variant run with glibc's malloc kept from returning memory
# (--arena): no mmap'd blocks and no trimming, so a freed receive buffer's pages stay mapped
# and the next fresh buffer is memory touched before, a pre-touched arena without code
ARENA_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def base_of(variant: str) -> str:
    """
    >>> base_of("mpi-arena"), base_of("tcp")
    ('mpi', 'tcp')
    """
    return variant[:-len(ARENA)] if variant.endswith(ARENA) else variant


# --- pure helpers ---------------------------------------------------------------------------

def parse_payload(stdout: str) -> dict | None:
    """The JSON after the last ``DATAPLANE_JSON=`` marker, or None.

    >>> parse_payload('noise\\nDATAPLANE_JSON={"a": 1}\\n')
    {'a': 1}
    >>> parse_payload("nothing") is None
    True
    """
    found = None
    for line in stdout.splitlines():
        if line.startswith("DATAPLANE_JSON="):
            try:
                found = json.loads(line.split("=", 1)[1])
            except json.JSONDecodeError:
                pass
    return found


def rates(nbytes: int, seconds: list[float]) -> dict | None:
    """GB/s (10**9 B/s) statistics for one size: median, min, max.

    >>> rates(10**9, [1.0, 0.5, 2.0])
    {'median': 1.0, 'min': 0.5, 'max': 2.0}
    """
    return _stats([nbytes / s / 1e9 for s in seconds if s > 0])


def millis(seconds: list[float]) -> dict | None:
    """Latency statistics in ms.

    >>> millis([0.001, 0.003, 0.002])
    {'median': 2.0, 'min': 1.0, 'max': 3.0}
    """
    return _stats([round(s * 1e3, 4) for s in seconds])


def size_label(nbytes: int) -> str:
    """
    >>> size_label(8), size_label(65536), size_label(8 * 2**20), size_label(256 * 2**20)
    ('8 B', '64 KiB', '8 MiB', '256 MiB')
    """
    if nbytes >= MIB:
        return f"{nbytes // MIB} MiB"
    return f"{nbytes // 1024} KiB" if nbytes >= 1024 and nbytes % 1024 == 0 else f"{nbytes} B"


def columns(protocols: dict, arena_ref: bool = False) -> list[tuple[str, str, str]]:
    """(label, source, key) of each table column: dask protocols first, then the references."""
    cols = []
    for proto, res in protocols.items():
        if res.get("payload"):
            cols += [(f"dask {proto} task", proto, "task"),
                     (f"dask {proto} transfer", proto, "transfer")]
    arena = [("mpi4py Send/Recv fresh, arena", REF + ARENA, "Send_fresh")]
    return cols + [("raw TCP socket", REF, "socket"), ("mpi4py send (pickle)", REF, "send"),
                   ("**mpi4py Send/Recv fresh**", REF, "Send_fresh"),
                   ("mpi4py Send/Recv reused", REF, "Send"), ("memcpy", REF, "memcpy")] + (
                   arena if arena_ref else [])


def cell(results: dict, source: str, key: str, size: str, unit: str) -> str:
    payload = results.get(source, {}).get("payload")
    if not payload or size not in payload["sizes"]:
        return "–"
    entry = payload["sizes"][size]
    times = entry.get(key) or []
    stat = millis(times) if unit == "ms" else rates(entry["bytes"], times)
    return fmt_stat(stat, 3 if unit == "ms" else 2)


def median_rate(results: dict, source: str, key: str, size: str) -> float | None:
    payload = results.get(source, {}).get("payload")
    try:
        entry = payload["sizes"][size]
        return rates(entry["bytes"], entry[key])["median"]
    except (TypeError, KeyError):
        return None


def merge(runs: list[dict]) -> dict:
    """Rounds of one variant -> {"payload": lists concatenated per size, "runs": [...]}.

    >>> a = {"payload": {"protocol": "tcp", "sizes": {"8": {"bytes": 8, "task": [1.0]}}}}
    >>> b = {"payload": {"protocol": "tcp", "sizes": {"8": {"bytes": 8, "task": [2.0]}}}}
    >>> merge([a, b, {"payload": None, "note": "x"}])["payload"]["sizes"]["8"]["task"]
    [1.0, 2.0]
    >>> merge([{"payload": None, "note": "x"}])["note"]
    'x'
    """
    ok = [r["payload"] for r in runs if r.get("payload")]
    out: dict = {"runs": [{k: v for k, v in r.items() if k != "payload"} for r in runs],
                 "payload": None}
    notes = [r["note"] for r in runs if r.get("note")]
    if notes:
        out["note"] = notes[0] + (f" ({len(notes)} of {len(runs)} rounds)" if ok else "")
    if ok:
        merged = json.loads(json.dumps(ok[0]))
        for p in ok[1:]:
            for size, entry in p["sizes"].items():
                dst = merged["sizes"].setdefault(size, {"bytes": entry["bytes"]})
                for key, val in entry.items():
                    if isinstance(val, list):
                        dst.setdefault(key, []).extend(val)
            if "graph" in p:
                merged.setdefault("graph", {"tasks": p["graph"]["tasks"], "seconds": []})
                merged["graph"]["seconds"].extend(p["graph"]["seconds"])
        out["payload"] = merged
    return out


def render_markdown(meta: dict, results: dict, command: str) -> str:
    protos = {p: r for p, r in results.items() if base_of(p) != REF}
    cols = columns(protos, bool((results.get(REF + ARENA) or {}).get("payload")))
    sizes = sorted({s for r in results.values() if r.get("payload")
                    for s in r["payload"]["sizes"]}, key=int)
    small = [s for s in sizes if int(s) < MIB]
    big = [s for s in sizes if int(s) >= MIB]
    lines = ["# Data-plane benchmark: worker → worker vs MPI", "", *machine_lines(meta, command),
             *_memory_line(meta), "", _explanation(meta), ""]
    lines += _note_lines(results)
    if big:
        lines += _bandwidth_table(results, protos, cols, big)
    if small:
        lines += _latency_table(results, cols, small)
    lines += _graph_table(protos)
    return "\n".join(lines)


def _graph_table(protos: dict) -> list[str]:
    """Wall time of the --tasks graph per protocol, s, median (min–max) of the rounds.

    >>> _graph_table({"tcp": {"payload": {"graph": {"tasks": 10, "seconds": [2.0, 1.0]}}}})[-2]
    '| tcp | 1.50 (1.00–2.00) |'
    """
    rows = []
    for p, r in protos.items():
        g = (r.get("payload") or {}).get("graph")
        if g and g["seconds"]:
            st = _stats(g["seconds"])
            rows.append(f"| {p} | {st['median']:.2f} ({st['min']:.2f}–{st['max']:.2f}) |")
    if not rows:
        return []
    tasks = next(r["payload"]["graph"]["tasks"] for r in protos.values()
                 if (r.get("payload") or {}).get("graph"))
    return [f"A graph of {tasks:,} tiny tasks summed in a tree of fan-in 10 on the two "
            "workers (its small results move between them), wall time in s, median "
            "(min–max) of the rounds:", "", "| protocol | wall s |", "|---|---:|", *rows, ""]


def _memory_line(meta: dict) -> list[str]:
    if not meta.get("touched_gib"):
        return []
    return [f"- memory: {meta['touched_gib']:g} GiB written once before the runs "
            "(`--touch-memory`: a virtual machine's first touch of guest memory also faults in "
            "the host)"]


def _explanation(meta: dict) -> str:
    """The paragraph that says what each column measures and how the runs were made."""
    tls = ("`--tls` (dask-mpi-launch's own job credentials, in memory)"
           if meta.get("tls_method") == "cli" else
           "`--protocol tls` with `Security.temporary()` certificates given to every rank "
           "through Dask's config (`DASK_DISTRIBUTED__COMM__TLS__*`)")
    return (
        "Two ranks on one machine, so every byte crosses loopback or shared memory; "
        "arrays of float64 ones, sizes in MiB, **GB/s = 10⁹ bytes/s**, median (min–max) of "
        "all timed runs. "
        "**dask task**: `client.submit(f, fut_on_A, workers=[B])` → result, i.e. "
        "transfer A → B plus scheduling of one task. **dask transfer**: worker B's own log of "
        "the transfer (get_data request → data deserialised). **raw TCP socket**: Python "
        "`sendall`/`recv_into` over 127.0.0.1. **mpi4py send (pickle)**: lowercase "
        "`comm.send`. **mpi4py Send/Recv fresh**: buffer-protocol `Comm.Send`/`Recv` into a "
        "freshly allocated array each time (the reference: a Dask transfer's result must live in "
        "new memory); **reused**: into the same array every time. "
        "**dask mpi**: `dask_mpi_launch.dataplane.backend` (workers in their ranks, frames over MPI "
        "point-to-point; scheduler and client over TLS, through the CLI's `--protocol mpi`). "
        "MPI and socket times are one-way after a Barrier, closed by a 1-byte "
        "ack. **memcpy**: `np.copyto` within one process, the machine's ceiling. "
        "tcp runs pass `--protocol tcp`; tls runs "
        + tls + ". "
        f"Variants interleaved over {meta.get('rounds')} rounds (one `mpiexec` each) of "
        f"{meta.get('repeat')} timed runs after {meta.get('warmup')} warm-up.")


def _note_lines(results: dict) -> list[str]:
    """One line per source that failed or has a note (the mpi4py reference's marked so)."""
    notes = [res.get("note") or f"{name}: no result" for name, res in results.items()
             if res.get("note") or not res.get("payload")]
    if not notes:
        return []
    ref_note = results.get(REF, {}).get("note")
    return [f"- {'mpi4py: ' if n == ref_note else ''}{n}" for n in notes] + [""]


def _bandwidth_table(results: dict, protos: dict, cols: list, big: list[str]) -> list[str]:
    """GB/s of every column at the sizes of 1 MiB and more, and dask ÷ Send/Recv fresh."""
    ratios = [p for p in protos if results[p].get("payload")]
    lines = ["| size | " + " | ".join(c[0] for c in cols) + " | "
             + " | ".join(f"dask {p} transfer ÷ Send/Recv fresh" for p in ratios) + " |",
             "|---|" + "---|" * len(cols) + "---:|" * len(ratios)]
    for s in big:
        cells = []
        for p in ratios:
            d = median_rate(results, p, "transfer", s)
            m = median_rate(results, REF, "Send_fresh", s)
            cells.append(f"{d / m:.2f}×" if d and m else "–")
        lines.append(f"| {size_label(int(s))} | "
                     + " | ".join(cell(results, src, key, s, "GB/s") for _, src, key in cols)
                     + " | " + " | ".join(cells) + " |")
    return lines + [""]


def _latency_table(results: dict, cols: list, small: list[str]) -> list[str]:
    """Milliseconds of every column at the sizes below 1 MiB."""
    lines = ["Latency of the same exchange with small arrays, ms:", "",
             "| size | " + " | ".join(c[0] for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for s in small:
        lines.append(f"| {size_label(int(s))} | "
                     + " | ".join(cell(results, src, key, s, "ms") for _, src, key in cols)
                     + " |")
    return lines + [""]


# --- running --------------------------------------------------------------------------------

def tls_env(tmp: Path, python: Path) -> tuple[dict | None, str]:
    """Dask config (as environment variables) with certificates from Security.temporary(),
    made by the venv's python; (None, reason) when that is not possible."""
    probe = r"""
import os, sys
from distributed.security import Security
sec = Security.temporary()
d = sys.argv[1]
for name, value in [("ca.pem", sec.tls_ca_file), ("cert.pem", sec.tls_scheduler_cert),
                    ("key.pem", sec.tls_scheduler_key)]:
    path = os.path.join(d, name)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(value)
"""
    certs = tmp / "tls"
    certs.mkdir(mode=0o700, exist_ok=True)
    raw = run_once([str(python), "-c", probe, str(certs)], dict(os.environ), str(tmp), 60)
    if raw["rc"] != 0:
        last = (raw["stderr"].strip().splitlines() or ["?"])[-1]
        return None, f"{TLS_UNSUPPORTED} (and no certificates: {last})"
    env = {"DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
           "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(certs / "ca.pem")}
    for role in ("SCHEDULER", "WORKER", "CLIENT"):
        env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__CERT"] = str(certs / "cert.pem")
        env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__KEY"] = str(certs / "key.pem")
    return env, ""


def cli_has_tls(venv: Path) -> bool:
    """Whether this dask-mpi-launch has its own ``--tls`` option (job-made credentials)."""
    try:
        out = subprocess.run([str(venv / "bin" / "dask-mpi-launch"), "--help"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "--tls" in out


def dask_argv(proto: str, args, venv: Path, tmp: Path, body: str, workers: int, nthreads: int,
              script_args: list[str]) -> tuple[list[str] | None, dict, str]:
    """(argv, extra environment, note) of one Dask run, through the CLI for every protocol
    (rank 0 scheduler, rank 1 the script, then the workers; with --protocol mpi the workers
    run in their ranks)."""
    script = tmp / "bench_dataplane_client.py"
    script.write_text(body + CLI_MAIN)
    extra: dict = {}
    if proto == "tls" and args.tls_method == "cli":
        opts = ["--tls"]  # the package's own credentials, passed between ranks in memory
    elif proto == "tls":
        extra, note = tls_env(tmp, venv / "bin" / "python")
        if extra is None:
            return None, {}, note
        opts = ["--protocol", "tls"]
    else:
        opts = ["--protocol", base_of(proto)]  # explicit: newer CLIs default to TLS
    return ([str(venv / "bin" / "mpiexec"), "-n", str(workers + 2),
             str(venv / "bin" / "dask-mpi-launch"), "--interface", "lo", "--no-dashboard",
             "--nthreads", str(nthreads), *opts, str(script), *script_args], extra, "")


def run_e2e(proto: str, args, venv: Path, env: dict, tmp: Path) -> dict:
    """End to end on --e2e-workers workers: rechunk of an n x n float64 array, p2p shuffle."""
    argv, extra, note = dask_argv(proto, args, venv, tmp, E2E_BODY, args.e2e_workers, 1,
                                  [str(args.e2e_n), str(args.e2e_rows), str(args.e2e_repeat)])
    if argv is None:
        return {"payload": None, "note": note, "skip": True}
    raw = run_once(argv, {**env, **extra}, str(tmp), args.timeout)
    payload = None
    for line in raw["stdout"].splitlines():
        if line.startswith("DATAPLANE_E2E_JSON="):
            payload = json.loads(line.split("=", 1)[1])
    return run_record(argv, raw, payload, 3, f"e2e {proto}: failed")


def run_record(argv: list[str], raw: dict, payload: dict | None, tail: int, failed: str) -> dict:
    """What a results JSON keeps of one mpiexec run; without a payload, why (stderr's tail).

    >>> raw = {"rc": 1, "timed_out": False, "t0": 1.0, "t1": 3.5, "stderr": "a\\nb\\nc\\n"}
    >>> run_record(["mpiexec", "-n", "2"], raw, None, 2, "failed")  # doctest: +NORMALIZE_WHITESPACE
    {'argv': ['-n', '2'], 'rc': 1, 'timed_out': False, 'wall': 2.5, 'payload': None,
     'stderr_tail': ['b', 'c'], 'note': 'failed (rc 1, timed out False)'}
    """
    res = {"argv": argv[1:], "rc": raw["rc"], "timed_out": raw["timed_out"],
           "wall": round(raw["t1"] - raw["t0"], 2), "payload": payload}
    if payload is None:
        res["stderr_tail"] = raw["stderr"].strip().splitlines()[-tail:]
        res["note"] = f"{failed} (rc {raw['rc']}, timed out {raw['timed_out']})"
    return res


def render_e2e(e2e: dict) -> str:
    """Markdown table of the end-to-end wall times (median (min–max) seconds)."""
    rows = []
    for proto, runs in e2e.items():
        ok = [r["payload"] for r in runs if r.get("payload")]
        if not ok:
            rows.append(f"| {proto} | – | – | {runs[0].get('note', 'failed') if runs else ''} |")
            continue
        rec = [t for p in ok for t in p["rechunk"]]
        shu = [t for p in ok for t in p["shuffle"]]
        st = [_stats(x) for x in (rec, shu)]
        rows.append(f"| {proto} | " + " | ".join(fmt_stat(x, 2) for x in st) + " | |")
    first = next((r["payload"] for runs in e2e.values() for r in runs if r.get("payload")), None)
    head = ["", "## End to end", ""]
    if first:
        head += [f"{first['workers']} workers (1 thread each): rechunk of a "
                 f"{first['array_bytes'] / 1e9:.2f} GB float64 array from column to row blocks "
                 f"(persisted), and a p2p `DataFrame.shuffle` of {first['rows']:,} rows; wall "
                 "time in seconds, median (min–max).", ""]
    return "\n".join(head + ["| protocol | rechunk s | p2p shuffle s | note |",
                              "|---|---:|---:|---|", *rows, ""])


def run_dask(proto: str, args, venv: Path, env: dict, tmp: Path, sizes: str) -> dict:
    """Transfers between two workers (1 thread each) over ``proto``."""
    argv, extra, note = dask_argv(proto, args, venv, tmp, DASK_BODY, 2, 1,
                                  [sizes, str(args.repeat), str(args.warmup), str(args.tasks)])
    if argv is None:
        return {"payload": None, "note": note, "skip": True}
    return _finish_dask(proto, args, argv, {**env, **extra}, tmp)


def _finish_dask(proto, args, argv, run_env, tmp) -> dict:
    raw = run_once(argv, run_env, str(tmp), args.timeout)
    payload = parse_payload(raw["stdout"])
    res = {"argv": argv[1:], "rc": raw["rc"], "timed_out": raw["timed_out"],
           "wall": round(raw["t1"] - raw["t0"], 2), "payload": payload}
    if payload is None:
        why = f"timed out after {args.timeout:g} s" if raw["timed_out"] else f"rc {raw['rc']}"
        tail = raw["stderr"].strip().splitlines()[-3:]
        res["stderr_tail"] = tail
        prefix = (TLS_UNSUPPORTED if proto == "tls" and args.tls_method == "config"
                  else f"{proto}: failed")
        res["note"] = f"{prefix} ({why}: {' / '.join(tail)[-300:]})"
    elif payload.get("protocol") != base_of(proto):
        res["note"] = f"{proto}: asked for, but the workers listen on {payload.get('protocol')}"
    return res


def run_mpi(args, venv: Path, env: dict, tmp: Path, sizes: str) -> dict:
    script = tmp / "bench_dataplane_mpi.py"
    script.write_text(MPI_SCRIPT)
    argv = [str(venv / "bin" / "mpiexec"), "-n", "2", str(venv / "bin" / "python"), str(script),
            sizes, str(args.repeat), str(args.warmup)]
    raw = run_once(argv, env, str(tmp), args.timeout)
    return run_record(argv, raw, parse_payload(raw["stdout"]), 5, "failed")


def touch_memory(gib: float) -> None:
    """Write one byte per page of ``gib`` GiB (1 GiB at a time, all held), then free it."""
    import numpy as np

    t = time.time()
    held = []
    for _ in range(max(1, round(gib))):
        b = np.empty(2**30, dtype="u1")
        b[::4096] = 1
        held.append(b)
    del held
    print(f"touched {gib:g} GiB in {time.time() - t:.1f} s", file=sys.stderr)


def measure_transfers(args, venv: Path, env: dict, size_arg: str) -> dict:
    """The transfer rounds of every protocol and the mpi4py reference, merged by source."""
    refs = [] if args.no_mpi else [REF]
    variants = list(args.protocols) + refs
    if args.arena:
        variants += [v + ARENA for v in variants if v in ("mpi", REF)]

    with tempfile.TemporaryDirectory(prefix="dml-bench-data-") as tmp:
        def one(v: str) -> dict:  # a tls that cannot work says skip: once is enough
            run_env = {**env, **ARENA_ENV} if v.endswith(ARENA) else env
            if base_of(v) == REF:
                return run_mpi(args, venv, run_env, Path(tmp), size_arg)
            return run_dask(v, args, venv, run_env, Path(tmp), size_arg)

        rounds = {v: [] for v in variants} | interleave(args.rounds, variants, one)
    return {v: merge(rs) for v, rs in rounds.items()}


def measure_e2e(args, venv: Path, env: dict) -> dict[str, list[dict]]:
    """The --e2e rounds (rechunk, shuffle) of every protocol."""
    with tempfile.TemporaryDirectory(prefix="dml-bench-e2e-") as tmp:
        return interleave(args.rounds, list(args.protocols),
                          lambda v: run_e2e(v, args, venv, env, Path(tmp)), "e2e round")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: bin/bench-data --sizes 8 64 256 --repeat 5 --protocols tcp tls")
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 64, 256],
                    help="array sizes, MiB (default 8 64 256)")
    ap.add_argument("--huge", action="store_true",
                    help="add 1024 MiB to the sizes (slow: a minute more per round)")
    ap.add_argument("--small", type=int, nargs="*", default=[8, 65536],
                    help="small array sizes, bytes (default 8 65536: the 8-byte exchange)")
    ap.add_argument("--arena", action="store_true",
                    help="also run mpi and the mpi4py reference with glibc's malloc kept from "
                         "unmapping freed memory (MALLOC_MMAP_MAX_=0, no trim): fresh "
                         "buffers then reuse pages touched before")
    ap.add_argument("--tasks", type=int, default=10_000,
                    help="tiny tasks of the graph timed per protocol and round (0: none)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds; each runs every variant once (one mpiexec), interleaved")
    ap.add_argument("--repeat", type=int, default=3,
                    help="timed runs per size, variant and round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per size and round")
    ap.add_argument("--no-latency", action="store_true", help="skip the --small sizes")
    ap.add_argument("--protocols", nargs="+", default=["tcp", "tls", "mpi"],
                    choices=["tcp", "tls", "mpi", "mpi-arena"],
                    help="Dask comm protocols to measure (tls needs `cryptography`; mpi: "
                         "dask_mpi_launch.dataplane.backend, workers in their ranks)")
    ap.add_argument("--e2e", action="store_true",
                    help="also run the end-to-end rechunk and p2p shuffle per protocol")
    ap.add_argument("--e2e-workers", type=int, default=6, help="workers of the e2e runs")
    ap.add_argument("--e2e-n", type=int, default=16384,
                    help="e2e array side (float64; 16384 -> 2.1 GB)")
    ap.add_argument("--e2e-rows", type=int, default=20_000_000, help="e2e shuffle rows")
    ap.add_argument("--e2e-repeat", type=int, default=2, help="timed e2e runs per round")
    ap.add_argument("--tls-method", choices=["auto", "cli", "config"], default="auto",
                    help="tls through dask-mpi-launch --tls (cli), or through Dask's config "
                         "with Security.temporary() certificates in files (config); auto: "
                         "cli when the installed dask-mpi-launch has --tls")
    ap.add_argument("--no-mpi", action="store_true", help="skip the mpi4py/socket reference")
    ap.add_argument("--timeout", type=float, default=300.0, help="per mpiexec run, seconds")
    ap.add_argument("--venv", type=Path, default=Path(os.environ.get("DML_BENCH_VENV",
                                                                     ".venv/bench")),
                    help="venv whose bin/ has mpiexec, python, dask-mpi-launch")
    ap.add_argument("--out", type=Path, default=results_dir(),
                    help="directory for dataplane.md/.json (default benchmarks/results)")
    ap.add_argument("--touch-memory", type=float, default=0.0, metavar="GIB",
                    help="first write to GIB GiB of memory, then free it: on a virtual "
                         "machine the first touch of guest memory also faults in the host "
                         "(measured here: 2.6 s per GiB), and transfers that landed in such "
                         "memory took 10x longer (0 = skip)")
    args = ap.parse_args(argv)
    if args.touch_memory > 0:
        touch_memory(args.touch_memory)

    venv = args.venv.absolute()
    meta = machine_facts(venv)
    if args.tls_method == "auto":
        args.tls_method = "cli" if cli_has_tls(venv) else "config"
    meta.update(rounds=args.rounds, repeat=args.repeat, warmup=args.warmup,
                tls_method=args.tls_method, touched_gib=args.touch_memory)
    env = make_env(venv, mpi_of(meta))
    env.setdefault("OMP_NUM_THREADS", "1")
    command = command_line(argv)
    sizes = (([] if args.no_latency else args.small) + [s * MIB for s in args.sizes]
             + ([1024 * MIB] if args.huge and 1024 not in args.sizes else []))
    size_arg = ",".join(map(str, sizes))
    print(f"MPI: {meta['mpi_library']}; venv {venv}; load {_load()}", file=sys.stderr)

    results = measure_transfers(args, venv, env, size_arg)
    e2e = measure_e2e(args, venv, env) if args.e2e else {}

    meta["load_end"] = _load()
    md = render_markdown(meta, results, command) + (render_e2e(e2e) if e2e else "")
    md_path, json_path = write_results(args.out, "dataplane", md, {
        "meta": meta, "command": command, "args": args_record(args),
        "results": results, "e2e": e2e})
    print(md)
    print(f"wrote {md_path}, {json_path}")
    return 0 if all(r.get("payload") for p, r in results.items() if p in ("tcp", "mpi", REF)) else 1


if __name__ == "__main__":
    sys.exit(main())
