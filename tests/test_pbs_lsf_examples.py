"""PBS and LSF, emulated: the templates of pbs-examples/ and lsf-examples/.

Neither batch system installs here, so each template is checked in two steps: (a) its
directives are parsed (``#PBS -l select=...``, ``#BSUB -n ...``) and checked for what a
scheduler needs; (b) its job body runs with ``bash`` under the real ``mpiexec`` (MPICH's
Hydra, which reads PBS_NODEFILE / LSB_MCPU_HOSTS as on a real system) with the variables
that scheduler sets, made from those directives, in the directory where the scheduler
would start it.  Results, worker counts, threads per worker and file names must come out
as the directives say.  Every launch is bounded (tests/launch.py's ``run``).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import unavailable  # noqa: E402
from launch import Venv, kill_group, run  # noqa: E402

pytestmark = pytest.mark.mpi

ROOT = Path(__file__).resolve().parent.parent
PBS = ROOT / "pbs-examples"
LSF = ROOT / "lsf-examples"
HOST = socket.gethostname()
TIMEOUT = 120  # seconds per launch: generous, the machine may be loaded
ONES = str(2000 * 2000)
PBS_JOBID, LSB_JOBID = "4711.pbs01", "4242"
# variables of any batch system, dropped from the test's own environment first
_FOREIGN = re.compile(r"^(SLURM_|PBS_|LSB_|LSF_|SGE_|NCPUS$|NSLOTS$|NHOSTS$|PE_HOSTFILE$|"
                      r"JOB_ID$|OMP_NUM_THREADS$|PMI_|MPI_LOCAL)")


# ----------------------------------------------------------------------------- directives

def directives(path: Path, prefix: str) -> list[list[str]]:
    """The ``#PBS``/``#BSUB`` lines before the first command, split like a shell would."""
    found = []
    for line in path.read_text().splitlines()[1:]:
        if line.startswith(prefix + " "):
            found.append(shlex.split(line[len(prefix):]))
        elif line.strip() and not line.startswith("#"):
            break  # the scheduler stops reading directives at the first command
    return found


def pbs_request(path: Path) -> dict:
    req = {"name": None, "walltime": None, "chunks": None}
    for words in directives(path, "#PBS"):
        opt, arg = words[0], " ".join(words[1:])
        if opt == "-N":
            req["name"] = arg
        elif opt == "-l" and arg.startswith("select="):
            chunk = arg[len("select="):].split(":")
            count = int(chunk[0]) if chunk[0].isdigit() else 1
            res = dict(item.split("=", 1) for item in chunk[1:] if "=" in item)
            req["chunks"] = [{"ncpus": int(res.get("ncpus", 1)),
                              "mpiprocs": int(res.get("mpiprocs", 1)),
                              "ompthreads": res.get("ompthreads")}] * count
        elif opt == "-l" and arg.startswith("walltime="):
            req["walltime"] = arg[len("walltime="):]
    return req


def lsf_request(path: Path) -> dict:
    req = {"name": None, "walltime": None, "slots": None, "span": None, "output": None}
    for words in directives(path, "#BSUB"):
        opt, arg = words[0], " ".join(words[1:])
        if opt == "-J":
            req["name"] = arg
        elif opt == "-n":
            req["slots"] = int(arg)
        elif opt == "-W":
            req["walltime"] = arg
        elif opt == "-o":
            req["output"] = arg
        elif opt == "-R" and arg.startswith("span["):
            req["span"] = arg
    return req


@pytest.mark.parametrize("path", sorted(PBS.glob("*.pbs")), ids=lambda p: p.name)
def test_pbs_directives(path):
    req = pbs_request(path)
    assert req["name"] and re.fullmatch(r"[A-Za-z][\w.-]{0,14}", req["name"]), req
    assert re.fullmatch(r"\d\d:\d\d:\d\d", req["walltime"] or ""), req
    (chunk,) = req["chunks"]  # one host: all ranks share it (the emulation's assumption)
    assert chunk["mpiprocs"] >= 3 and chunk["ncpus"] >= chunk["mpiprocs"], req
    assert chunk["ompthreads"] is None, "ompthreads changes NCPUS (see docs/batch/pbs.rst)"
    text = path.read_text()
    assert 'cd "$PBS_O_WORKDIR"' in text and "#PBS -V" in text and os.access(path, os.X_OK)


@pytest.mark.parametrize("path", sorted(LSF.glob("*.lsf")), ids=lambda p: p.name)
def test_lsf_directives(path):
    req = lsf_request(path)
    assert req["name"] and req["slots"] and req["slots"] >= 3, req
    assert re.fullmatch(r"\d\d:\d\d", req["walltime"] or ""), req
    assert req["span"] == "span[hosts=1]", req
    assert req["output"] == f"{req['name']}.%J.out", req
    assert os.access(path, os.X_OK)


# ----------------------------------------------------------------------------- emulation

@pytest.fixture(scope="module")
def venv() -> Venv:
    v = Venv("mpich")
    if not v.exists():
        unavailable(f"no mpich venv at {v.path}: run ./bin/test (it creates it)")
    return v


def job_env(venv: Venv, variables: dict) -> dict:
    env = {k: v for k, v in venv.env().items() if not _FOREIGN.match(k)}
    env.update(variables)
    return env


def pbs_job(venv, tmp_path, template: str, extra=None):
    """(argv, env, cwd) of a PBS job: the template copied to a work dir, run from $HOME."""
    workdir, home = tmp_path / "work", tmp_path / "home"
    shutil.copytree(PBS, workdir)
    home.mkdir(mode=0o700)
    req = pbs_request(workdir / template)
    nodefile = tmp_path / "aux" / PBS_JOBID
    nodefile.parent.mkdir()
    chunks = req["chunks"]
    nodefile.write_text("".join(f"{HOST}\n" * c["mpiprocs"] for c in chunks))
    ncpus = str(chunks[0]["ncpus"])
    env = job_env(venv, {
        "PBS_JOBID": PBS_JOBID, "PBS_JOBNAME": req["name"], "PBS_NODEFILE": str(nodefile),
        "NCPUS": ncpus, "OMP_NUM_THREADS": ncpus, "PBS_O_WORKDIR": str(workdir),
        "PBS_ENVIRONMENT": "PBS_BATCH", "PBS_O_HOST": "login.example", "PBS_QUEUE": "workq",
        "PBS_NODENUM": "0", "PBS_TASKNUM": "1", "HOME": str(home), **(extra or {})})
    return ["bash", str(workdir / template)], env, home


def lsf_job(venv, tmp_path, template: str, extra=None, slots=None):
    workdir, home = tmp_path / "work", tmp_path / "home"
    shutil.copytree(LSF, workdir)
    home.mkdir(mode=0o700)
    req = lsf_request(workdir / template)
    n = slots or req["slots"]
    hostfile = tmp_path / f".lsbatch.{LSB_JOBID}.hostfile"
    hostfile.write_text(f"{HOST}\n" * n)
    env = job_env(venv, {
        "LSB_JOBID": LSB_JOBID, "LSB_JOBNAME": req["name"], "LSB_DJOB_NUMPROC": str(n),
        "LSB_MCPU_HOSTS": f"{HOST} {n}", "LSB_HOSTS": " ".join([HOST] * n),
        "LSB_DJOB_HOSTFILE": str(hostfile), "LSF_BINDIR": "/opt/lsf/10.1/linux/bin",
        "LS_SUBCWD": str(workdir), "LSB_SUB_HOST": "login.example", "LSB_QUEUE": "normal",
        "HOME": str(home), **(extra or {})})
    return ["bash", str(workdir / template)], env, workdir  # LSF starts jobs where bsub ran


class Job:
    """A job body in the background, its output (stdout and stderr) in a file."""

    def __init__(self, argv, env, cwd, out_path: Path):
        self.out_path = out_path
        with open(out_path, "w") as out:
            self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    @property
    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.output, re.MULTILINE)
            if found:
                return found
            assert self.proc.poll() is None, f"job ended {self.proc.returncode}:\n{self.output}"
            assert time.monotonic() < deadline, f"no {pattern!r} after {timeout} s:\n{self.output}"
            time.sleep(0.2)

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            raise AssertionError(f"HUNG: killed after {timeout} s\n{self.output}") from None


def values(out: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+)=(.*)$", out, re.MULTILINE))


def test_pbs_script_template(venv, tmp_path):
    """select=1:ncpus=8:mpiprocs=4: 4 ranks from PBS_NODEFILE, 2 workers of NCPUS/4 threads."""
    argv, env, cwd = pbs_job(venv, tmp_path, "script.pbs")
    outcome = run(argv, timeout=TIMEOUT, env=env, cwd=cwd)
    assert outcome.status == 0, outcome
    assert values(outcome.out) == {"result": ONES, "workers": "2",
                                   "threads_per_worker": "2"}, outcome
    assert "Traceback" not in outcome.output, outcome  # (a loaded machine may log warnings)


def test_pbs_initialize_template(venv, tmp_path):
    argv, env, cwd = pbs_job(venv, tmp_path, "initialize.pbs")
    outcome = run(argv, timeout=TIMEOUT, env=env, cwd=cwd)
    assert outcome.status == 0, outcome
    assert values(outcome.out) == {"result": ONES, "workers": "2"}, outcome


def test_lsf_script_template(venv, tmp_path):
    """-n 4 span[hosts=1]: 4 ranks from LSB_MCPU_HOSTS, 2 workers of one slot each."""
    argv, env, cwd = lsf_job(venv, tmp_path, "script.lsf")
    outcome = run(argv, timeout=TIMEOUT, env=env, cwd=cwd)
    assert outcome.status == 0, outcome
    assert values(outcome.out) == {"result": ONES, "workers": "2",
                                   "threads_per_worker": "1"}, outcome


def test_lsf_more_slots_than_ranks_gives_threads(venv, tmp_path):
    """docs/batch/lsf.rst's recipe: 16 slots on the host, mpiexec -ppn 4: 4 threads each."""
    argv, env, cwd = lsf_job(venv, tmp_path, "script.lsf", slots=16)
    body = Path(argv[1])
    body.write_text(body.read_text().replace("mpiexec dask-mpi-launch",
                                             "mpiexec -ppn 4 dask-mpi-launch"))
    outcome = run(argv, timeout=TIMEOUT, env=env, cwd=cwd)
    assert outcome.status == 0, outcome
    assert values(outcome.out) == {"result": ONES, "workers": "2",
                                   "threads_per_worker": "4"}, outcome


CONNECT = """\
import sys
from dask_mpi_launch import connect

with connect(sys.argv[1], timeout=10) as client:
    print(f"workers={len(client.scheduler_info()['workers'])}")
    print(f"result={client.submit(lambda x: x + 1, 41).result(timeout=10)}")
    client.shutdown()
"""


@pytest.mark.parametrize("system, file_id", [("pbs", "4711"), ("lsf", LSB_JOBID)])
def test_cluster_only_template(venv, tmp_path, system, file_id):
    """The file is named after the job id; connect() works; shutdown() ends the job with 0."""
    make = pbs_job if system == "pbs" else lsf_job
    argv, env, cwd = make(venv, tmp_path, f"cluster-only.{system}")
    expected = Path(env["HOME"]) / f"scheduler-{file_id}.json"
    job = Job(argv, env, cwd, tmp_path / "job.out")
    try:
        job.wait_for("cluster ready")
        assert expected.exists(), f"no {expected}:\n{job.output}"
        assert json.loads(expected.read_text())["address"].startswith("tls://")
        (tmp_path / "connect.py").write_text(CONNECT)
        client = run([venv.python, tmp_path / "connect.py", expected], timeout=30,
                     env=venv.env())
        assert client.status == 0, client
        assert values(client.out) == {"workers": "3", "result": "42"}, client
        assert job.wait() == 0, job.output
        assert f"scheduler file: {expected}" in job.output, job.output
        assert not expected.exists(), "scheduler file left behind"
    finally:
        kill_group(job.proc)


def test_pbs_jupyter_template(venv, tmp_path):
    """The Lab's URL and the tunnel through the submission host (PBS_O_HOST); shutting the
    Lab down through its API ends the job with 0."""
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        unavailable("jupyterlab is not installed: pip install -e '.[jupyter]'")
    argv, env, cwd = pbs_job(venv, tmp_path, "jupyter.pbs")
    job = Job(argv, env, cwd, tmp_path / "job.out")
    try:
        url = job.wait_for(r"JupyterLab at (http://\S+/lab\?token=\S+)").group(1)
        job.wait_for(r"ssh -N -L .* login\.example ")
        base, token = url.split("/lab?token=")
        request = urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST")
        urllib.request.urlopen(request, timeout=10).close()
        assert job.wait() == 0, job.output
    finally:
        kill_group(job.proc)
