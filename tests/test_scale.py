"""Scale-aware defaults (dask_mpi_launch/tuning/scale.py): in-process, no MPI."""
from __future__ import annotations

import asyncio
import copy
import shutil
import subprocess

import dask.config
import distributed  # noqa: F401 - registers distributed's defaults, as in a role process
import pytest

import dask_mpi_launch.configure.defaults  # noqa: F401 - registers our defaults
from dask_mpi_launch.tuning import scale


@pytest.fixture
def clean_config():
    saved = copy.deepcopy(dask.config.config)
    try:
        yield
    finally:
        dask.config.config.clear()
        dask.config.config.update(saved)


def test_small_jobs_keep_every_default(clean_config):
    for n in (1, 16, 1000):
        assert scale.for_job(n) == {}
        assert scale.describe(scale.for_job(n)) == ""


def test_big_jobs_get_a_deeper_queue_and_longer_timeouts(clean_config):
    changes = scale.for_job(10_000)
    assert changes == {
        "distributed.comm.socket-backlog": 10_000,
        "distributed.comm.timeouts.connect": "250s",
        "mpi-launch.connect-timeout": "100s",
        "mpi-launch.wait-timeout": "150s",
        "mpi-launch.shutdown-timeout": "40s",  # the scheduler closes 10,000 connections
    }
    assert scale.for_job(100_000)["distributed.comm.socket-backlog"] == 65535
    assert scale.for_job(100_000)["distributed.scheduler.worker-ttl"] == "1000s"
    assert "mpi-launch.shutdown-timeout" not in scale.for_job(2000)
    line = scale.describe(changes)
    assert "distributed.comm.socket-backlog 10000" in line and "\n" not in line
    assert scale.settings_overrides(changes) == {"connect_timeout": 100.0,
                                                 "wait_timeout": 150.0,
                                                 "shutdown_timeout": 40.0}


def test_the_users_dask_config_wins(clean_config, monkeypatch):
    dask.config.set({"distributed.comm.timeouts.connect": "10s"})  # in the process
    # in the environment, even with the default's own value
    monkeypatch.setenv("DASK_DISTRIBUTED__COMM__SOCKET_BACKLOG", "2048")
    # an explicit option (--wait-timeout)
    changes = scale.for_job(10_000, explicit=["mpi-launch.wait_timeout",
                                              "mpi-launch.shutdown-timeout"])
    assert changes == {"mpi-launch.connect-timeout": "100s"}


def test_values_only_grow(clean_config):
    config = copy.deepcopy(dask.config.config)
    defaults = copy.deepcopy(config)
    defaults["distributed"]["comm"]["socket-backlog"] = 50_000
    config["distributed"]["comm"]["socket-backlog"] = 50_000
    assert "distributed.comm.socket-backlog" not in scale.scale_defaults(10_000, config,
                                                                         defaults)


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
@pytest.mark.timeout(60)
def test_applied_backlog_reaches_the_schedulers_listening_socket(clean_config):
    changes = scale.for_job(3000)
    scale.apply(changes)
    somaxconn = int(open("/proc/sys/net/core/somaxconn").read())

    async def backlog() -> int:
        async with distributed.Scheduler(host="127.0.0.1", port=0, dashboard=False) as s:
            port = s.address.rsplit(":", 1)[1]
            out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                                 text=True, timeout=10).stdout
            return int(out.split()[2])  # Send-Q of a listening socket: its backlog

    assert asyncio.run(backlog()) == min(3000, somaxconn)


def test_doctests():
    import doctest

    assert doctest.testmod(scale).failed == 0


@pytest.mark.timeout(60)
def test_roles_raise_their_open_files_limit_to_the_hard_one():
    # a scheduler holds two connections per worker: 20,000 descriptors at 10,000 workers,
    # where sites often leave the soft limit at 1,024
    import resource
    import sys

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, soft)

    def lower():
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    code = ("import resource; from dask_mpi_launch.roles.run import raise_open_files_limit as r; "
            "before = resource.getrlimit(resource.RLIMIT_NOFILE)[0]; "
            "print(before, r(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         preexec_fn=lower, timeout=50)
    assert out.returncode == 0, out.stderr
    expected = hard if hard != resource.RLIM_INFINITY else 1 << 20
    assert out.stdout.split() == [str(low), str(expected), str(expected)]
