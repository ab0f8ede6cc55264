"""Grid Engine, live: the templates of sge-examples/ and the job's resources, on a real
one-host Grid Engine 8.1.9 cell started by tests/sge_cluster.py (MPICH's Hydra).

Jobs are submitted as a user would (a copy of sge-examples/, ``qsub -sync y -V -cwd -w e``
from there, dask-mpi-launch on PATH); every qsub has a timeout that kills its process group
and deletes the job.  Skipped when Grid Engine cannot be installed (not root) or the MPICH
venv is missing, except under CI=true (then a failure).  The cell is session-scoped
(``sge`` in conftest.py): Grid Engine's daemons use fixed ports, so one cell per machine.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import unavailable  # noqa: E402
from launch import Venv, run, wait_no_leftovers  # noqa: E402

pytestmark = [pytest.mark.mpi]

EXAMPLES = Path(__file__).resolve().parent.parent / "sge-examples"
JOB_TIMEOUT = 120  # seconds per job (a 4-rank job takes ~3-5 s here, ~16 s at load 20)
GIB = 2**30


@pytest.fixture(scope="module")
def venv() -> Venv:
    v = Venv("mpich")
    if not v.exists():
        unavailable(f"no mpich venv at {v.path}: run ./bin/test (it creates it)")
    return v


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A copy of sge-examples/, as a user would have it: jobs run from here."""
    path = tmp_path / "sge-examples"
    shutil.copytree(EXAMPLES, path)
    return path


def qsub(sge, venv, script, *options, cwd, env=None, timeout=JOB_TIMEOUT):
    status, out = sge.qsub(script, *options, cwd=cwd, env=venv.env(env), timeout=timeout)
    print(f"{Path(script).name} {' '.join(options)}: status {status} in "
          f"{sge.last_job_seconds:.2f} s")
    return status, out


def values(out: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+)=(.*)$", out, re.MULTILINE))


def directives(path: Path) -> list[str]:
    return [line[3:].strip() for line in path.read_text().splitlines() if line.startswith("#$ ")]


# ----------------------------------------------------------------------------- templates

def test_templates_ask_for_the_mpi_parallel_environment():
    for path in sorted(EXAMPLES.glob("*.sge")):
        found = directives(path)
        assert "-pe mpi 4" in found and "-V" in found and "-cwd" in found, (path, found)
        assert os.access(path, os.X_OK), path


@pytest.mark.parametrize("template, slots", [("mpiexec-script.sge", 4),
                                             ("initialize.sge", 5)])
def test_script_templates(sge, venv, workdir, template, slots):
    """mpiexec without -n: one rank per slot of the job, all but two of them workers."""
    status, out = qsub(sge, venv, workdir / template, "-pe", "mpi", str(slots), cwd=workdir)
    assert status == 0, out
    assert "Traceback" not in out, out
    assert values(out) == {"result": str(2000 * 2000), "workers": str(slots - 2)}, out


CONNECT = """\
import sys
from dask_mpi_launch import connect

with connect(sys.argv[1], timeout=10) as client:
    workers = len(client.scheduler_info()["workers"])
    result = client.submit(lambda x: x + 1, 41).result(timeout=10)
    print(f"workers={workers}")
    print(f"result={result}")
    client.shutdown()
"""


def test_cluster_only_template(sge, venv, workdir, tmp_path):
    """Submit, connect from outside the job when the file appears, end it by shutdown()."""
    files = tmp_path / "files"
    files.mkdir(mode=0o700)
    job = sge.submit(workdir / "cluster-only.sge", cwd=workdir,
                     env=venv.env({"DASK_SCHEDULER_DIR": str(files)}))
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while not list(files.glob("scheduler-*.json")):
            assert job.proc.poll() is None, f"job ended before its file:\n{job.output()}"
            assert time.monotonic() < deadline, f"no scheduler file:\n{job.output()}"
            time.sleep(0.2)
        (path,) = files.glob("scheduler-*.json")
        job_id = re.fullmatch(r"scheduler-(\d+)\.json", path.name).group(1)
        assert json.loads(path.read_text())["address"].startswith("tls://")
        connect = tmp_path / "connect.py"
        connect.write_text(CONNECT)
        client = run([venv.python, connect, path], timeout=30, env=venv.env())
        assert client.status == 0, f"{client}\n--- job output\n{job.output()}"
        assert values(client.out) == {"workers": "3", "result": "42"}, client
        status, out = sge.wait(job, JOB_TIMEOUT)
        assert status == 0, out
        assert f"scheduler file: {files}/scheduler-{job_id}.json" in out, out
        assert "Traceback" not in out, out
        assert not path.exists(), "scheduler file left behind"
    finally:
        if job.proc.poll() is None:
            sge.wait(job, 1)  # kills qsub's group, deletes the job, raises


def test_qdel_of_a_cluster_only_job_leaves_nothing_running(sge, venv, workdir, tmp_path):
    """qdel kills the job's processes (SIGKILL by default): none is left; the scheduler file
    and its credentials (readable by the owner only) stay behind, as the templates say."""
    files = tmp_path / "files"
    files.mkdir(mode=0o700)
    job = sge.submit(workdir / "cluster-only.sge", cwd=workdir,
                     env=venv.env({"DASK_SCHEDULER_DIR": str(files)}))
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while not list(files.glob("scheduler-*.json")):
            assert job.proc.poll() is None, f"job ended before its file:\n{job.output()}"
            assert time.monotonic() < deadline, f"no scheduler file:\n{job.output()}"
            time.sleep(0.2)
        assert sge.run(["qdel", job.name], timeout=10).returncode == 0
        sge.wait(job, JOB_TIMEOUT)
        assert wait_no_leftovers(str(files)) == [], "processes of the job left running"
        (credentials,) = files.glob("*.credentials")
        assert credentials.stat().st_mode & 0o077 == 0
    finally:
        if job.proc.poll() is None:
            sge.wait(job, 1)


# ----------------------------------------------------------------------------- Hydra

HYDRA = """\
#!/bin/bash
set -u
echo "nslots=$NSLOTS"
echo "hostfile=$(cat "$PE_HOSTFILE")"
echo "ranks=$(mpiexec hostname | wc -l)"
# Hydra reads PE_HOSTFILE, not NSLOTS: a copy granting 2 slots gives 2 ranks
awk '{$2 = 2; print}' "$PE_HOSTFILE" > pe_hostfile.2
echo "ranks_from_copy=$(PE_HOSTFILE=$PWD/pe_hostfile.2 mpiexec hostname | wc -l)"
mpiexec -n 3 python -c "import os, sys; sys.exit(5 if os.environ['PMI_RANK'] == '2' else 0)"
"""


def test_hydra_takes_hosts_from_pe_hostfile(sge, venv, tmp_path):
    script = tmp_path / "hydra.sh"
    script.write_text(HYDRA)
    status, out = qsub(sge, venv, script, "-pe", "mpi", "3", cwd=tmp_path)
    found = values(out)
    assert found["nslots"] == "3", out
    assert re.fullmatch(rf"{re.escape(sge.host)} 3 all\.q@\S+ UNDEFINED", found["hostfile"]), out
    assert (found["ranks"], found["ranks_from_copy"]) == ("3", "2"), out
    assert status == 5, out  # a rank's exit status is mpiexec's, and qsub -sync y's


# ----------------------------------------------------------------------------- resources

PROBE = """\
import os, resource, socket
from dask_mpi_launch.hpc.resources import detect_resources
import psutil
from distributed import Client

# what dask-mpi-launch reads on this rank, with Grid Engine's h_vmem (RLIMIT_AS)
found = detect_resources(
    os.environ, local_ranks=int(os.environ["MPI_LOCALNRANKS"]), cpu_count=os.cpu_count(),
    total_memory=psutil.virtual_memory().total,
    pe_hostfile=open(os.environ["PE_HOSTFILE"]).read(), hostname=socket.gethostname(),
    address_space_limit=max(resource.getrlimit(resource.RLIMIT_AS)[0], 0))
print(f"detected={found.scheduler} {found.job_id} {found.nthreads} {found.memory_limit}")
print(f"job_id={os.environ['JOB_ID']}")
client = Client()
for address, worker in sorted(client.scheduler_info()["workers"].items()):
    print(f"worker nthreads={worker['nthreads']} memory_limit={worker['memory_limit']}")
"""
JOB = "#!/bin/bash\nmpiexec -n 4 dask-mpi-launch probe.py\n"


def test_workers_get_the_jobs_slots_and_h_vmem(sge, venv, tmp_path):
    """8 slots, 4 ranks: 2 threads per worker (this machine has 2 cores: the default would be
    1); h_vmem=2G per slot: 16 GiB for the job's processes, 4 GiB per rank."""
    (tmp_path / "probe.py").write_text(PROBE)
    (tmp_path / "job.sh").write_text(JOB)
    status, out = qsub(sge, venv, tmp_path / "job.sh", "-pe", "mpi", "8", "-l", "h_vmem=2G",
                       cwd=tmp_path)
    assert status == 0, out
    job_id = values(out)["job_id"]
    assert values(out)["detected"] == f"sge {job_id} 2 {4 * GIB}", out
    workers = re.findall(r"^worker nthreads=(\d+) memory_limit=(\d+)$", out, re.MULTILINE)
    assert len(workers) == 2, out
    assert {n for n, _ in workers} == {"2"}, out
    assert {m for _, m in workers} == {str(4 * GIB)}, out


def test_script_exit_status_is_the_jobs(sge, venv, tmp_path):
    (tmp_path / "fail.py").write_text("import sys\nsys.exit(7)\n")
    (tmp_path / "job.sh").write_text("#!/bin/bash\nmpiexec dask-mpi-launch fail.py\n")
    status, out = qsub(sge, venv, tmp_path / "job.sh", "-pe", "mpi", "3", cwd=tmp_path)
    assert status == 7, out
    assert "Traceback" not in out, out
