"""HPC defaults of the role processes (dask_mpi_launch/idle.py): in-process, no MPI.

The user's own config always wins: YAML files, DASK_* variables, dask.config.set()."""
import copy
import subprocess
import sys

import dask.config
import distributed  # noqa: F401  (its defaults are loaded, as in a role process)
import pytest
from dask.utils import parse_timedelta

from dask_mpi_launch.tuning import idle

TICK = "distributed.admin.tick.interval"
MONITOR = "distributed.admin.system-monitor.interval"
PROFILE = "distributed.worker.profile.interval"


@pytest.fixture
def fresh_config(monkeypatch, tmp_path):
    """dask.config as a new process would load it, with no user files nor DASK_* variables;
    restored afterwards."""
    saved = copy.deepcopy(dask.config.config)
    import os

    for name in list(os.environ):
        if name.startswith("DASK_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(dask.config, "paths", [str(tmp_path)])

    def reload():
        dask.config.refresh(paths=dask.config.paths)

    reload()

    yield tmp_path, reload
    dask.config.config.clear()
    dask.config.config.update(saved)


def ours() -> dict:
    return idle.flatten(dask.config.get("mpi-launch.hpc-config"))


def library_default(key):
    return dask.config.get(key, config=dask.config.merge(*dask.config.defaults))


def test_every_key_is_one_of_distributeds_and_parses():
    keys = ours()
    assert {TICK, MONITOR, PROFILE} <= set(keys)
    for key, value in keys.items():
        assert library_default(key) is not None, f"{key} is not a key of distributed's config"
        assert parse_timedelta(value) > parse_timedelta(library_default(key)), key


def test_applied_where_the_user_chose_nothing(fresh_config):
    assert dask.config.get(TICK) == library_default(TICK) == "20ms"
    chosen = idle.apply_hpc_defaults()
    assert chosen == ours()
    for key, value in ours().items():
        assert dask.config.get(key) == value
    assert parse_timedelta(dask.config.get(TICK)) >= 0.5


def test_environment_variable_wins(fresh_config, monkeypatch):
    _, reload = fresh_config
    monkeypatch.setenv("DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL", "7ms")
    monkeypatch.setenv("DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL", "300ms")
    reload()
    chosen = idle.apply_hpc_defaults()
    assert dask.config.get(TICK) == "7ms"
    assert dask.config.get(MONITOR) == "300ms"
    assert TICK not in chosen and MONITOR not in chosen
    assert dask.config.get(PROFILE) == ours()[PROFILE]  # the others still apply


def test_yaml_file_wins_even_with_distributeds_value(fresh_config):
    directory, reload = fresh_config
    (directory / "site.yaml").write_text(
        "distributed:\n  worker:\n    profile:\n      interval: 10ms\n")
    reload()
    chosen = idle.apply_hpc_defaults()
    assert dask.config.get(PROFILE) == "10ms"  # the library's value, but chosen by the user
    assert PROFILE not in chosen and TICK in chosen


def test_config_set_in_the_process_wins(fresh_config):
    dask.config.set({TICK: "40ms"})  # e.g. before initialize() in the script
    idle.apply_hpc_defaults()
    assert dask.config.get(TICK) == "40ms"
    assert dask.config.get(MONITOR) == ours()[MONITOR]


@pytest.mark.parametrize("how", ["yaml", "env"])
def test_off_switch_keeps_distributeds_defaults(fresh_config, monkeypatch, how):
    directory, reload = fresh_config
    if how == "yaml":
        (directory / "mine.yaml").write_text("mpi-launch:\n  hpc-defaults: false\n")
    else:
        monkeypatch.setenv("DASK_MPI_LAUNCH__HPC_DEFAULTS", "False")
    reload()
    assert idle.apply_hpc_defaults() == {}
    for key in ours():
        assert dask.config.get(key) == library_default(key)


def test_a_process_that_imports_the_package_keeps_distributeds_defaults():
    code = ("import dask_mpi_launch, dask_mpi_launch.cli, dask_mpi_launch.roles.run, distributed, "
            "dask; print(dask.config.get('distributed.admin.tick.interval'), "
            "dask.config.get('distributed.worker.profile.interval'))")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["20ms", "10ms"]
