"""The supervisor's protocol in milliseconds, on an in-memory world (tests/memworld.py):
failures on any rank, the order of shutdown, priorities of statuses, restarts."""
import signal

import pytest

from memworld import run_job

from dask_mpi_launch.configure.settings import Settings


@pytest.fixture
def settings(tmp_path):
    path = tmp_path / "job.py"
    path.write_text("pass\n")

    def make(**kwargs):
        base = dict(script=str(path), tls=False, quiet=True, shutdown_timeout=2.0,
                    wait_timeout=5.0, startup_timeout=5.0, worker_restarts=0)
        base.update(kwargs)
        return Settings(**base)

    return make


def script_exits(status):
    def behaviour(child):
        child.exit(status)
    return behaviour


def test_script_status_is_every_ranks_and_shutdown_is_ordered(settings, capfd):
    statuses, launchers, log = run_job(4, settings(), {(1, "script"): script_exits(7)})
    assert statuses == [7, 7, 7, 7]
    order = [label for _, label, signum in log if signum != signal.SIGKILL]
    # the scheduler first (its close ends the workers in O(workers)), then what it left
    assert order.index("scheduler") < order.index("worker 2")
    assert order.index("scheduler") < order.index("worker 3")
    assert "error" not in capfd.readouterr().err


def test_workers_the_schedulers_close_ended_are_not_signalled(settings, capfd):
    import threading

    closed = threading.Event()

    def scheduler(child):  # its close tells every worker to close
        child.send("address", address="tcp://fake:1", identity={}, dashboard=None)
        signum = child.wait_signal()
        closed.set()
        child.exit(0 if signum else 1)

    def worker(child):
        child.send("ready", name=str(child.spec.name))
        closed.wait(10)
        child.exit(0)

    statuses, _, log = run_job(4, settings(), {(1, "script"): script_exits(7),
                                               (0, "scheduler"): scheduler,
                                               (2, "worker"): worker, (3, "worker"): worker})
    assert statuses == [7, 7, 7, 7]
    assert [label for _, label, _ in log] == ["scheduler"]
    assert "error" not in capfd.readouterr().err


def test_exit_status_137_is_not_a_signal(settings, capfd):
    statuses, _, _ = run_job(3, settings(), {(1, "script"): script_exits(137)})
    assert statuses == [137, 137, 137]
    assert "killed" not in capfd.readouterr().err


def test_script_killed_by_a_signal_is_reported(settings, capfd):
    def killed(child):
        child.exit(signum=signal.SIGSEGV)

    statuses, _, _ = run_job(3, settings(), {(1, "script"): killed})
    assert statuses == [139, 139, 139]
    err = capfd.readouterr().err
    assert err.count("dask-mpi-launch: error") == 1 and "signal 11 (SIGSEGV)" in err


@pytest.mark.parametrize("rank", [0, 2, 3])
def test_a_worker_dying_anywhere_fails_the_job_once(settings, capfd, rank):
    def dies(child):
        child.send("ready", name=str(child.spec.name))
        child.exit(signum=signal.SIGKILL)

    statuses, _, _ = run_job(4, settings(layout="full"), {(rank, "worker"): dies})
    assert statuses == [1, 1, 1, 1]
    err = capfd.readouterr().err
    assert err.count("dask-mpi-launch: error") == 1, err
    assert f"error on rank {rank} (" in err and "was killed by signal 9" in err


def test_error_said_just_before_exiting_is_not_lost(settings, capfd):
    def says_and_exits(child):
        child.send("error", message="the worker could not start: boom")
        child.exit(1)

    statuses, _, _ = run_job(3, settings(worker_restarts=3), {(2, "worker"): says_and_exits})
    assert statuses == [1, 1, 1]
    err = capfd.readouterr().err
    assert "the worker could not start: boom" in err and "restarting" not in err


def test_killed_worker_is_restarted_then_the_job_ends_normally(settings, capfd):
    lives = []

    def dies_once(child):
        lives.append(child)
        child.send("ready", name=str(child.spec.name))
        if len(lives) == 1:
            child.exit(signum=signal.SIGKILL)
        else:
            child.wait_signal()
            child.exit(0)

    def script(child):
        import time
        while len(lives) < 2:
            time.sleep(0.005)
        child.exit(0)

    statuses, _, _ = run_job(3, settings(worker_restarts=1),
                             {(2, "worker"): dies_once, (1, "script"): script})
    assert statuses == [0, 0, 0]
    assert len(lives) == 2 and lives[1].spec.name == lives[0].spec.name
    assert "restarting it (1 of 1)" in capfd.readouterr().err


def test_failure_outranks_the_scripts_status(settings):
    import time

    def script(child):
        time.sleep(0.3)
        child.exit(5)

    def fails(child):
        child.send("error", message="cannot connect")
        child.exit(1)

    statuses, _, _ = run_job(3, settings(), {(1, "script"): script, (2, "worker"): fails})
    assert statuses == [1, 1, 1]


def test_a_check_raising_anything_on_one_rank_is_one_message(settings, capfd):
    def check(rank, what, value):
        if rank == 2:
            raise RuntimeError("unexpected")
        return None

    statuses, _, _ = run_job(4, settings(), check=check)
    assert statuses == [1, 1, 1, 1]  # (memworld asserts every rank entered the same reduces)
    err = capfd.readouterr().err
    assert err.count("dask-mpi-launch: error") == 1
    assert "rank 2" in err and "internal error while checking: RuntimeError" in err


def test_a_check_error_on_several_ranks_is_said_once_for_the_lowest(settings, capfd):
    def check(rank, what, value):
        return f"bad worker class on rank {rank}" if rank >= 2 else None

    statuses, _, _ = run_job(5, settings(), check=check)
    assert statuses == [2, 2, 2, 2, 2]
    err = capfd.readouterr().err
    assert err.count("dask-mpi-launch: error") == 1
    assert "bad worker class on rank 2 (and 2 more ranks failed too)" in err


def test_cluster_only_job_ends_when_the_scheduler_is_shut_down(settings):
    def scheduler(child):
        import time
        child.send("address", address="tcp://fake:1", identity={}, dashboard=None)
        time.sleep(0.2)
        child.exit(0)  # a client called shutdown()

    statuses, _, _ = run_job(3, settings(script=None), {(0, "scheduler"): scheduler})
    assert statuses == [0, 0, 0]


def test_no_address_is_a_bounded_error(settings, capfd):
    def silent(child):
        child.wait_signal()
        child.exit(0)

    statuses, _, _ = run_job(3, settings(wait_timeout=0.3), {(0, "scheduler"): silent})
    assert statuses == [1, 1, 1]
    assert "no scheduler address from the scheduler within 0.3 s" in capfd.readouterr().err


def test_big_job_tuning_reaches_every_role_and_the_banner(settings, capfd, monkeypatch):
    from dask_mpi_launch.tuning import scale

    changes = {"distributed.comm.socket-backlog": 5000, "mpi-launch.connect-timeout": "50s"}
    monkeypatch.setattr(scale, "for_job", lambda n, explicit=(): dict(changes))

    def script(child):
        import time
        time.sleep(0.5)  # after the banner
        child.exit(0)

    statuses, launchers, _ = run_job(3, settings(quiet=False), {(1, "script"): script})
    assert statuses == [0, 0, 0]
    specs = [c.spec for launcher in launchers for c in launcher.started]
    assert specs and all(spec.dask_config == changes for spec in specs)
    assert all(spec.settings.connect_timeout == 50.0 for spec in specs)
    assert "tuning     scaled for a big job: distributed.comm.socket-backlog 5000" in \
        capfd.readouterr().out
