"""Pure parts, without MPI: layouts, settings, messages, the command line's parsing."""
import pytest
from click.testing import CliRunner

from dask_mpi_launch.base.errors import UsageError, WorldTooSmallError
from dask_mpi_launch.base.layout import CLIENT, SCHEDULER, WORKER, Layout, min_size
from dask_mpi_launch.base.status import Ended, exit_status
from dask_mpi_launch.configure.settings import (Settings, parse_memory_limit, parse_timeout,
                                      parse_worker_options, resolve)


@pytest.mark.parametrize("name, has_client, rank, roles", [
    ("dedicated", True, 0, (SCHEDULER,)),
    ("dedicated", True, 1, (CLIENT,)),
    ("dedicated", True, 2, (WORKER,)),
    ("dedicated", False, 1, (WORKER,)),
    ("compact", True, 0, (SCHEDULER, CLIENT)),
    ("compact", True, 1, (WORKER,)),
    ("full", True, 0, (SCHEDULER, CLIENT, WORKER)),
    ("full", False, 0, (SCHEDULER, WORKER)),
])
def test_roles(name, has_client, rank, roles):
    assert Layout(name, 4, has_client).roles(rank) == roles


def test_worker_ranks_and_minimum_sizes():
    assert Layout("dedicated", 5).worker_ranks == [2, 3, 4]
    assert Layout("dedicated", 5, has_client=False).worker_ranks == [1, 2, 3, 4]
    assert Layout("full", 3).worker_ranks == [0, 1, 2]
    assert [min_size(n) for n in ("dedicated", "compact", "full")] == [3, 2, 1]
    assert min_size("dedicated", has_client=False) == 2


def test_world_too_small_message():
    with pytest.raises(WorldTooSmallError) as e:
        Layout("dedicated", 1).check()
    assert str(e.value).startswith("needs at least 3 ranks (got 1): run with mpiexec -n 3 or more")
    assert e.value.status == 2
    Layout("dedicated", 3).check()


@pytest.mark.parametrize("value, expected", [
    ("auto", "auto"), (None, "auto"), ("4GB", 4_000_000_000), ("4 GiB", 4 * 2**30),
    (0.5, 0.5), ("0.25", 0.25), (1000, 1000), ("2e9", 2_000_000_000),
])
def test_memory_limit(value, expected):
    assert parse_memory_limit(value) == expected


@pytest.mark.parametrize("value", ["lots", "-1", "1.5", True, "4 parsecs"])
def test_bad_memory_limit(value):
    with pytest.raises(UsageError, match="invalid --memory-limit"):
        parse_memory_limit(value)


def test_worker_options():
    assert parse_worker_options('{"a": 1}') == {"a": 1}
    assert parse_worker_options({"b": 2}) == {"b": 2}
    assert parse_worker_options(None) == {}
    with pytest.raises(UsageError, match="JSON object"):
        parse_worker_options("[1, 2]")
    with pytest.raises(UsageError, match="invalid --worker-options JSON"):
        parse_worker_options("{nope")


def test_timeouts():
    assert parse_timeout("90s", "--wait-timeout") == 90
    assert parse_timeout(5, "--wait-timeout") == 5
    assert parse_timeout("2 minutes", "--wait-timeout") == 120
    with pytest.raises(UsageError, match="invalid --wait-timeout 'soon'"):
        parse_timeout("soon", "--wait-timeout")


def test_resolve_falls_back_to_dask_config():
    import dask

    with dask.config.set({"mpi-launch.interface": "ib0", "mpi-launch.wait-timeout": "30s"}):
        s = resolve(script="x.py")
        assert s.interface == "ib0" and s.wait_timeout == 30
        assert resolve(script="x.py", interface="lo").interface == "lo"
    assert resolve().has_client is False
    assert resolve(in_process=True).has_client is True


def test_worker_names():
    assert Settings().worker_name(3) == 3
    assert Settings(name="job").worker_name(3) == "job-3"
    assert Settings(worker_processes=2).worker_name(3, 1) == "3-1"


def test_status_descriptions():
    assert Ended(signal=9).describe() == "was killed by signal 9 (SIGKILL)"
    assert Ended(exited=137).describe() == "exited with status 137"  # sys.exit(137)
    assert Ended(exited=3).describe() == "exited with status 3"
    assert exit_status(SystemExit(None)) == 0
    assert exit_status(SystemExit(7)) == 7
    assert exit_status(SystemExit("message")) == 1


def test_cli_help_lists_options_with_defaults():
    from dask_mpi_launch.cli import command

    result = CliRunner().invoke(command, ["--help"])
    assert result.exit_code == 0
    for option in ("--interface", "--protocol", "--scheduler-port", "--dashboard / --no-dashboard",
                   "--dashboard-address", "--nthreads", "--memory-limit", "--local-directory",
                   "--worker-class", "--worker-options", "--name", "--scheduler-file",
                   "--wait-for-workers / --no-wait-for-workers", "--wait-timeout", "--layout"):
        assert option in result.output, option
    assert "configmpi-launch.worker-class" in "".join(result.output.split())


def test_cli_bad_option_values_before_mpi():
    from dask_mpi_launch.cli import command

    result = CliRunner().invoke(command, ["--layout", "sideways", "x.py"])
    assert result.exit_code == 2 and "sideways" in result.output


def test_package_import_is_light():
    import subprocess
    import sys

    code = ("import sys, dask_mpi_launch; "
            "print('mpi4py.MPI' in sys.modules, 'distributed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out
