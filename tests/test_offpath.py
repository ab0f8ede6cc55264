"""The paths off the main one (issue 11's table), each on real MPI: statuses of scripts that
imported mpi4py first, initialize(exit=False) in every layout and when the cluster fails, a
package that fails to import, stdin, subprocesses on SIGTERM, exit statuses that look like
signals, and role processes that never hold MPI."""
import signal
import time

import pytest

from launch import finish, wait_for_line, wait_no_leftovers

pytestmark = pytest.mark.mpi

HANG = 60

MPI_FIRST = """
import sys
from mpi4py import MPI
from dask_mpi_launch import initialize
initialize()
from distributed import Client
print("result", Client().submit(lambda x: x + 1, 1).result(), flush=True)
{end}
"""


@pytest.mark.parametrize("end, status", [
    ("raise SystemExit(3)", 3),
    ("exit(4)", 4),
    ("sys.exit('bye from the script')", 1),
    ("try:\n    sys.exit(5)\nexcept SystemExit as e:\n    print('caught', e.code)", 0),
])
def test_initialize_after_mpi4py_keeps_every_kind_of_exit(venv, script, end, status):
    out = venv.launch_python(3, script(MPI_FIRST.format(end=end)), timeout=HANG)
    assert out.status == status, out
    assert "result 2" in out.out, out
    if "bye" in end:
        assert out.err.count("bye from the script") == 1, out


EXIT_FALSE = """
import os, sys, time
from dask_mpi_launch import initialize, send_close_signal
is_client = initialize(exit=False, layout={layout!r}, scheduler_file={file!r})
if is_client:
    from distributed import Client
    with Client() as client:
        print("client sees", len(client.scheduler_info()["workers"]), flush=True)
    send_close_signal()
    time.sleep(1.5)  # outlives the other ranks' scripts: must not be killed
sys.stdout.write(f"done {{is_client}}\\n")  # one write: ranks share mpiexec's stdout, and
sys.stdout.flush()  # print's pieces (unbuffered) interleaved with another rank's once in CI
"""


@pytest.mark.parametrize("layout, workers", [("dedicated", 1), ("compact", 2), ("full", 3)])
def test_exit_false_every_layout_ends_cleanly(venv, script, tmp_path, layout, workers):
    sched = tmp_path / "sched.json"
    out = venv.launch_python(3, script(EXIT_FALSE.format(layout=layout, file=str(sched))),
                             timeout=HANG)
    assert out.status == 0, out
    assert f"client sees {workers}" in out.out, out
    assert out.out.count("done True") == 1 and out.out.count("done False") == 2, out
    assert "BAD TERMINATION" not in out.output and "Traceback" not in out.output, out
    assert not sched.exists() and list(tmp_path.glob("*credentials*")) == [], out


def test_exit_false_world_too_small_raises_dask_mpis_exception(venv, script):
    path = script("""
import sys
from dask_mpi_launch import initialize, WorldTooSmallException
try:
    initialize(exit=False, layout="compact")
except WorldTooSmallException as e:
    print("caught", type(e).__name__, flush=True)
    sys.exit(9)
""")
    out = venv.launch_python(1, path, timeout=HANG)
    assert out.status == 9, out
    assert "caught WorldTooSmallError" in out.out, out


def test_exit_false_failure_on_another_rank_raises_everywhere(mpich, script):
    path = script("""
import sys
from mpi4py import MPI
from dask_mpi_launch import initialize, LaunchError
try:
    initialize(exit=False, worker_class="no_such_module.Worker")
except LaunchError as e:
    print("raised on rank", MPI.COMM_WORLD.rank, flush=True)
    sys.exit(3)
print("returned on rank", MPI.COMM_WORLD.rank, flush=True)
""")
    out = mpich.launch_python(3, path, timeout=HANG)
    assert out.status == 3, out
    assert "returned on rank" not in out.out, out
    assert sorted(out.out.split()[3::4]) == ["0", "1", "2"], out
    assert out.err.count("cannot use --worker-class 'no_such_module.Worker'") == 1, out


@pytest.mark.parametrize("init, status, expected", [
    ("raise RuntimeError('broken package')", 1,
     "importing its package 'pkg' raised RuntimeError: broken package"),
    ("import sys; sys.exit(4)", 4, None),
    ("import sys; sys.exit(0)", 0, None),
])
def test_module_whose_package_fails(venv, tmp_path, init, status, expected):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"print('package init ran', flush=True)\n{init}\n")
    (pkg / "mod.py").write_text("print('module ran')\n")
    out = venv.launch(3, "-m", "pkg.mod", cwd=tmp_path, timeout=HANG)
    assert out.status == status, out
    assert out.out.count("package init ran") == 1, out  # in the client role only
    if expected:
        lines = [x for x in out.err.splitlines() if "dask-mpi-launch: error" in x]
        assert len(lines) == 1 and expected in lines[0], out
        assert "Traceback" not in out.output, out
    assert out.seconds < 20, out


STDIN = """
import sys, hashlib
data = sys.stdin.buffer.read()
print("read", len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


@pytest.mark.parametrize("size", [0, 50_000])  # Hydra gives up on > 64 KiB unread
def test_script_reads_the_jobs_stdin(venv, script, tmp_path, size):
    import hashlib
    import subprocess

    data = bytes(range(256)) * (size // 256) + b"end" * (size > 0)
    source = tmp_path / "input.bin"
    source.write_bytes(data)
    argv = [venv.mpiexec, "-n", "3", str(venv.bin / "dask-mpi-launch"), str(script(STDIN))]
    with open(source, "rb") as stdin:
        proc = subprocess.run(argv, stdin=stdin, capture_output=True, text=True,
                              env=venv.env(), timeout=HANG, start_new_session=True)
    assert proc.returncode == 0, proc
    if venv.impl == "openmpi":  # mpirun never passes end-of-file on: the script reads none
        data = b""
    assert f"read {len(data)} {hashlib.sha256(data).hexdigest()}" in proc.stdout, proc


def test_sigterm_ends_the_scripts_subprocesses(venv, script, tmp_path):
    marker = tmp_path / "finally.txt"
    path = script(f"""
import subprocess, sys, time
child = subprocess.Popen(["sleep", "300"])
print("started", child.pid, flush=True)
try:
    time.sleep(120)
finally:
    open({str(marker)!r}, "w").write("finally ran")
""")
    proc = venv.start([venv.mpiexec, "-n", "3", venv.bin / "dask-mpi-launch", path])
    line = wait_for_line(proc, "started", HANG)
    assert line, finish(proc, 5)
    sleeper = int(line.split()[1])
    proc.send_signal(signal.SIGTERM)
    out = finish(proc, HANG)
    assert out.status != 0, out
    assert marker.read_text() == "finally ran"
    assert _gone(sleeper, 10), f"the script's subprocess {sleeper} is still running"
    assert wait_no_leftovers(str(path)) == []


def _gone(pid: int, timeout: float) -> bool:
    """True once ``pid`` has ended (a zombie counts as ended), within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("code", [137, 134])
def test_exit_statuses_that_look_like_signals(mpich, script, code):
    out = mpich.launch(3, script(f"import sys; sys.exit({code})"), timeout=HANG)
    assert out.status == code, out
    assert "killed by signal" not in out.output, out


def test_initialize_exit_false_without_mpi4py_first(venv, script):
    path = script("""
import time
from dask_mpi_launch import initialize, send_close_signal
if initialize(exit=False):
    from distributed import Client
    with Client() as c:
        assert c.submit(lambda x: x * 2, 21).result() == 42
    send_close_signal()
    time.sleep(2)
    print("client end", flush=True)
""")
    out = venv.launch_python(4, path, timeout=HANG)
    assert out.status == 0, out
    assert "client end" in out.out, out
    assert "BAD TERMINATION" not in out.output, out


ROLES_WITHOUT_MPI = """
import mpi4py
mpi4py.rc.initialize = False
from mpi4py import MPI
from distributed import Client

def mpi_initialized():
    from mpi4py import MPI
    return MPI.Is_initialized()

client = Client()
print("script", MPI.Is_initialized(),
      "workers", sorted(client.run(mpi_initialized).values()),
      "scheduler", client.run_on_scheduler(mpi_initialized), flush=True)
"""


def test_role_processes_never_hold_mpi(venv, script):
    out = venv.launch(4, "--worker-processes", "2", script(ROLES_WITHOUT_MPI), timeout=HANG)
    assert out.status == 0, out
    assert "script False workers [False, False, False, False] scheduler False" in out.out, out


def test_initialize_roles_never_hold_mpi(mpich, script):
    text = "from dask_mpi_launch import initialize\ninitialize()\n" + ROLES_WITHOUT_MPI
    out = mpich.launch_python(4, script(text), timeout=HANG)
    assert out.status == 0, out
    assert "script False workers [False, False] scheduler False" in out.out, out
