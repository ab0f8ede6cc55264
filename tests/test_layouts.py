"""Every rank computes: layouts, several worker processes per rank, restarts, join mode."""

import signal
import time

import pytest

from click.testing import CliRunner

from dask_mpi_launch.cli import command
from dask_mpi_launch.base.errors import UsageError, WorldTooSmallError
from dask_mpi_launch.base.layout import CLIENT as C, SCHEDULER as S, WORKER as W
from dask_mpi_launch.configure.settings import resolve
from launch import finish, run, wait_no_leftovers
from test_launch import CLIENT, HANG, _wait_for_file, one_error_line


# dask-mpi's execute() test table: (size, client rank, scheduler rank, exclusive workers)
@pytest.mark.parametrize("size, crank, srank, exclusive, roles", [
    (4, 1, 0, True, [(S,), (C,), (W,), (W,)]),
    (4, 2, 3, True, [(W,), (W,), (C,), (S,)]),
    (5, 1, 3, True, [(W,), (C,), (W,), (S,), (W,)]),
    (3, 2, 2, True, [(W,), (W,), (S, C)]),
    (2, 0, 0, False, [(S, C, W), (W,)]),
    (1, 0, 0, False, [(S, C, W)]),
    (3, 1, 0, False, [(S, W), (C, W), (W,)]),
])
def test_scheduler_and_client_ranks_as_dask_mpi(size, crank, srank, exclusive, roles):
    s = resolve(in_process=True, client_rank=crank, scheduler_rank=srank,
                exclusive_workers=exclusive)
    layout = s.layout_for(size)
    layout.check()
    assert [layout.roles(r) for r in range(size)] == roles
    assert (layout.scheduler_rank, layout.client_rank) == (srank, crank)
    assert layout.worker_ranks == [r for r in range(size) if W in roles[r]]


@pytest.mark.parametrize("size, crank, srank, exclusive, need", [
    (1, 1, 0, True, 3), (1, 0, 0, True, 2), (3, 1, 3, True, 4), (2, 2, 2, True, 3),
])
def test_ranks_beyond_the_world_are_too_small(size, crank, srank, exclusive, need):
    s = resolve(in_process=True, client_rank=crank, scheduler_rank=srank,
                exclusive_workers=exclusive)
    with pytest.raises(WorldTooSmallError, match=f"needs at least {need} ranks "):
        s.layout_for(size).check()


def test_cluster_only_scheduler_rank_and_inclusive_workers():
    layout = resolve(scheduler_rank=1).layout_for(2)
    assert layout.roles(0) == (W,) and layout.roles(1) == (S,) and layout.client_rank is None
    layout = resolve(exclusive_workers=False).layout_for(4)
    assert layout.name == "full" and layout.worker_ranks == [0, 1, 2, 3]
    assert resolve(scheduler_rank=1).layout_for(1).min_size == 2
    assert resolve(exclusive_workers=False).layout_for(1).min_size == 1
    # dedicated with the scheduler on rank 1: the script moves to rank 0
    assert resolve(script="x.py", scheduler_rank=1).layout_for(3).roles(0) == (C,)


@pytest.mark.parametrize("options, message", [
    (dict(layout="compact", exclusive_workers=False), "contradict each other"),
    (dict(layout="full", exclusive_workers=True), "contradict each other"),
    (dict(nanny=False, worker_class="distributed.Nanny"), "contradict each other"),
    (dict(layout="compact", client_rank=1), "runs the client on the scheduler's rank"),
    (dict(layout="dedicated", client_rank=0), "runs the client on its own rank"),
    (dict(scheduler_rank=-1), "invalid --scheduler-rank -1"),
])
def test_contradictions_are_one_line(options, message):
    with pytest.raises(UsageError, match=message):
        resolve(in_process=True, **options)


@pytest.mark.parametrize("argv, layout, worker_class", [
    ([], "dedicated", "distributed.Worker"),
    (["--inclusive-workers"], "full", "distributed.Worker"),
    (["--exclusive-workers", "--nanny"], "dedicated", "distributed.Nanny"),
    (["--no-nanny", "--worker-class", "dask_cuda.CUDAWorker"], "dedicated",
     "dask_cuda.CUDAWorker"),
    (["--layout", "compact", "--nanny"], "compact", "distributed.Nanny"),
])
def test_cli_maps_dask_mpi_options(monkeypatch, argv, layout, worker_class):
    import dask_mpi_launch.cli as cli

    seen = []
    monkeypatch.setattr(cli, "run", lambda settings, check=False: seen.append(settings) or 0)
    result = CliRunner().invoke(command, [*argv, "--scheduler-rank", "1"])
    assert result.exit_code == 0, result.output
    assert (seen[0].layout, seen[0].worker_class, seen[0].scheduler_rank) == (
        layout, worker_class, 1)


pytestmark = pytest.mark.mpi  # the launches below; the tests above are pure and fast


@pytest.mark.parametrize("layout, n, names", [
    ("compact", 2, "1"),
    ("compact", 3, "1,2"),
    ("full", 1, "0"),
    ("full", 3, "0,1,2"),
    ("dedicated", 3, "2"),
])
def test_layouts_at_their_minimum_size_and_above(mpich, script, layout, n, names):
    out = mpich.launch(n, "--layout", layout, script(CLIENT), timeout=HANG)
    assert out.status == 0, out
    count = len(names.split(","))
    assert f"workers={count} names={names} result=42" in out.out, out


@pytest.mark.parametrize("layout, n, need", [("compact", 1, 2), ("dedicated", 2, 3)])
def test_layouts_below_their_minimum(mpich, script, layout, n, need):
    out = mpich.launch(n, "--layout", layout, script(CLIENT), timeout=HANG)
    assert out.status == 2, out
    assert f"needs at least {need} ranks (got {n})" in one_error_line(out), out


def test_full_layout_without_mpiexec(mpich, script):
    out = run([mpich.bin / "dask-mpi-launch", "--layout", "full", script(CLIENT)],
              timeout=HANG, env=mpich.env())
    assert out.status == 0, out
    assert "workers=1 names=0 result=42" in out.out, out


def test_compact_layout_on_open_mpi(venv, script):
    out = venv.launch(3, "--layout", "compact", script(CLIENT + "\nsys.exit(4)\n"), timeout=HANG)
    assert out.status == 4, out
    assert "workers=2 names=1,2 result=42" in out.out, out


@pytest.mark.parametrize("k", [2, 4])
def test_worker_processes_split_threads(mpich, script, k):
    path = script(CLIENT + "\nprint('threads', sorted(w['nthreads'] for w in workers.values()))\n")
    out = mpich.launch(4, "--worker-processes", k, "--nthreads", 1, path, timeout=HANG)
    assert out.status == 0, out
    names = ",".join(f"{r}-{i}" for r in (2, 3) for i in range(k))
    assert f"workers={2 * k} names={names} result=42" in out.out, out


def test_killed_worker_process_is_restarted_and_the_result_is_right(venv, script):
    path = script(CLIENT + """
import signal
pids = client.run(os.getpid)
futures = client.map(lambda x: time.sleep(0.01) or x, range(200))
time.sleep(0.3)
os.kill(min(pids.values()), signal.SIGKILL)
print("total", sum(client.gather(futures)), flush=True)
client.wait_for_workers(2, timeout=20)
print("after", sorted(str(w["name"]) for w in client.scheduler_info()["workers"].values()))
""")
    out = venv.launch(4, path, timeout=HANG)
    assert out.status == 0, out
    assert "total 19900" in out.out and "after ['2', '3']" in out.out, out
    assert "restarting it (1 of 3)" in out.err and "SIGKILL" in out.err, out


def test_join_mode_adds_workers_and_both_jobs_end_at_shutdown(venv, tmp_path):
    sched = tmp_path / "scheduler.json"
    cluster = venv.start([venv.mpiexec, "-n", "3", venv.bin / "dask-mpi-launch",
                          "--scheduler-file", sched])
    assert _wait_for_file(sched, cluster), finish(cluster, 5)
    join = venv.start([venv.mpiexec, "-n", "2", venv.bin / "dask-mpi-launch",
                       "--no-scheduler", "--scheduler-file", sched])
    client = (
        "import sys; from dask_mpi_launch import connect\n"
        "c = connect(sys.argv[1], timeout=20)\n"
        "c.wait_for_workers(4, timeout=30)\n"
        "print('names', sorted(str(w['name']) for w in c.scheduler_info()['workers'].values()))\n"
        "print('sum', sum(c.gather(c.map(lambda x: x * 2, range(100)))))\n"
        "c.shutdown()\n"
    )
    out = run([venv.python, "-c", client, sched], timeout=HANG, env=venv.env())
    assert out.status == 0, out
    assert "sum 9900" in out.out, out
    names = out.out.split("names", 1)[1].splitlines()[0]
    assert "'1'" in names and "'2'" in names and names.count("join") == 2, out
    joined = finish(join, HANG)
    assert joined.status == 0, joined
    assert "joined the cluster" in joined.out, joined
    assert finish(cluster, HANG).status == 0


def test_join_job_ending_leaves_the_cluster_healthy(mpich, tmp_path):
    sched = tmp_path / "scheduler.json"
    cluster = mpich.start([mpich.mpiexec, "-n", "3", mpich.bin / "dask-mpi-launch",
                           "--scheduler-file", sched])
    try:
        assert _wait_for_file(sched, cluster), finish(cluster, 5)
        join = mpich.start([mpich.mpiexec, "-n", "2", mpich.bin / "dask-mpi-launch",
                            "--no-scheduler", "--scheduler-file", sched])
        check = ("import sys; from dask_mpi_launch import connect\n"
                 "c = connect(sys.argv[1], timeout=20)\n"
                 "c.wait_for_workers(int(sys.argv[2]), timeout=30)\n"
                 "print('n', len(c.scheduler_info()['workers']), c.submit(sum, [1, 2]).result())\n")
        out = run([mpich.python, "-c", check, sched, "4"], timeout=HANG, env=mpich.env())
        assert "n 4 3" in out.out, out
        join.send_signal(signal.SIGTERM)  # scancel / walltime of the join job
        assert finish(join, HANG).status in (0, 143)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = run([mpich.python, "-c", check, sched, "2"], timeout=HANG, env=mpich.env())
            if "n 2 3" in out.out:
                break
            time.sleep(0.2)
        assert "n 2 3" in out.out, out  # the cluster's own workers still compute
    finally:
        cluster.send_signal(signal.SIGTERM)
        finish(cluster, HANG)
    assert wait_no_leftovers(str(sched)) == []


def test_join_mode_needs_the_scheduler_file(mpich, tmp_path):
    out = mpich.launch(2, "--no-scheduler", timeout=HANG)
    assert out.status == 2, out
    assert "give --scheduler-file PATH" in one_error_line(out), out
    out = mpich.launch(2, "--no-scheduler", "--scheduler-file", tmp_path / "never.json",
                       "--wait-timeout", "2", timeout=HANG)
    assert out.status == 1, out
    assert "did not appear within 2 s" in one_error_line(out), out
