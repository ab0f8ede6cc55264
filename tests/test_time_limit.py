"""Time limits: the allocation's end found (Slurm, Grid Engine, PBS, LSF, --time-limit), the
script warned, the job ended before the batch system has to kill it (README "Time limits").

In-process: the parsers on real outputs of the batch commands, the grace formula, the
banner's line, bad input. Live: one Slurm batch of concurrent ``-t 1`` jobs (srun and
mpiexec, MPICH and Open MPI, a join job retiring its workers) so the minute is paid once;
PBS and LSF jobs emulated by a ``qstat``/``bjobs`` on PATH, run beside the Slurm batch (the batch
system is emulated, not our code).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from launch import Venv, wait_no_leftovers  # noqa: E402

from dask_mpi_launch.base.banner import end_line, render  # noqa: E402
from dask_mpi_launch.base.errors import UsageError  # noqa: E402
from dask_mpi_launch.hpc import time_limit as tl  # noqa: E402

# ----------------------------------------------------------------------------- real outputs

# Slurm 22.05.8 (this machine's test cluster), a job submitted with -t 1
SQUEUE_E = "2026-12-04T16:08:57\n"
SCONTROL = """\
JobId=25409921 JobName=dml-2-dcd4f6
   UserId=root(0) GroupId=root(0) MCS_label=N/A
   JobState=RUNNING Reason=None Dependency=(null)
   RunTime=00:00:00 TimeLimit=00:01:00 TimeMin=N/A
   SubmitTime=2026-12-04T16:07:56 EligibleTime=2026-12-04T16:07:56
   StartTime=2026-12-04T16:07:57 EndTime=2026-12-04T16:08:57 Deadline=N/A
   Partition=debug AllocNode:Sid=localhost:29093
"""
SCONTROL_UNLIMITED = "JobId=7 JobName=x\n   StartTime=2026-12-04T16:07:57 EndTime=Unknown\n"

# Grid Engine 8.1.9 (this machine's test cell), a job submitted with -l h_rt=0:0:40,s_rt=0:0:30:
# qstat -j says the limits, not the start; plain qstat says the start
QSTAT_J = """\
==============================================================
job_number:                 26
exec_file:                  job_scripts/26
submission_time:            Fri Dec  4 16:18:44 2026
owner:                      root
cwd:                        /tmp/tl
merge:                      y
hard resource_list:         h_rt=40,s_rt=30
mail_list:                  root@vm
notify:                     FALSE
job_name:                   dml2-8386dc
script_file:                /tmp/tl/sgejob.sh
usage         1:            cpu=00:00:00, mem=0.00000 GB s, io=0.00000 GB, vmem=N/A, maxvmem=N/A
scheduling info:            There are no messages available
"""
QSTAT = """\
job-ID  prior   name       user         state submit/start at     queue                          slots ja-task-ID 
-----------------------------------------------------------------------------------------------------------------
     26 0.50000 dml2-7a9dc root         r     12/04/2026 16:18:44 all.q@vm                           1        
"""

# PBS Pro / OpenPBS qstat -f (fields as the PBS reference guide prints them)
QSTAT_F = """\
Job Id: 1234.pbs-server
    Job_Name = dask
    job_state = R
    resources_used.walltime = 00:10:30
    Resource_List.ncpus = 4
    Resource_List.walltime = 01:00:00
    stime = Fri Dec  4 16:00:00 2026
"""

# LSF 10.1 bjobs -noheader -o time_left (H:MM, L: the run limit)
BJOBS_TIME_LEFT = "1:23 L\n"


# ----------------------------------------------------------------------------- units


@pytest.mark.parametrize("text, seconds", [
    ("1", 60), ("90", 5400), ("05:30", 330), ("1:00:00", 3600), ("2-00:00:00", 172800),
    ("1-12", 129600), ("1-0:30", 88200), ("90s", 90), ("2h", 7200), (30, 1800)])
def test_durations_as_slurm_writes_them(text, seconds):
    assert tl.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "1:2:3:4", "0", "-5", "1-", "12:xx"])
def test_a_bad_time_limit_is_one_line(text):
    from dask_mpi_launch.configure.settings import resolve

    with pytest.raises(UsageError) as e:
        resolve(time_limit=text)
    assert "\n" not in e.value.message and "--time-limit" in e.value.message


def test_the_batch_systems_answers():
    local = time.mktime((2026, 12, 4, 16, 8, 57, 0, 0, -1))
    assert tl.slurm_squeue_end(SQUEUE_E) == local
    assert tl.slurm_scontrol_end(SCONTROL) == local
    assert tl.slurm_scontrol_end(SCONTROL_UNLIMITED) is None
    assert tl.slurm_squeue_end("Unknown\n") is None and tl.slurm_squeue_end("") is None
    assert tl.sge_limit(QSTAT_J) == 40
    assert tl.sge_limit("hard resource_list:         s_rt=0:4:0\n") == 240
    assert tl.sge_limit("hard resource_list:         h_vmem=2G\n") is None
    assert tl.sge_start(QSTAT_J) is None
    started = time.mktime((2026, 12, 4, 16, 18, 44, 0, 0, -1))
    assert tl.sge_list_start(QSTAT, "26") == started and tl.sge_list_start(QSTAT, "2") is None
    assert tl.sge_start("start_time            1:    12/04/2026 16:20:02.104\n") == (
        time.mktime((2026, 12, 4, 16, 20, 2, 0, 0, -1)) + 0.104)  # newer Grid Engines
    assert tl.pbs_time_left(QSTAT_F) == 3600 - 630
    assert tl.lsf_time_left(BJOBS_TIME_LEFT) == 83 * 60
    assert tl.lsf_time_left("-\n") is None


def test_rank_zero_asks_one_batch_system():
    asked = []

    def run(argv):
        asked.append(argv[0])
        return {"squeue": SQUEUE_E, "qstat": QSTAT_F, "bjobs": BJOBS_TIME_LEFT}[argv[0]]

    assert tl.discover({"SLURM_JOB_ID": "25409921"}, run)[1] == "Slurm"
    assert tl.discover({"PBS_JOBID": "1234.pbs"}, run, now=1000.0) == (1000.0 + 2970, "PBS")
    assert tl.discover({"LSB_JOBID": "5"}, run, now=0.0) == (83 * 60.0, "LSF")
    assert asked == ["squeue", "qstat", "bjobs"]
    sge = tl.discover({"JOB_ID": "26", "SGE_ROOT": "/x"},
                      lambda argv: QSTAT_J if argv[1:] else QSTAT)
    assert sge == (tl.sge_list_start(QSTAT, "26") + 40, "Grid Engine")
    assert tl.discover({}, run) == (None, "")
    # squeue silent (a slurmctld that does not answer): scontrol, else no limit
    assert tl.discover({"SLURM_JOB_ID": "1"}, lambda a: SCONTROL if a[0] == "scontrol"
                       else None)[1] == "Slurm"
    assert tl.discover({"SLURM_JOB_ID": "1"}, lambda a: None) == (None, "")


def test_grace_scales_with_the_workers_and_fits_short_jobs():
    assert tl.grace_for(2, 10.0, 86400) == (60.0, 25.04)
    grace, teardown = tl.grace_for(1000, 10.0, 86400)  # 20 + 5 + 20 s teardown, + 30 + 50 s
    assert (round(grace), round(teardown)) == (125, 45)
    assert tl.grace_for(2, 10.0, 60) == (15.0, 7.5)  # sbatch -t 1: a quarter, half of it
    assert tl.grace_for(2, 10.0, 60, grace=30.0) == (30.0, 15.0)  # --time-grace


def test_time_left_reads_the_environment():
    assert tl.time_left({}) is None
    assert tl.time_left({tl.END_VARIABLE: "1000.5"}, now=1000.0) == 0.5
    import dask_mpi_launch

    assert dask_mpi_launch.time_left is tl.time_left
    assert issubclass(dask_mpi_launch.TimeLimitReached, BaseException)
    assert not issubclass(dask_mpi_launch.TimeLimitReached, Exception)


def test_the_banner_says_when_the_job_ends():
    now = time.mktime((2026, 12, 4, 2, 5, 7, 0, 0, -1))
    assert end_line(now + 11 * 3600 + 58 * 60 + 3, now, "Slurm") == (
        "ends       14:03:10, in 11:58:03 (Slurm)")
    assert end_line(now + 86400, now).startswith("ends       2026-12-05 02:05:07, in 24:00:00")
    text = render({"address": "tls://h:1", "workers": 2, "end": now + 60, "now": now})
    assert "  ends       02:06:07, in 0:01:00" in text.splitlines()


# ----------------------------------------------------------------------------- live jobs

FOREVER = """\
import os, sys, time
import dask_mpi_launch
from distributed import Client

client = Client()
left1 = dask_mpi_launch.time_left()
time.sleep(1.5)
print(f"left1={left1:.1f}", flush=True)
print(f"left2={dask_mpi_launch.time_left():.1f}", flush=True)
print(f"worker_left={client.submit(dask_mpi_launch.time_left, pure=False).result():.1f}",
      flush=True)
try:
    try:
        while True:  # computes forever
            client.submit(sum, range(10000), pure=False).result()
            time.sleep(0.2)
    except dask_mpi_launch.TimeLimitReached:
        print(f"warned={dask_mpi_launch.time_left():.1f}", flush=True)
        while True:  # and ignores the warning: the job must stop it
            client.submit(sum, range(10000), pure=False).result()
            time.sleep(0.2)
finally:
    print("finally=1", flush=True)
"""


def values(out: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+)=(.*)$", out, re.MULTILINE))


def assert_ended_itself(name, state, code, out, token):
    v = values(out)
    assert state != "TIMEOUT" and code == 124, f"{name}: {state} {code}\n{out}"
    assert float(v["left2"]) < float(v["left1"]) <= 60, out  # time_left() counts down
    assert 0 < float(v["worker_left"]) <= 60, out
    assert 0 < float(v["warned"]) < 60 and v["finally"] == "1", out
    assert re.search(r"dask-mpi-launch: time limit: the allocation ends at [\d:]+ \(Slurm\); "
                     r"stopped \d+ s before it: the script, the scheduler and 1 worker "
                     r"\(status 124\)", out), out
    assert "Traceback" not in out, out
    assert wait_no_leftovers(token, timeout=10, environment=True) == [], name


JOIN_CLIENT = """\
import sys, time
from distributed import Client

client = Client()
client.wait_for_workers(3, timeout=60)
joined = [a for a, w in client.scheduler_info()["workers"].items()
          if str(w["name"]).startswith("join")]
data = client.scatter(list(range(1000)), workers=joined)  # no lineage: lost data is an error
print(f"joined={len(joined)}", flush=True)
deadline = time.monotonic() + 100
while any(str(w["name"]).startswith("join")
          for w in client.scheduler_info()["workers"].values()):
    assert time.monotonic() < deadline, "the join job's workers did not retire"
    time.sleep(0.2)
print(f"sum={sum(client.gather(data))}", flush=True)
"""


def _work_dir(tmp_path):
    """The jobs' directory: the templates, the scripts; and the main job's scheduler file."""
    examples = Path(__file__).resolve().parent.parent / "slurm-examples"
    work = tmp_path / "work"
    work.mkdir()
    for name in ("srun-script.sbatch", "mpiexec-script.sbatch", "add-workers.sbatch",
                 "cluster-only.sbatch"):
        shutil.copy2(examples / name, work / name)
    # the join job without Slurm's signal (it may come at once): its end found by squeue
    add = work / "add-workers.sbatch"
    add.write_text(add.read_text().replace("#SBATCH --signal=B:USR1@120\n", ""))
    (work / "client.py").write_text(FOREVER)
    (work / "join_client.py").write_text(JOIN_CLIENT)
    (work / "openmpi.sbatch").write_text(
        "#!/bin/bash\nmpiexec --bind-to none -n \"$SLURM_NTASKS\" dask-mpi-launch client.py\n")
    scheduler_file = tmp_path / "main.json"
    (work / "main.sbatch").write_text(
        "#!/bin/bash\nexport SRUN_CPUS_PER_TASK=1\nsrun --mpi=pmi2 dask-mpi-launch "
        f"--scheduler-file {scheduler_file} join_client.py\n")
    return work, scheduler_file


def _check_results(results, tokens, client, tmp_path):
    _check_slurm_jobs(results, tokens)
    _check_other_jobs(results, client, tmp_path)


def _check_slurm_jobs(results, tokens):
    """The -t 1 jobs ended themselves; the main job's result is exact."""
    for name in ("srun-mpich", "mpiexec-mpich", "mpiexec-openmpi"):
        _, state, code, out = results[name]
        print(f"{name}: {state} {code}\n" + "\n".join(
            line for line in out.splitlines() if "=" in line or "time limit" in line))
        assert_ended_itself(name, state, code, out, tokens[name])
    _, state, code, out = results["main"]
    assert (state, code) == ("COMPLETED", 0) and values(out) == {
        "joined": "2", "sum": str(sum(range(1000)))}, out


def _check_other_jobs(results, client, tmp_path):
    """PBS and LSF emulated, the cluster-only job and its client, the join job."""
    for system in ("PBS", "LSF"):
        outcome, token = results[system]
        v = values(outcome.out)
        assert outcome.status == 124, outcome
        assert float(v["left2"]) < float(v["left1"]) and v["finally"] == "1", outcome
        assert f"({system}); stopped" in outcome.err and "Traceback" not in outcome.err, outcome
        assert wait_no_leftovers(token, timeout=10, environment=True) == [], system
    _, state, code, out = results["cluster"]
    assert state != "TIMEOUT" and code == 124, f"cluster: {state} {code}\n{out}"
    assert "the scheduler and 1 worker (status 124)" in out, out
    assert client is not None and client.status == 0 and "closed=" in client.out, client
    assert not list(tmp_path.glob("scheduler-*.json")), "the scheduler file was left"
    _, state, code, out = results["join"]
    assert state != "TIMEOUT" and code == 124, f"join: {state} {code}\n{out}"
    assert "Traceback" not in out, out


@pytest.mark.slurm
@pytest.mark.mpi
def test_slurm_jobs_end_before_their_time_limit(slurm, mpich, tmp_path):
    """-t 1 jobs under srun (MPICH, Slurm's USR1 forwarded by the template) and mpiexec
    (MPICH, Open MPI), a cluster-only job with a client, a join job that retires its workers
    from a main job whose result stays exact, and PBS and LSF jobs emulated beside them: all
    at once, the minute paid once."""
    work, scheduler_file = _work_dir(tmp_path)
    openmpi = Venv("openmpi")
    jobs = {  # name: (venv, script, sbatch options)
        "srun-mpich": (mpich, "srun-script.sbatch", ["-t", "1", "--signal=B:USR1@25"]),
        "mpiexec-mpich": (mpich, "mpiexec-script.sbatch", ["-t", "1", "--signal=B:USR1@25"]),
        "mpiexec-openmpi": (openmpi, "openmpi.sbatch", ["-t", "1"]),
        "main": (mpich, "main.sbatch", ["-t", "5"]),
        "cluster": (mpich, "cluster-only.sbatch", ["-t", "1", "--ntasks=2"]),
    }
    results, tokens = {}, {}

    def submit(name, venv, script, options, args=()):
        tokens[name] = token = f"dml-tl-{uuid.uuid4().hex}"
        try:
            results[name] = slurm.sbatch(work / script, f"--chdir={work}", "--ntasks=3",
                                         *options, script_args=args, timeout=150,
                                         env=venv.env({"DML_TL_TOKEN": token,
                                                       "DASK_SCHEDULER_DIR": str(tmp_path)}))
        except Exception as e:  # said by the assertion below
            results[name] = (None, repr(e), None, "")

    threads = [threading.Thread(target=submit, args=(name, *job)) for name, job in jobs.items()]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not scheduler_file.exists() and time.monotonic() < deadline and threads[3].is_alive():
        time.sleep(0.2)
    join = threading.Thread(target=submit, args=(
        "join", mpich, "add-workers.sbatch", ["-t", "1", "--ntasks=2"],
        (str(scheduler_file),)))
    join.start()
    emulated = [threading.Thread(target=_emulated, args=(system, venv, tmp_path, results))
                for system, venv in (("PBS", openmpi), ("LSF", mpich))]
    for t in emulated:
        t.start()
    client = _connected_client(mpich, tmp_path, threads[4])
    for t in [*threads, join, *emulated]:
        t.join()
    _check_results(results, tokens, client, tmp_path)


@pytest.mark.sge
@pytest.mark.mpi
def test_grid_engine_job_ends_before_h_rt(sge, tmp_path):
    """sge-examples/mpiexec-script.sge with h_rt=40,s_rt=30: the end from qstat, the warning
    (s_rt's SIGUSR1 or ours, whichever first), status 124, nothing left running."""
    from conftest import unavailable
    from sge_cluster import SGEError

    venv = Venv("mpich")
    if not venv.exists():
        unavailable("no mpich venv: run ./bin/test (it creates it)")
    work = tmp_path / "sge"
    shutil.copytree(Path(__file__).resolve().parent.parent / "sge-examples", work)
    (work / "client.py").write_text(FOREVER)
    token = f"dml-tl-{uuid.uuid4().hex}"
    try:
        status, out = sge.qsub(work / "mpiexec-script.sge", "-pe", "mpi", "3", "-l",
                               "h_rt=40,s_rt=30", cwd=work, timeout=150,
                               env=venv.env({"DML_TL_TOKEN": token}))
    except SGEError as e:
        pytest.fail(str(e))
    print(out)
    v = values(out)
    assert status == 124, out
    assert float(v["left2"]) < float(v["left1"]) <= 40 and v["finally"] == "1", out
    assert 0 < float(v["warned"]) <= 15, out
    assert "dask-mpi-launch: time limit: the allocation ends at" in out, out
    assert "(Grid Engine)" in out and "Traceback" not in out, out
    assert wait_no_leftovers(token, timeout=10, environment=True) == []


CLUSTER_CLIENT = """\
import sys, time
from dask_mpi_launch import connect

client = connect(sys.argv[1], timeout=30)
t0 = time.monotonic()
try:
    client.submit(time.sleep, 300).result()
except BaseException as e:  # FutureCancelledError: the scheduler's connection lost
    print(f"closed={type(e).__name__} after={time.monotonic() - t0:.1f}", flush=True)
"""


def _connected_client(venv, directory, job):
    """A client of the cluster-only job, waiting on a long task when the job ends."""
    from launch import run

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and job.is_alive():
        files = list(directory.glob("scheduler-*.json"))
        if files:
            (directory / "cluster_client.py").write_text(CLUSTER_CLIENT)
            return run([venv.python, directory / "cluster_client.py", files[0]], timeout=120,
                       env=venv.env())
        time.sleep(0.2)
    return None


# what the batch commands answer inside a job (the batch system emulated, not our code)
FAKE = {"PBS": ("qstat", "Job Id: 77.pbs\n    Resource_List.walltime = 00:00:50\n"
                         "    resources_used.walltime = 00:00:02\n", "PBS_JOBID", "77.pbs"),
        "LSF": ("bjobs", "0:01 L\n", "LSB_JOBID", "78")}


def _emulated(system, venv, directory, results):
    """A 3-rank job under an emulated PBS or LSF: its end from qstat -f / bjobs on PATH."""
    command, answer, variable, job = FAKE[system]
    bin_dir = directory / f"fake-{system}"
    bin_dir.mkdir()
    (bin_dir / command).write_text(f"#!/bin/sh\ncat <<'EOF'\n{answer}EOF\n")
    (bin_dir / command).chmod(0o755)
    (directory / f"{system}.py").write_text(FOREVER)
    token = f"dml-tl-{uuid.uuid4().hex}"
    env = {variable: job, "SLURM_JOB_ID": "", "DML_TL_TOKEN": token,
           "PATH": f"{venv.bin}:{bin_dir}:{os.environ.get('PATH', '')}"}
    results[system] = (venv.launch(3, directory / f"{system}.py", timeout=120, env=env), token)
