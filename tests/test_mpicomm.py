"""The ``mpi`` comm backend (dask_mpi_launch.dataplane.backend): pure parts in-process, then real Dask
clusters under mpiexec (MPICH and Open MPI) whose workers run in their ranks and move data over
MPI point-to-point, driven by tests/mpicomm_harness.py."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "mpicomm_harness.py"

pytest.importorskip("distributed")
from dask_mpi_launch.dataplane import backend as mpicomm  # noqa: E402
from dask_mpi_launch.dataplane import connections, engine, wire, worker  # noqa: E402


# --- pure parts ---------------------------------------------------------------------------

def test_doctests():
    import doctest

    for module in (wire, engine, connections, mpicomm, worker):
        assert doctest.testmod(module).failed == 0, module.__name__


@pytest.mark.parametrize("loc, expected", [
    ("127.0.0.1:8786/3", ("127.0.0.1", 8786, 3)),
    ("node12:0", ("node12", 0, None)),
    ("[fe80::1]:41000/0", ("fe80::1", 41000, 0)),
])
def test_address_round_trip(loc, expected):
    assert mpicomm.parse_mpi_address(loc) == expected
    assert mpicomm.unparse_mpi_address(*expected) == loc


@pytest.mark.parametrize("bad", ["127.0.0.1:1/x", "127.0.0.1:1/", "127.0.0.1:1/-2"])
def test_address_with_a_bad_rank_is_refused(bad):
    with pytest.raises(ValueError, match="rank"):
        mpicomm.parse_mpi_address(bad)


def test_backend_answers_like_an_ip_backend():
    b = mpicomm.MPIBackend()
    assert b.get_address_host("10.1.2.3:9/4") == "10.1.2.3"
    assert b.get_address_host_port("10.1.2.3:9/4") == ("10.1.2.3", 9)
    assert b.resolve_address("127.0.0.1:9/4") == "127.0.0.1:9/4"


def test_bulk_frames_leave_placeholders_and_are_announced():
    frames = [b"x" * 10, bytes(range(256)) * 1000, b"", memoryview(b"abc")]
    sock, big = mpicomm.split_frames(frames, bulk_min=4096)
    assert [i for i, _ in big] == [1]  # 256000 B >= bulk_min travels over MPI
    assert [bytes(f) for f in sock] == [b"x" * 10, b"", b"", b"abc"]
    head = mpicomm.pack_announce(2**31 - 1, False, big)
    assert mpicomm.unpack_announce(head) == (2**31 - 1, False, {1: 256000})
    assert mpicomm.unpack_announce(mpicomm.pack_announce(1024, True, [])) == (1024, True, {})


def test_handshake_decides_who_is_a_peer():
    me = {"mpi_dataplane": {"job": "tls://10.0.0.1:8786", "rank": 2}}
    assert connections._peer_rank(me, {"mpi_dataplane": {"job": me["mpi_dataplane"]["job"],
                                                         "rank": 5}}) == 5
    assert connections._peer_rank(me, {"compression": None}) == -1  # scheduler, client
    assert connections._peer_rank(me, {"mpi_dataplane": {"job": "other", "rank": 5}}) == -1
    assert connections._peer_rank(me, {"mpi_dataplane": {"job": "x", "rank": "5"}}) == -1


def test_only_plain_buffers_skip_the_offload_thread():
    """A get_data answer of contiguous arrays is (de)serialized in the loop, flagged in the
    header so the receiver does the same; a DataFrame, a strided view or a pile of pickled
    objects keeps distributed's offload to a thread."""
    import numpy as np
    import pandas as pd
    from distributed.protocol import to_serialize

    def answer(**data):
        return {"status": "OK", "data": {k: to_serialize(v) for k, v in data.items()}}

    big = np.arange(2**23, dtype="f8")  # 64 MiB
    assert mpicomm.cheap_to_serialize(answer(a=big, b=big.reshape(2**11, -1).T,
                                             c=bytes(2**25)))
    assert not mpicomm.cheap_to_serialize(answer(a=big, d=pd.DataFrame({"x": big})))
    assert not mpicomm.cheap_to_serialize(answer(a=big.reshape(2**11, -1)[:, ::2]))
    assert not mpicomm.cheap_to_serialize(answer(**{f"k{i}": list(range(10**4))
                                                    for i in range(20)}))
    assert not mpicomm.cheap_to_serialize({"op": "x", "payload": b"z" * 2**21})  # msgpack copy
    assert mpicomm.cheap_to_serialize({"op": "get_data", "keys": ["x"] * 100})


@pytest.mark.parametrize("junk", [b"", b"DMLB", b"XXXX" + bytes(40),
                                  mpicomm.pack_announce(1024, False, []) + b"tail"])
def test_garbage_announcements_are_refused(junk):
    with pytest.raises(ValueError):
        mpicomm.unpack_announce(junk)


@pytest.mark.parametrize("nbytes", [0, 1, 2**31 - 1, 2**31, 3 * 2**30, 5 * 2**30 + 7])
def test_chunks_cover_the_frame_within_mpi_int_counts(nbytes):
    spans = mpicomm.chunk_spans(nbytes)
    assert spans[0][0] == 0 and spans[-1][1] == nbytes
    assert all(a == b for (_, a), (b, _) in zip(spans, spans[1:]))  # contiguous
    assert all(0 <= b - a <= 2**31 - 1 for a, b in spans)


def test_entry_point_is_declared():
    import tomllib

    meta = tomllib.loads((HERE.parent / "pyproject.toml").read_text())
    eps = meta["project"]["entry-points"]["distributed.comm.backends"]
    assert eps["mpi"] == "dask_mpi_launch.dataplane.backend:MPIBackend"


def test_not_a_peer_falls_back_to_tcp_in_process():
    """A process outside the data plane (scheduler, client) reaches mpi:// over TCP."""
    from distributed.comm import connect, listen

    assert mpicomm.engine() is None

    async def main():
        got = []

        async def handle(comm):
            got.append(await comm.read())
            await comm.write({"ok": True})
            await comm.close()

        async with listen("mpi://127.0.0.1:0", handle) as listener:
            addr = listener.contact_address
            assert addr.startswith("mpi://127.0.0.1:")
            comm = await connect(addr, timeout=10)
            assert comm.peer_address.startswith("tcp://")
            await comm.write({"x": b"payload"})
            reply = await comm.read()
            await comm.close()
        return got, reply

    got, reply = asyncio.run(asyncio.wait_for(main(), 60))
    assert got == [{"x": b"payload"}] and reply == {"ok": True}


# --- real clusters under mpiexec ----------------------------------------------------------

def results(outcome) -> dict:
    out = {}
    for line in outcome.out.splitlines():
        if line.startswith("RESULT "):
            key, _, value = line[7:].partition("=")
            out[key] = json.loads(value)
    return out


def harness(venv, n, scenario, timeout, env=None):
    return venv.launch_python(n, HARNESS, scenario, timeout=timeout,
                              env={"HARNESS_TIMEOUT": str(timeout), **(env or {})}, cwd=HERE)


@pytest.mark.mpi
@pytest.mark.timeout(600)
def test_computations_move_their_data_over_mpi(venv):
    """rechunk/transpose (216 MB, 4 workers), p2p shuffle, replicate/rebalance, idle CPU;
    1 MiB MPI messages so that frames travel in many chunks."""
    r = harness(venv, 5, "array,shuffle,replicate,idle", timeout=500,
                env={"HARNESS_CHUNK": str(2**20)})
    assert r.status == 0, r
    res = results(r)
    assert all(a.startswith("mpi://127.0.0.1:") for a in res["workers"]), r
    assert len(res["workers"]) == 4
    assert res["max_abs_diff"] == 0.0 and abs(res["sum_diff"]) < 1e-3, r
    assert res["rows"] == 400_000 and res["v_sum_ok"] and res["keys_disjoint"], r
    assert res["min_copies"] == 3 and res["sum_ok"] and res["holders"] >= 2, r
    assert res["idle_cpu_fraction"] <= 0.02, r
    assert res["idle_cpu_fraction"] <= 0.01, r  # nothing in flight: no MPI call at all
    assert all(s["in_flight"] == 0 for s in res["mpi_stats"].values()), r
    received = sum(s["received_bytes"] for s in res["mpi_stats"].values())
    assert received > res["nbytes"] / 2, r  # the data went over MPI, not TCP


@pytest.mark.mpi
@pytest.mark.timeout(600)
def test_three_gib_array_between_two_workers(mpich):
    r = harness(mpich, 3, "big", timeout=500)
    assert r.status == 0, r
    res = results(r)
    assert res["moved_nbytes"] == 3 * 2**30 and res["values_ok"], r
    assert max(s["received_bytes"] for s in res["mpi_stats"].values()) >= 3 * 2**30, r


@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_worker_rank_killed_mid_transfer_ends_the_job_promptly(venv):
    r = harness(venv, 3, "kill", timeout=240)
    res = results(r)
    if "completed" in res:  # the computation survived the loss
        assert r.status == 0 and res["completed"] == 4, r
    else:  # the launcher ends the job: not a hang, not success
        assert r.status != 0, r


@pytest.mark.mpi
@pytest.mark.timeout(200)
def test_stalled_transfer_and_closed_peer_become_comm_closed_errors(venv):
    r = venv.launch_python(2, HERE / "mpicomm_stall.py", timeout=150, cwd=HERE)
    assert r.status == 0, r
    res = results(r)
    assert res["comm_class"] == "MPITCP", r  # the socket, bulk over MPI
    stalled, closed = res["stalled"], res["closed"]
    assert stalled["first"] == {"hello": 1} and stalled["error"].startswith("CommClosedError"), r
    assert "stalled" in stalled["error"] and 1.5 < stalled["seconds"] < 30, r
    assert closed["first"] == {"hello": 2} and closed["error"].startswith("CommClosedError"), r
    assert closed["seconds"] < 10, r
