"""The sbatch templates in slurm-examples/ really run, on a live single-node Slurm.

Each template is submitted as a user would (copied to a directory, ``sbatch`` from there,
dask-mpi-launch found on PATH, which sbatch exports from the submitting environment) and
its job must end COMPLETED with exit code 0 and print exactly the expected results.
Skipped when Slurm or the MPICH venv is missing, except under CI=true (then a failure).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import unavailable  # noqa: E402
from launch import Venv, run  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.mpi]

EXAMPLES = Path(__file__).resolve().parent.parent / "slurm-examples"
JOB_TIMEOUT = 30  # seconds, per job (a 4-rank job takes ~2-4 s here)
ONES = 2000 * 2000  # client.py sums da.ones((2000, 2000))
MIB = 2**20


@pytest.fixture(scope="module")
def venv() -> Venv:
    v = Venv("mpich")
    if not v.exists():
        unavailable(f"no mpich venv at {v.path}: run ./bin/test (it creates it)")
    if not (v.bin / "dask-mpi-launch").exists():
        unavailable(f"dask-mpi-launch is not installed in {v.path}")
    return v


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A copy of slurm-examples/, as a user would have it: jobs run from here."""
    path = tmp_path_factory.mktemp("slurm-examples")
    for f in EXAMPLES.iterdir():
        if f.is_file():
            shutil.copy2(f, path / f.name)
    return path


def submit(slurm, venv, script, *options, chdir, script_args=(), env=None,
           timeout=JOB_TIMEOUT):
    """sbatch SCRIPT from CHDIR with the venv's bin first in PATH; wait; return the output."""
    t0 = time.monotonic()
    job_id, state, code, out = slurm.sbatch(
        script, f"--chdir={chdir}", *options, script_args=tuple(map(str, script_args)),
        env=venv.env(env), timeout=timeout)
    print(f"job {job_id} {Path(script).name} {' '.join(options)}: {state} rc {code} "
          f"in {time.monotonic() - t0:.2f} s")
    remove_leaked_shm(job_id)
    return state, code, out


def _fnv1a(text: str) -> int:
    h = 0x811C9DC5
    for byte in text.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def remove_leaked_shm(job_id: str, steps: int = 4) -> None:
    """Remove the shared-memory segments MPICH left behind for this (ended) job's steps.

    MPICH names a node's segment after the FNV-1a hash of its PMI job id, which under srun
    is "JOBID.STEP", and leaves it in /dev/shm when a rank ends without MPI_Finalize
    (killed, MPI_Abort).  Test clusters number their jobs from 1 again each time, so a
    segment left by job 5.0 of one run is opened by job 5.0 of the next, whose MPI_Init
    then hangs or fails ("Out of memory").  Only segments no process maps are removed.
    """
    names = {f"mpich_{kind}_{_fnv1a(f'{job_id}.{step}'):x}_0"
             for kind in ("shm", "vci") for step in range(steps)}
    present = [n for n in names if os.path.exists(f"/dev/shm/{n}")]
    if not present:
        return
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                text = f.read()
        except OSError:
            continue
        mapped.update(n for n in present if n in text)
    for name in set(present) - mapped:
        try:
            os.unlink(f"/dev/shm/{name}")
        except OSError:
            pass


def values(out: str) -> dict[str, str]:
    """``key=value`` lines of a job's output (stderr lines are mixed in: ignored)."""
    return dict(re.findall(r"^(\w+)=(.*)$", out, re.MULTILINE))


def assert_clean_success(state, code, out):
    assert (state, code) == ("COMPLETED", 0), out
    assert "Traceback" not in out, out


# ----------------------------------------------------------------------------- templates

@pytest.mark.parametrize("template", ["srun-script.sbatch", "mpiexec-script.sbatch"])
def test_script_template(slurm, venv, workdir, template):
    state, code, out = submit(slurm, venv, workdir / template, "--ntasks=4", chdir=workdir)
    assert_clean_success(state, code, out)
    assert values(out) == {"result": str(ONES), "workers": "2"}, out


def test_initialize_template(slurm, venv, workdir):
    state, code, out = submit(slurm, venv, workdir / "initialize.sbatch", "--ntasks=4",
                              chdir=workdir)
    assert_clean_success(state, code, out)
    assert values(out) == {"result": str(ONES), "workers": "2"}, out


def test_futures_template(slurm, venv, workdir):
    n = 20
    state, code, out = submit(slurm, venv, workdir / "futures.sbatch", "--ntasks=5",
                              chdir=workdir, script_args=[n])
    assert_clean_success(state, code, out)
    squares = [i * i for i in range(n)]
    assert values(out) == {"results": str(squares), "sum": str(sum(squares)),
                           "workers": "3"}, out


def test_joblib_template(slurm, venv, workdir):
    probe = run([venv.python, "-c", "import joblib"], timeout=30, env=venv.env())
    if probe.status != 0:
        unavailable(f"joblib is not installed in {venv.path} (it belongs in the test extra)")
    n = 30
    state, code, out = submit(slurm, venv, workdir / "joblib.sbatch", "--ntasks=4",
                              chdir=workdir, script_args=[n])
    assert_clean_success(state, code, out)
    assert values(out) == {"sum": str(sum(i * i for i in range(n))),
                           "ran_on_workers": "True", "workers": "2"}, out


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


class ClusterOnlyJob:
    """cluster-only.sbatch submitted without waiting, its scheduler file in ``directory``."""

    def __init__(self, slurm, venv, workdir, directory: Path, ntasks: int):
        self.slurm, self.ntasks = slurm, ntasks
        self.out_path = directory / "cluster.out"
        proc = slurm.run(["sbatch", "--parsable", f"--chdir={workdir}",
                          f"--output={self.out_path}", f"--ntasks={ntasks}",
                          str(workdir / "cluster-only.sbatch")],
                         timeout=30, env=venv.env({"DASK_SCHEDULER_DIR": str(directory)}))
        self.job_id = proc.stdout.strip().split(";")[0]
        assert proc.returncode == 0 and self.job_id, proc.stderr
        self.scheduler_file = directory / f"scheduler-{self.job_id}.json"
        self.submitted = time.monotonic()

    @property
    def output(self) -> str:
        return _read(self.out_path)

    def wait_ready(self, timeout=JOB_TIMEOUT) -> float:
        """Seconds from submission until the scheduler file appeared."""
        while not self.scheduler_file.exists():
            state = self.slurm.job_info(self.job_id).get("JobState")
            assert state in ("PENDING", "CONFIGURING", "RUNNING"), (
                f"job ended {state} before writing {self.scheduler_file}\n{self.output}")
            assert time.monotonic() - self.submitted < timeout, (
                f"no scheduler file after {timeout} s\n{self.output}")
            time.sleep(0.1)
        return time.monotonic() - self.submitted

    def wait_end(self, timeout=15) -> tuple[str, str, float]:
        """(state, ExitCode "rc:signal", seconds waited) once the job has ended."""
        t0 = time.monotonic()
        info = {}
        while time.monotonic() - t0 < timeout:
            info = self.slurm.job_info(self.job_id)
            if info.get("JobState") not in ("PENDING", "CONFIGURING", "RUNNING",
                                            "COMPLETING"):
                break
            time.sleep(0.1)
        return info.get("JobState", ""), info.get("ExitCode", ""), time.monotonic() - t0

    def cancel(self) -> None:
        try:
            self.slurm.run(["scancel", self.job_id], timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def cleanup(self) -> None:
        """Cancel the job if it still runs; once it has ended, remove its leaked segments."""
        self.cancel()
        state = self.wait_end(timeout=5)[0]
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            remove_leaked_shm(self.job_id)


def test_cluster_only_template(slurm, venv, workdir, tmp_path):
    """Submit without waiting, connect from outside the job, end the job by client.shutdown()."""
    job = ClusterOnlyJob(slurm, venv, workdir, tmp_path, ntasks=4)
    try:
        ready = job.wait_ready()
        address = json.loads(job.scheduler_file.read_text())["address"]
        assert address.startswith("tls://127.0.0.1:"), address  # TLS by default

        connect = tmp_path / "connect.py"
        connect.write_text(CONNECT)
        client = run([venv.python, connect, job.scheduler_file], timeout=30, env=venv.env())
        assert client.status == 0, f"{client}\n--- job output\n{job.output}"
        assert values(client.out) == {"workers": str(job.ntasks - 1), "result": "42"}, client

        state, exit_code, seconds = job.wait_end()
        print(f"cluster-only job {job.job_id}: file after {ready:.2f} s, ended {state} "
              f"{exit_code} {seconds:.2f} s after the client's shutdown()")
        out = job.output
        assert (state, exit_code) == ("COMPLETED", "0:0"), out
        assert f"scheduler file: {job.scheduler_file}" in out, out
        assert "dask-mpi-launch: cluster ready" in out, out
        assert "Traceback" not in out, out
        assert not job.scheduler_file.exists(), "scheduler file left behind at the end"
    finally:
        job.cleanup()


def test_cluster_only_template_ends_on_scancel(slurm, venv, workdir, tmp_path):
    job = ClusterOnlyJob(slurm, venv, workdir, tmp_path, ntasks=3)
    try:
        ready = job.wait_ready()
        job.cancel()
        state, exit_code, seconds = job.wait_end()
        print(f"cluster-only job {job.job_id}: file after {ready:.2f} s, ended {state} "
              f"{exit_code} {seconds:.2f} s after scancel")
        assert state == "CANCELLED", job.output
        assert seconds < 10, job.output
        assert not job.scheduler_file.exists(), "scheduler file left behind after scancel"
    finally:
        job.cleanup()


ADD_CONNECT = """\
import sys
from dask_mpi_launch import connect

client = connect(sys.argv[1], timeout=20)
client.wait_for_workers(int(sys.argv[2]), timeout=30)
names = sorted(str(w["name"]) for w in client.scheduler_info()["workers"].values())
print("names=" + ",".join(names))
print("sum=%d" % sum(client.gather(client.map(lambda x: x * 2, range(100)))))
client.shutdown()
"""


def test_add_workers_template_joins_a_running_cluster(slurm, venv, workdir, tmp_path):
    """cluster-only job + add-workers job: 3 + 2 workers compute; shutdown ends both jobs."""
    cluster = ClusterOnlyJob(slurm, venv, workdir, tmp_path, ntasks=4)
    add_out = tmp_path / "add.out"
    add_id = None
    try:
        cluster.wait_ready()
        proc = slurm.run(["sbatch", "--parsable", f"--chdir={workdir}", f"--output={add_out}",
                          str(workdir / "add-workers.sbatch"), str(cluster.scheduler_file)],
                         timeout=30, env=venv.env())
        add_id = proc.stdout.strip().split(";")[0]
        assert proc.returncode == 0 and add_id, proc.stderr
        connect = tmp_path / "connect.py"
        connect.write_text(ADD_CONNECT)
        client = run([venv.python, connect, cluster.scheduler_file, "5"], timeout=45,
                     env=venv.env())
        assert client.status == 0, f"{client}\n--- add job\n{_read(add_out)}"
        names = values(client.out)["names"].split(",")
        assert sorted(n for n in names if not n.startswith("join")) == ["1", "2", "3"], client
        assert sorted(names)[-2:] == [f"join{add_id}-0", f"join{add_id}-1"], client
        assert values(client.out)["sum"] == "9900", client
        assert cluster.wait_end()[:2] == ("COMPLETED", "0:0"), cluster.output
        deadline = time.monotonic() + 15
        info = {}
        while time.monotonic() < deadline:
            info = slurm.job_info(add_id)
            if info.get("JobState") not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
                break
            time.sleep(0.1)
        assert (info.get("JobState"), info.get("ExitCode")) == ("COMPLETED", "0:0"), (
            _read(add_out))
        assert "joined the cluster" in _read(add_out)
    finally:
        if add_id:
            slurm.run(["scancel", add_id], timeout=10)
        cluster.cleanup()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# ----------------------------------------------------------------------------- behaviour

RESOURCES = """\
from distributed import Client

client = Client()
for address, worker in sorted(client.scheduler_info()["workers"].items()):
    print(f"worker nthreads={worker['nthreads']} memory_limit={worker['memory_limit']}")
"""


def test_workers_get_the_jobs_cpus_and_memory(slurm, venv, workdir, tmp_path):
    """--cpus-per-task=2 --mem-per-cpu=1000: 2 threads and 2000 MiB (Slurm's MB) per worker."""
    (tmp_path / "client.py").write_text(RESOURCES)
    state, code, out = submit(slurm, venv, workdir / "srun-script.sbatch", "--ntasks=4",
                              "--cpus-per-task=2", "--mem-per-cpu=1000", chdir=tmp_path)
    assert_clean_success(state, code, out)
    workers = re.findall(r"^worker nthreads=(\d+) memory_limit=(\d+)$", out, re.MULTILINE)
    assert len(workers) == 2, out
    expected = 2 * 1000 * MIB
    for nthreads, memory_limit in workers:
        assert int(nthreads) == 2, out
        assert abs(int(memory_limit) - expected) <= 0.05 * expected, (
            f"memory_limit {memory_limit} bytes, expected ~{expected} (2 cpus x 1000 MiB)\n"
            f"{out}")


@pytest.mark.parametrize("template", ["srun-script.sbatch", "mpiexec-script.sbatch"])
def test_script_exit_status_is_the_jobs(slurm, venv, workdir, tmp_path, template):
    (tmp_path / "client.py").write_text("import sys\nprint('failing on purpose')\nsys.exit(3)\n")
    state, code, out = submit(slurm, venv, workdir / template, "--ntasks=4", chdir=tmp_path)
    assert (state, code) == ("FAILED", 3), out
    assert "failing on purpose" in out, out


def test_srun_without_pmi_stops_with_a_message(slurm, venv, workdir, tmp_path):
    """srun --mpi=none gives N one-rank worlds: a clear error, never N lone clusters."""
    script = tmp_path / "no-pmi.sbatch"
    script.write_text("#!/bin/bash\nsrun --mpi=none -n 3 dask-mpi-launch client.py\n")
    t0 = time.monotonic()
    state, code, out = submit(slurm, venv, script, "--ntasks=3", chdir=workdir, timeout=20)
    assert state == "FAILED" and code != 0, out
    assert "--mpi=pmi2" in out, out
    assert time.monotonic() - t0 < 20


def test_bootstrap_slurm_runs_without_mpi(slurm, venv, workdir, tmp_path):
    """--bootstrap slurm under plain srun (no PMI): roles from Slurm, files in a shared dir."""
    (tmp_path / "client.py").write_text(
        "import sys\nfrom distributed import Client\nc = Client()\n"
        "print('workers=%d' % len(c.scheduler_info()['workers']))\n"
        "print('result=%d' % c.submit(sum, [1, 2, 3]).result())\nsys.exit(4)\n")
    script = tmp_path / "bootstrap.sbatch"
    script.write_text("#!/bin/bash\nsrun --mpi=none dask-mpi-launch --bootstrap slurm "
                      f"--bootstrap-dir {tmp_path} client.py\n")
    state, code, out = submit(slurm, venv, script, "--ntasks=4", chdir=tmp_path)
    assert (state, code) == ("FAILED", 4), out
    assert "workers=2" in out and "result=6" in out, out
    assert not list(tmp_path.glob("dask-mpi-launch-*")), "exchange directory left behind"


def test_jupyter_template(slurm, venv, workdir, tmp_path):
    """jupyter.sbatch: the URL with its token in the job's output; shutting JupyterLab down
    through its API ends the job COMPLETED 0:0."""
    import re as _re
    import urllib.request

    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        unavailable("jupyterlab is not installed: pip install -e '.[jupyter]'")
    out_path = tmp_path / "jupyter.out"
    proc = slurm.run(["sbatch", "--parsable", f"--chdir={workdir}", f"--output={out_path}",
                      str(workdir / "jupyter.sbatch")], timeout=30,
                     env=venv.env({"LOGIN_HOST": "login.example"}))
    job_id = proc.stdout.strip().split(";")[0]
    assert proc.returncode == 0 and job_id, proc.stderr
    try:
        deadline = time.monotonic() + 60
        url = None
        while time.monotonic() < deadline and url is None:
            found = _re.search(r"JupyterLab at (http://\S+/lab\?token=(\S+))", _read(out_path))
            url = found and found.group(1)
            time.sleep(0.2)
        assert url, _read(out_path)
        token = url.split("token=")[1]
        base = url.split("/lab?")[0]
        assert "ssh -N -L" in _read(out_path) and "login.example" in _read(out_path)
        with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=10) as r:
            assert r.status == 200
        request = urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST")
        urllib.request.urlopen(request, timeout=10).close()
        info = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = slurm.job_info(job_id)
            if info.get("JobState") not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
                break
            time.sleep(0.2)
        assert (info.get("JobState"), info.get("ExitCode")) == ("COMPLETED", "0:0"), (
            _read(out_path))
    finally:
        slurm.run(["scancel", job_id], timeout=10)


ONE_IMPORT = """\
import os
from distributed import Client

client = Client()
job = os.environ["SLURM_JOB_ID"].encode()


def read(pid, name, mode="r"):
    with open(f"/proc/{pid}/{name}", mode) as f:
        return f.read()


found = []  # (name, pid, parent, imported distributed: its msgpack extension is mapped)
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        name = read(pid, "comm").strip()
        env = read(pid, "environ", "rb").split(b"\\0")
        if not name.startswith("dml-") or b"SLURM_JOB_ID=" + job not in env:
            continue
        parent = int(read(pid, "stat").rsplit(")", 1)[1].split()[1])
        found.append((name, int(pid), parent, "msgpack/_cmsgpack" in read(pid, "maps")))
    except OSError:
        continue
zygotes = [pid for name, pid, _, _ in found if name == "dml-zygote"]
print("zygotes=" + str(len(zygotes)))
print("ranks=" + str(sum(name == "dml-rank" for name, _, _, _ in found)))
print("ranks_with_distributed=" + str(sum(name == "dml-rank" and imported
                                          for name, _, _, imported in found)))
print("zygote_has_distributed=" + str(all(imported for name, _, _, imported in found
                                          if name == "dml-zygote")))
print("roles=" + str(sorted(name for name, _, _, _ in found
                            if name not in ("dml-rank", "dml-zygote"))))
print("roles_not_from_the_zygote=" + str(sum(
    parent not in zygotes for name, _, parent, _ in found
    if name not in ("dml-rank", "dml-zygote"))))
"""


def test_srun_template_imports_distributed_once_per_node(slurm, venv, workdir, tmp_path):
    """The node zygote under srun: of the job's processes on this (one) node, only the
    zygote imported distributed (its C extension msgpack is mapped: a rank that imported
    it would have it too), and every role process is its child."""
    (tmp_path / "client.py").write_text(ONE_IMPORT)
    state, code, out = submit(slurm, venv, workdir / "srun-script.sbatch", "--ntasks=4",
                              chdir=tmp_path)
    assert_clean_success(state, code, out)
    assert values(out) == {
        "zygotes": "1", "ranks": "4", "ranks_with_distributed": "0",
        "zygote_has_distributed": "True",
        "roles": str(["dml-scheduler", "dml-script", "dml-worker", "dml-worker"]),
        "roles_not_from_the_zygote": "0"}, out
