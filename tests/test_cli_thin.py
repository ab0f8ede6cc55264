"""Thin ranks: a CLI rank imports neither click, dask nor distributed (its zygote parses the
command line with the rank's environment and working directory, and imports distributed
once per node), nor what it does not need (cryptography: the scheduler makes the TLS
credentials; dataclasses, typing, shutil, traceback...: file look-ups on every rank);
what the user sees is unchanged."""
import os

import pytest

from launch import finish, wait_no_leftovers

HANG = 90

# runs the real command line in the rank, and says at the rank's very end which heavy
# packages, and which modules it has no use for, that process imported (exit_rank: the end
# of a rank whose MPI is finalized)
RANK = """
import os, sys
from dask_mpi_launch import cli
from dask_mpi_launch.process import children
UNUSED = {"cryptography", "psutil", "dataclasses", "inspect", "ast", "tokenize", "typing",
          "shutil", "traceback", "threading"}
def report(*_):
    rank = os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK")
    top = {m.split(".")[0] for m in sys.modules}
    heavy = sorted(top & {"click", "dask", "distributed"})
    unused = "coverage" if "coverage" in top else sorted(top & UNUSED)  # (coverage's own)
    print(f"rank {rank} heavy {heavy} unused {unused}", flush=True)
real = children.exit_rank
children.exit_rank = lambda status: (report(), real(status))
try:
    cli.main(sys.argv[1:])
except SystemExit:
    report()
    raise
"""

CLIENT = """
import sys
from distributed import Client
client = Client()
print("result", client.submit(lambda x: x + 1, 41).result(), "distributed" in sys.modules,
      flush=True)
"""


def _ranks(venv, script, *args, env=None):
    argv = [venv.mpiexec, "-n", "4", venv.python, script(RANK, "rank.py"), *map(str, args)]
    return finish(venv.start(argv, env=env), HANG)


@pytest.mark.mpi
def test_cli_ranks_import_no_click_dask_or_distributed(venv, script):
    out = _ranks(venv, script, "--worker-processes", "2", script(CLIENT))
    assert out.status == 0, out
    assert "result 42 True" in out.out, out  # the client role has distributed, of course
    for rank in range(4):
        assert f"rank {rank} heavy [] unused []" in out.out, out  # TLS on: rank 0 too


@pytest.mark.mpi
def test_no_share_imports_ranks_are_thin_too(mpich, script):
    out = _ranks(mpich, script, "--no-share-imports", script(CLIENT))
    assert out.status == 0, out
    assert out.out.count("heavy [] unused []") == 4, out


@pytest.mark.mpi
def test_tls_without_cryptography_is_one_line(mpich, script, tmp_path):
    # the scheduler's process makes the credentials: where cryptography is missing its
    # rank says so once, as rank 0 did when it made them, and nothing is left running
    fake = tmp_path / "site" / "cryptography"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('not installed here')\n")
    path = script("print('the script ran', flush=True)", "no_crypto_job.py")
    out = mpich.launch(4, path, timeout=HANG, env={"PYTHONPATH": os.pathsep.join(
        [str(fake.parent), *filter(None, [os.environ.get("PYTHONPATH")])])})
    assert out.status == 1, out
    assert out.output.count("dask-mpi-launch: error on rank 0 (scheduler, host ") == 1, out
    assert out.output.count("TLS needs the cryptography package: pip install cryptography "
                            "(or run with --no-tls)") == 1, out
    assert "the script ran" not in out.out, out
    assert wait_no_leftovers(str(path)) == []


@pytest.mark.mpi
def test_the_ranks_environment_decides(mpich, script, tmp_path):
    # a DASK_* variable of the job and a relative path resolve as in the rank itself
    (tmp_path / "sub").mkdir()
    path = script("""
import json, os
from distributed import Client
client = Client()
info = client.scheduler_info()
print("workers", len(info["workers"]),
      "threads", sorted({w["nthreads"] for w in info["workers"].values()}), flush=True)
print("file", os.path.exists(os.path.join(os.path.dirname(__file__), "sub", "s.json")),
      flush=True)
""")
    out = mpich.launch(4, "--scheduler-file", "sub/s.json", path, timeout=HANG,
                       cwd=tmp_path, env={"DASK_MPI_LAUNCH__NTHREADS": "3"})
    assert out.status == 0, out
    assert "workers 2 threads [3]" in out.out and "file True" in out.out, out


@pytest.mark.mpi
def test_version_on_every_rank(venv):
    out = venv.launch(4, "--version", timeout=HANG)
    assert out.status == 0, out
    assert out.out.count("dask-mpi-launch, version ") == 4, out  # as click always did


# MPICH only: Open MPI ends the job at the first rank that exits non-zero, which may be
# before rank 0 printed (as before this change: about 1 run in 10 with --no-share-imports)
@pytest.mark.mpi
@pytest.mark.parametrize("args, text", [
    (["--bogus"], "Error: No such option '--bogus'."),  # errors: rank 0 only
    (["--memory-limit", "4XB", "x.py"], "dask-mpi-launch: error: invalid --memory-limit"),
    (["--no-share-imports", "--nthreads", "0", "x.py"], "invalid --nthreads '0'"),
])
def test_parse_errors_once_with_status_2(mpich, args, text):
    out = mpich.launch(4, *args, timeout=HANG)
    assert out.status == 2, out
    assert out.output.count(text) == 1, out


@pytest.mark.mpi
def test_help_does_not_wait_for_the_node(mpich):
    out = mpich.launch(8, "--help", timeout=HANG)
    assert out.status == 0, out
    assert out.out.count("Usage: dask-mpi-launch [OPTIONS] [SCRIPT] [ARGS]...") == 8, out
    assert out.seconds < 10, out  # not the node zygote's wait for ranks that never come


def test_parse_for_uses_the_ranks_environment_and_directory(tmp_path):
    # in-process: the zygote's parse, forked with another environment and directory
    from dask_mpi_launch.base.messages import ParseRequest
    from dask_mpi_launch.process.zygote import parse_for

    out_r, out_w = os.pipe()
    env = {**os.environ, "DASK_MPI_LAUNCH__NTHREADS": "5", "PMI_RANK": "0"}
    reply = parse_for(ParseRequest(["--scheduler-file", "s.json", "--check"], env,
                       str(tmp_path)), [out_w, os.dup(2)])
    assert reply[0] == "settings", reply
    settings, check = reply[1], reply[2]
    assert settings.nthreads == 5 and check is True
    assert settings.scheduler_file == str(tmp_path / "s.json")
    assert os.environ.get("DASK_MPI_LAUNCH__NTHREADS") is None  # this process: unchanged
    os.close(out_r)


def test_parse_for_prints_to_the_ranks_streams(tmp_path, capfd):
    from dask_mpi_launch.base.messages import ParseRequest
    from dask_mpi_launch.process.zygote import parse_for

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    env = {**os.environ, "PMI_RANK": "0"}
    with capfd.disabled():  # sys.stdout and stderr on file descriptors 1 and 2, as in a zygote
        assert parse_for(ParseRequest(["--layout", "sideways"], env, str(tmp_path)),
                         [os.dup(out_w), os.dup(err_w)]) == ("status", 2)
        assert parse_for(ParseRequest(["--version"], env, str(tmp_path)),
                         [out_w, err_w]) == ("status", 0)  # it closes what it is given
    assert os.read(out_r, 65536).decode().startswith("dask-mpi-launch, version ")
    assert "Invalid value for '--layout': 'sideways'" in os.read(err_r, 65536).decode()
    for fd in (out_r, err_r):
        os.close(fd)
