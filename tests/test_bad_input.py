"""Bad input ends a job with one line and status 2 (issue 21, cases 14, 15, 16, 19, 20).

Each bad value is checked in one place (``configure/settings.py``: the command line, initialize()'s
keywords, dask.config and DASK_* variables all go through it), before any role starts. The
unit tests feed the checks directly; the launches check what a user sees under both MPIs:
status 2, exactly one stderr line ``dask-mpi-launch: error...``, no traceback, nothing left
running.
"""
import os
import shutil
import subprocess
import time
import uuid

import pytest

from launch import wait_no_leftovers

from dask_mpi_launch.configure import settings as S
from dask_mpi_launch.base.errors import UsageError

HANG = 60

CLIENT = """
from distributed import Client
print("result", Client().submit(lambda x: x + 1, 1).result(), flush=True)
"""


# ---------------------------------------------------------------------------
# the checks, in-process


def _usage(call):
    with pytest.raises(UsageError) as info:
        call()
    message = info.value.message
    assert "\n" not in message and info.value.status == 2, message
    return message


@pytest.mark.parametrize("value", ["-1GB", "-1", -5, "1e400", "abc", "1.5", "nan", True])
def test_memory_limit_refused(value):
    assert "--memory-limit" in _usage(lambda: S.resolve(memory_limit=value))


@pytest.mark.parametrize("value, parsed", [("0", 0), (0, 0), ("4GB", 4 * 10**9),
                                           ("0.5", 0.5), ("auto", "auto"), (None, "auto")])
def test_memory_limit_taken(value, parsed):
    """0 is distributed's "no limit" (worker_memory.parse_memory_limit)."""
    assert S.parse_memory_limit(value) == parsed


@pytest.mark.parametrize("value", ["foo", "inproc", "ucx"])
def test_protocol_refused(value):
    assert "--protocol" in _usage(lambda: S.resolve(protocol=value))


@pytest.mark.parametrize("value", ["tcp", "tls", "ws", "mpi"])
def test_protocol_taken(value):
    assert S.resolve(protocol=value).protocol == value


@pytest.mark.parametrize("value", ["foo", ":99999", "127.0.0.1:", "tcp://h:1", ":-1"])
def test_dashboard_address_refused(value):
    assert "--dashboard-address" in _usage(lambda: S.resolve(dashboard_address=value))


@pytest.mark.parametrize("value", [":8787", "8787", "127.0.0.1:0", "[::1]:8787", 8787])
def test_dashboard_address_taken(value):
    assert S.resolve(dashboard_address=value).dashboard_address == str(value)


def test_dashboard_host_checked_on_the_scheduler_host():
    s = S.resolve(dashboard_address="nohost.invalid:8787")
    assert "nohost.invalid" in _usage(lambda: S.check_dashboard_host(s))
    S.check_dashboard_host(S.resolve(dashboard_address="localhost:0"))
    S.check_dashboard_host(S.resolve(dashboard_address="nohost.invalid:8787", dashboard=False))


@pytest.mark.parametrize("key, value", [
    ("distributed.comm.timeouts.connect", "abc"),
    ("distributed.comm.timeouts.connect", -5),
    ("distributed.comm.timeouts.tcp", "0s"),
    ("distributed.scheduler.allowed-failures", -1),
    ("distributed.worker.memory.pause", 1.5),
])
def test_dask_config_refused(key, value):
    config = {key: value}
    message = _usage(lambda: S.check_dask_config(lambda k, d=None: config.get(k, d)))
    assert key in message, message
    import dask.config

    with dask.config.set({key: value}):
        assert key in _usage(lambda: S.resolve())


def test_dask_config_taken():
    config = {"distributed.comm.timeouts.connect": "30s", "distributed.worker.memory.pause":
              False, "distributed.scheduler.allowed-failures": 3}
    S.check_dask_config(lambda k, d=None: config.get(k, d))


def test_interface_without_ipv4():
    names = {"lo", "ib0"}
    message = _usage(lambda: S.check_interface("ib0", names, lambda name: None))
    assert "'ib0'" in message and "no IPv4 address" in message, message
    assert "no network interface named 'eth7'" in _usage(
        lambda: S.check_interface("eth7", names, lambda name: "10.0.0.1"))
    S.check_interface("ib0", names, lambda name: "10.0.0.1")
    assert S.interface_ipv4("lo") == "127.0.0.1"


def test_module_that_is_a_package_without_main():
    message = _usage(lambda: S.check_script(S.Settings(module="email")))
    assert "-m email" in message and "__main__" in message, message
    S.check_script(S.Settings(module="json.tool"))  # a module
    S.check_script(S.Settings(module="venv"))  # a package with a __main__


BAD_YAML = {"unclosed.yaml": ("distributed:\n  comm: [unclosed\n",
                               "is not valid YAML (expected ',' or ']'"),
            "list.yaml": ("- 1\n- 2\n", "is not a mapping of settings")}


@pytest.mark.parametrize("name", sorted(BAD_YAML))
def test_malformed_dask_config_file_in_one_line(tmp_path, name):
    """dask's own error is 10 lines (its text, then YAML's marks)."""
    import dask.config
    from dask_mpi_launch.base.errors import ConfigFileError

    text, fragment = BAD_YAML[name]
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError) as info:
        dask.config.collect(paths=[str(tmp_path)], env={})
    error = ConfigFileError.from_dask(info.value)
    assert error is not None and error.status == 2
    assert "\n" not in error.message, error.message
    assert error.message.startswith(f"the dask config file {tmp_path / name} {fragment}"), \
        error.message
    assert ConfigFileError.from_dask(ValueError("something else")) is None


@pytest.mark.parametrize("value", ["0", "-5", "abc", "0s"])
def test_bootstrap_peer_timeout_refused(value):
    from dask_mpi_launch.control.over_files import peer_timeout

    message = _usage(lambda: peer_timeout({"DASK_MPI_LAUNCH__BOOTSTRAP_PEER_TIMEOUT": value}))
    assert "DASK_MPI_LAUNCH__BOOTSTRAP_PEER_TIMEOUT" in message


def test_bootstrap_peer_timeout_taken():
    from dask_mpi_launch.control.over_files import DEAD_AFTER, peer_timeout

    assert peer_timeout({"DASK_MPI_LAUNCH__BOOTSTRAP_PEER_TIMEOUT": "2"}) == 2.0
    assert peer_timeout({"DASK_MPI_LAUNCH__BOOTSTRAP_PEER_TIMEOUT": "90s"}) == 90.0
    assert peer_timeout({}) == DEAD_AFTER


# ---------------------------------------------------------------------------
# real launches: one line, status 2, nothing left running


def _no_leftovers(token: str, timeout: float = 15) -> list[str]:
    """Live processes whose environment holds ``token``."""
    return wait_no_leftovers(token, timeout, environment=True)


def _without_launcher_notice(err: str) -> list[str]:
    """stderr's lines without Open MPI's own notice of a non-zero exit (a block between
    dashed lines, "prterun detected that one or more processes exited with non-zero
    status"): mpirun prints it for any failing job, whatever the job printed. Nor
    libevent's warning inside prterun on a loaded machine ("[warn] Epoll MOD(1) on fd 31
    failed. Old events were 6; ..."), seen once in 516 tests: the launcher's, not ours."""
    lines, block = [], None
    for line in err.splitlines():
        if "Epoll" in line and "Old events were" in line:
            continue
        if line.startswith("-" * 20):
            if block is None:
                block = []
                continue
            if not any("prterun" in b or "mpirun" in b for b in block):
                lines.extend(block)
            block = None
            continue
        (lines if block is None else block).append(line)
    return lines + (block or [])


def assert_one_error_line(out, *fragments):
    assert out.status == 2, out
    assert "Traceback" not in out.output, out
    lines = _without_launcher_notice(out.err)
    assert len(lines) == 1 and lines[0].startswith("dask-mpi-launch: error"), out
    for fragment in fragments:
        assert fragment in lines[0], out


LAUNCHES = [
    # (id, ranks, options, environment, a fragment of the line)
    ("scheduler-rank", 3, ["--scheduler-rank", "5"], {}, "needs at least 6 ranks"),
    ("client-rank", 3, [], {"DASK_MPI_LAUNCH__CLIENT_RANK": "4"}, "needs at least 5 ranks"),
    ("memory-limit", 3, ["--memory-limit=-1GB"], {}, "invalid --memory-limit '-1GB'"),
    ("protocol", 3, ["--protocol", "foo"], {}, "invalid --protocol 'foo'"),
    ("dashboard-address", 3, ["--dashboard-address", "foo"], {}, "--dashboard-address"),
    ("dashboard-host", 3, ["--dashboard", "--dashboard-address", "nohost.invalid:8787"], {},
     "host 'nohost.invalid' is unknown"),
    ("connect-timeout", 3, [], {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "abc"},
     "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT"),
    ("module-package", 3, ["-m", "email"], {}, "package without a __main__"),
]


@pytest.mark.mpi
@pytest.mark.parametrize("name, n, options, env, fragment", LAUNCHES,
                         ids=[case[0] for case in LAUNCHES])
def test_bad_input_is_one_line_and_status_2(venv, script, name, n, options, env, fragment):
    token = f"DML_BAD_INPUT_{uuid.uuid4().hex}"
    args = [*options] if "-m" in options else [*options, script(CLIENT)]
    out = venv.launch(n, *args, timeout=HANG, env={**env, token: "1"})
    assert_one_error_line(out, fragment)
    assert _no_leftovers(token) == []


INITIALIZE = """
from dask_mpi_launch import initialize
initialize({keywords})
""" + CLIENT


@pytest.mark.mpi
@pytest.mark.parametrize("keywords, fragment", [
    ("scheduler_rank=5", "needs at least 6 ranks"),
    ("memory_limit='-1GB'", "invalid --memory-limit"),
    ("protocol='foo'", "invalid --protocol 'foo'"),
])
def test_initialize_bad_keyword_is_one_line_and_status_2(venv, script, keywords, fragment):
    token = f"DML_BAD_INPUT_{uuid.uuid4().hex}"
    out = venv.launch_python(3, script(INITIALIZE.format(keywords=keywords)), timeout=HANG,
                             env={token: "1"})
    assert_one_error_line(out, fragment)
    assert _no_leftovers(token) == []


def _can_make_namespaces() -> bool:
    return (os.geteuid() == 0 and shutil.which("unshare") is not None
            and shutil.which("ip") is not None
            and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0)


@pytest.mark.mpi
@pytest.mark.skipif(not _can_make_namespaces(), reason="needs root, unshare and ip")
def test_interface_without_ipv4_is_one_line_and_status_2(venv, script):
    """A veth interface with no address (IPv6 link-local only), in a network namespace
    of the test's own."""
    token = f"DML_BAD_INPUT_{uuid.uuid4().hex}"
    ifname = "dmlv" + uuid.uuid4().hex[:6]
    argv = [venv.mpiexec, "-n", "3", str(venv.bin / "dask-mpi-launch"), "--interface", ifname,
            str(script(CLIENT))]
    shell = (f"ip link set lo up && ip link add {ifname} type veth peer name {ifname}p && "
             f"ip link set {ifname} up && exec \"$@\"")
    from launch import run

    out = run(["unshare", "-n", "sh", "-c", shell, "sh", *argv], timeout=HANG,
              env=venv.env({token: "1"}))
    assert_one_error_line(out, f"network interface '{ifname}'", "has no IPv4 address")
    assert _no_leftovers(token) == []


@pytest.mark.mpi
@pytest.mark.parametrize("how", ["cli", "initialize"])
def test_malformed_dask_config_file_is_one_line_and_status_2(venv, script, tmp_path, how):
    config = tmp_path / "dask-config"
    config.mkdir()
    (config / "broken.yaml").write_text(BAD_YAML["unclosed.yaml"][0])
    token = f"DML_BAD_INPUT_{uuid.uuid4().hex}"
    env = {"DASK_CONFIG": str(config), token: "1"}
    if how == "cli":
        out = venv.launch(3, script(CLIENT), timeout=HANG, env=env)
    else:
        out = venv.launch_python(3, script(INITIALIZE.format(keywords="")), timeout=HANG,
                                 env=env)
    assert_one_error_line(out, f"the dask config file {config / 'broken.yaml'} is not valid YAML")
    assert _no_leftovers(token) == []


# ---------------------------------------------------------------------------
# --bootstrap slurm


@pytest.mark.parametrize("value", ["0", "-5"])
def test_bootstrap_peer_timeout_is_one_line_and_status_2(mpich, script, tmp_path, value):
    from test_bootstrap_slurm import finish_all, start_tasks

    exchange = tmp_path / "exchange"
    exchange.mkdir()
    procs = start_tasks(mpich, 3, [script(CLIENT)], exchange,
                        env={"DASK_MPI_LAUNCH__BOOTSTRAP_PEER_TIMEOUT": value})
    results = finish_all(procs, HANG)
    assert [status for status, _, _ in results] == [2, 2, 2], results
    err = "".join(e for _, _, e in results)
    assert err.count("\n") == 1 and err.startswith(
        f"dask-mpi-launch: error: invalid DASK_MPI_LAUNCH__BOOTSTRAP_PEER_TIMEOUT '{value}'"), err
    assert "Traceback" not in err
    assert os.listdir(exchange) == []


def test_rank_0_dead_the_others_remove_the_step_directory(mpich, script, tmp_path):
    """Rank 0 removes the step directory at the end; when it died, one of the others
    does (the directory was left behind for good)."""
    from launch import kill_group, leftover_processes
    from test_bootstrap_slurm import finish_all, start_tasks

    exchange = tmp_path / "exchange"
    exchange.mkdir()
    flag = tmp_path / "running"
    sleeper = script(f"import pathlib, time\npathlib.Path({str(flag)!r}).touch()\n"
                     "time.sleep(300)\n")
    procs = start_tasks(mpich, 4, [sleeper], exchange,
                        env={"DASK_MPI_LAUNCH__BOOTSTRAP_PEER_TIMEOUT": "2"})
    deadline = time.monotonic() + HANG
    while not flag.exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                kill_group(p)
            raise AssertionError(f"the job did not start: {finish_all(procs, 5)}")
        time.sleep(0.05)
    kill_group(procs[0])
    results = finish_all(procs[1:], HANG)
    assert [status for status, _, _ in results] == [1, 1, 1], results
    errors = [line for _, _, e in results for line in e.splitlines()]
    assert len(errors) == 1 and errors[0].startswith("dask-mpi-launch: error on rank 0 "), results
    assert "no sign of life for 2 s" in errors[0], results
    assert os.listdir(exchange) == []
    assert leftover_processes(str(exchange)) == []


# ---------------------------------------------------------------------------
# send_close_signal() twice

CLOSE_TWICE_EXIT_FALSE = """
import time
from dask_mpi_launch import initialize, send_close_signal
if initialize(exit=False):
    from distributed import Client
    with Client() as client:
        print("result", client.submit(lambda x: x + 1, 1).result(), flush=True)
    send_close_signal()
    t0 = time.monotonic()
    send_close_signal()
    print(f"second call {time.monotonic() - t0:.1f} s", flush=True)
"""

CLOSE_TWICE_SCRIPT = """
import time
from dask_mpi_launch import send_close_signal
send_close_signal()
t0 = time.monotonic()
send_close_signal()
print(f"second call {time.monotonic() - t0:.1f} s", flush=True)
"""


@pytest.mark.mpi
@pytest.mark.parametrize("how", ["initialize-exit-false", "script"])
def test_send_close_signal_twice_returns_at_once(venv, script, how):
    if how == "script":
        out = venv.launch(3, script(CLOSE_TWICE_SCRIPT), timeout=HANG)
    else:
        out = venv.launch_python(3, script(CLOSE_TWICE_EXIT_FALSE), timeout=HANG)
    assert out.status == 0, out
    assert "Traceback" not in out.output and "OSError" not in out.output, out
    seconds = float(out.out.split("second call ")[1].split(" s")[0])
    assert seconds < 5, out  # it waited distributed's 30 s connect timeout
