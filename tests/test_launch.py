"""The command line on real MPI (MPICH and Open MPI wheels): results, exit statuses,
failures that end every rank promptly with one message, and nothing left running."""
import json
import os
import signal
import socket
import sys
import time

import pytest

from launch import finish, wait_for_line, wait_no_leftovers

pytestmark = pytest.mark.mpi

HANG = 45  # generous hang guard; speed is measured in benchmarks/, not here

CLIENT = """
import os, sys, time
first = time.time()
from distributed import Client
client = Client()
workers = client.scheduler_info()["workers"]
names = sorted(str(w["name"]) for w in workers.values())
result = client.submit(lambda x: x + 1, 41).result()
print(f"workers={len(workers)} names={','.join(names)} result={result} argv={sys.argv[1:]} "
      f"env={os.environ['DASK_SCHEDULER_ADDRESS'] == client.scheduler.address}", flush=True)
"""


def one_error_line(outcome) -> str:
    lines = [line for line in outcome.output.splitlines() if "dask-mpi-launch: error" in line]
    assert len(lines) == 1, outcome
    return lines[0]


def test_script_runs_with_all_workers_and_args(venv, script):
    path = script(CLIENT)
    out = venv.launch(4, path, "a", "--b", timeout=HANG)
    assert out.status == 0, out
    assert "workers=2 names=2,3 result=42 argv=['a', '--b'] env=True" in out.out, out
    assert "Traceback" not in out.output and "CommClosedError" not in out.output, out


def test_normal_run_is_quiet(mpich, script):
    out = mpich.launch(3, script(CLIENT), timeout=HANG)
    assert out.status == 0, out
    assert out.err == "", out


@pytest.mark.parametrize("code", [0, 7])
def test_exit_status_is_the_scripts(venv, script, code):
    out = venv.launch(3, script(CLIENT + f"\nsys.exit({code})\n"), timeout=HANG)
    assert out.status == code, out


def test_uncaught_exception_gives_1_and_one_traceback(venv, script):
    out = venv.launch(3, script(CLIENT + "\nraise ValueError('boom from the script')\n"),
                      timeout=HANG)
    assert out.status == 1, out
    assert out.output.count("Traceback") == 1, out
    assert "ValueError: boom from the script" in out.err
    assert "runpy" not in out.err and "dask_mpi_launch" not in out.err, out
    assert "CommClosedError" not in out.output


def test_os_exit_status_is_kept(venv, script):
    out = venv.launch(3, script(CLIENT + "\nos._exit(3)\n"), timeout=HANG)
    assert out.status == 3, out
    assert "BAD TERMINATION" not in out.output


def test_script_killed_by_sigkill(venv, script):
    out = venv.launch(3, script(CLIENT + "\nimport signal; os.kill(os.getpid(), signal.SIGKILL)\n"),
                      timeout=HANG)
    assert out.status == 137, out
    line = one_error_line(out)
    assert "rank 1" in line and "killed by signal 9 (SIGKILL)" in line, out


def test_module_mode(mpich, tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "job.py").write_text(CLIENT + "\nprint('name', __name__)\n")
    out = mpich.launch(3, "-m", "mypkg.job", "x", timeout=HANG, cwd=tmp_path)
    assert out.status == 0, out
    assert "workers=1 names=2 result=42 argv=['x']" in out.out and "name __main__" in out.out, out


def test_python_dash_m_dask_mpi_launch(mpich, script):
    out = mpich.launch_python(3, "-m", "dask_mpi_launch", script(CLIENT), timeout=HANG)
    assert out.status == 0, out
    assert "workers=1" in out.out


def test_script_starts_only_when_every_worker_is_connected(mpich, script):
    out = mpich.launch(8, script(CLIENT), timeout=90)
    assert out.status == 0, out
    assert "workers=6 names=2,3,4,5,6,7 result=42" in out.out, out


def test_no_wait_for_workers(mpich, script):
    path = script(CLIENT.replace("workers = client", "client.wait_for_workers(1)\nworkers = client"))
    out = mpich.launch(3, "--no-wait-for-workers", path, timeout=HANG)
    assert out.status == 0, out
    assert "result=42" in out.out


def test_nanny_worker_class(mpich, script):
    out = mpich.launch(3, "--worker-class", "distributed.Nanny", script(CLIENT), timeout=60)
    assert out.status == 0, out
    assert "workers=1 names=2 result=42" in out.out, out
    assert " INFO " not in out.output, out  # the Nanny's worker process is quiet too


def test_worker_options_and_name_prefix(mpich, script):
    path = script(CLIENT + "\nprint('res', [w['resources'] for w in workers.values()])\n")
    out = mpich.launch(4, "--name", "job", "--nthreads", "2", "--worker-options",
                       '{"resources": {"GPU": 1}}', path, timeout=HANG)
    assert out.status == 0, out
    assert "names=job-2,job-3" in out.out and "res [{'GPU': 1}, {'GPU': 1}]" in out.out, out


# ---------------------------------------------------------------------------
# failures anywhere end every rank, promptly, with one message

def test_bad_worker_class_is_one_message(venv, script):
    out = venv.launch(4, "--worker-class", "nosuchmodule.Worker", script(CLIENT), timeout=HANG)
    assert out.status == 2, out
    line = one_error_line(out)
    assert "cannot use --worker-class 'nosuchmodule.Worker'" in line and "rank 2" in line
    assert "Traceback" not in out.output


def test_worker_failing_at_start(mpich, script):
    # the class imports, but the worker cannot start with these options
    out = mpich.launch(3, "--worker-options", '{"no_such_keyword": 1}', script(CLIENT),
                       timeout=HANG)
    assert out.status == 1, out
    line = one_error_line(out)
    assert "rank 2" in line and "no_such_keyword" in line, out


def test_worker_killed_mid_computation_ends_the_job_without_restarts(venv, script):
    path = script(CLIENT + """
import signal
pids = client.run(os.getpid)
futures = client.map(lambda x: time.sleep(0.05) or x, range(200))
time.sleep(0.5)
os.kill(min(pids.values()), signal.SIGKILL)
print(sum(client.gather(futures)))
time.sleep(60)
""")
    out = venv.launch(4, "--worker-restarts", "0", path, timeout=HANG)
    assert out.status != 0, out
    line = one_error_line(out)
    assert "killed by signal 9 (SIGKILL)" in line and "worker" in line, out
    assert out.seconds < 30, out


def test_worker_rank_killed_ends_the_job(mpich, script):
    path = script(CLIENT + """
import signal, psutil
pids = client.run(os.getpid)
rank_pid = psutil.Process(min(pids.values())).ppid()
os.kill(rank_pid, signal.SIGKILL)
time.sleep(60)
""")
    out = mpich.launch(4, path, timeout=HANG)
    assert out.status != 0, out
    assert out.seconds < 30, out


def test_scheduler_port_in_use(venv, script):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = venv.launch(3, "--scheduler-port", port, script(CLIENT), timeout=HANG)
    assert out.status == 1, out
    line = one_error_line(out)
    assert f"port {port}" in line and "already in use" in line and "rank 0" in line, out


def test_worker_never_connecting_is_a_bounded_error(mpich, script, tmp_path):
    (tmp_path / "slowworker.py").write_text(
        "import asyncio, distributed\n"
        "class SlowWorker(distributed.Worker):\n"
        "    async def start_unsafe(self):\n"
        "        await asyncio.sleep(60)\n"
    )
    out = mpich.launch(3, "--worker-class", "slowworker.SlowWorker", "--wait-timeout", "3",
                       script(CLIENT), timeout=HANG, env={"PYTHONPATH": str(tmp_path)})
    assert out.status == 1, out
    line = one_error_line(out)
    assert "did not connect" in line and "within 3 s" in line and "ranks 2" in line, out
    assert out.seconds < 30


def test_sigterm_runs_finally_blocks_and_ends_everything(venv, script, tmp_path):
    marker = tmp_path / "finally.txt"
    path = script(CLIENT + f"""
print("started", flush=True)
try:
    time.sleep(60)
finally:
    open({str(marker)!r}, "w").write("finally ran")
""")
    proc = venv.start([venv.mpiexec, "-n", "3", venv.bin / "dask-mpi-launch", path])
    line = wait_for_line(proc, "started", HANG)
    assert line, finish(proc, 5)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc, HANG)
    if venv.impl == "mpich":
        assert out.status == 143, out
    else:  # Open MPI's launcher reports 1 when it is signalled
        assert out.status != 0, out
    for _ in range(100):
        if marker.exists():
            break
        time.sleep(0.1)
    assert marker.read_text() == "finally ran"
    assert wait_no_leftovers(str(path)) == []


# ---------------------------------------------------------------------------
# bad input: one line, what is wrong and how to fix it, status 2

@pytest.mark.parametrize("n", [1, 2])
def test_world_too_small(venv, script, n):
    out = venv.launch(n, script(CLIENT), timeout=HANG)
    assert out.status == 2, out
    line = one_error_line(out)
    assert f"needs at least 3 ranks (got {n}): run with mpiexec -n 3 or more" in line, out


@pytest.mark.parametrize("args, expected", [
    (["missing.py"], "script not found: missing.py"),
    (["--memory-limit", "lots", "S"], "invalid --memory-limit 'lots'"),
    (["--worker-options", "{bad", "S"], "invalid --worker-options JSON"),
    (["--worker-options", "[1]", "S"], "give a JSON object"),
    (["--interface", "nosuch0", "S"], "no network interface named 'nosuch0'"),
    (["--scheduler-file", "/nonexistent/dir/s.json"], "directory /nonexistent/dir does not exist"),
    (["--nthreads", "zero", "S"], "invalid --nthreads 'zero'"),
    (["--wait-timeout", "soon", "S"], "invalid --wait-timeout 'soon'"),
])
def test_bad_input_is_one_clear_line(mpich, script, args, expected):
    path = script(CLIENT)
    args = [str(path) if a == "S" else a for a in args]
    out = mpich.launch(3, *args, timeout=HANG)
    assert out.status == 2, out
    line = one_error_line(out)
    assert expected in line, out
    assert "Traceback" not in out.output


def test_syntax_error_in_script(venv, script):
    out = venv.launch(3, script("x = (\n", name="broken.py"), timeout=HANG)
    assert out.status == 2, out
    line = one_error_line(out)
    assert "syntax error in the script" in line and "broken.py, line 1" in line, out


def test_unknown_interface_lists_the_existing_ones(mpich, script):
    out = mpich.launch(3, "--interface", "ib9", script(CLIENT), timeout=HANG)
    line = one_error_line(out)
    assert "this host has" in line and "lo" in line.split("this host has")[1], out


def test_unknown_option_is_reported_once(mpich, script):
    out = mpich.launch(3, "--no-such-option", script(CLIENT), timeout=HANG)
    assert out.status == 2, out
    assert out.output.count("No such option") == 1, out


def test_missing_mpi_library_says_what_to_install(mpich, script):
    from launch import run

    out = run([mpich.bin / "dask-mpi-launch", "--layout", "full", script(CLIENT)], timeout=HANG,
              env=mpich.env({"MPI4PY_LIBMPI": "/nonexistent/libmpi.so.12"}))
    assert out.status == 1, out
    line = one_error_line(out)
    assert "cannot load an MPI library" in line and "pip install mpich" in line, out


# ---------------------------------------------------------------------------
# cluster only, with a scheduler file

def _wait_for_file(path, proc, timeout=HANG):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_cluster_only_until_client_shutdown(venv, tmp_path):
    sched = tmp_path / "scheduler.json"
    sched.write_text('{"address": "tcp://127.0.0.1:1"}')  # a stale file from an earlier job
    proc = venv.start([venv.mpiexec, "-n", "4", venv.bin / "dask-mpi-launch",
                       "--scheduler-file", sched])
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline and proc.poll() is None:  # the stale file goes first
        if not sched.exists() or "tcp://127.0.0.1:1" not in sched.read_text():
            break
        time.sleep(0.05)
    assert _wait_for_file(sched, proc), finish(proc, 5)
    address = json.loads(sched.read_text())["address"]
    assert address != "tcp://127.0.0.1:1"
    from launch import run

    client = (
        "import sys; from dask_mpi_launch import connect\n"
        "c = connect(sys.argv[1], timeout=20)\n"
        "print('workers', len(c.scheduler_info()['workers']), c.submit(sum, [1, 2]).result())\n"
        "c.shutdown()\n"
    )
    out = run([venv.python, "-c", client, sched], timeout=HANG, env=venv.env())
    assert "workers 3 3" in out.out, out
    job = finish(proc, HANG)
    assert job.status == 0, job
    assert "cluster ready" in job.out and "3 workers" in job.out, job
    assert not sched.exists()


@pytest.mark.parametrize("signum, statuses", [
    (signal.SIGTERM, (0, 143)),  # Hydra may answer 143 itself before the ranks end
    (signal.SIGINT, (0,)),
])
def test_cluster_only_ends_with_0_on_a_signal(mpich, tmp_path, signum, statuses):
    sched = tmp_path / "s.json"
    proc = mpich.start([mpich.mpiexec, "-n", "3", mpich.bin / "dask-mpi-launch",
                        "--scheduler-file", sched])
    assert _wait_for_file(sched, proc), finish(proc, 5)
    proc.send_signal(signum)
    job = finish(proc, HANG)
    assert job.status in statuses, job
    assert "Traceback" not in job.output
    assert wait_no_leftovers(str(sched)) == []
    deadline = time.monotonic() + 10
    while sched.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not sched.exists()


@pytest.mark.skipif(sys.platform != "linux", reason="Linux process table")
def test_nothing_left_running_after_a_failure(mpich, script):
    path = script(CLIENT + "\nraise SystemExit(5)\n", name="leftover_check.py")
    out = mpich.launch(4, path, timeout=HANG)
    assert out.status == 5, out
    assert wait_no_leftovers("leftover_check.py") == []


def test_demo_example(mpich):
    from launch import ROOT

    out = mpich.launch(4, ROOT / "examples" / "array_sum.py", "400", timeout=60)
    assert out.status == 0, out
    assert "with 2 workers" in out.out and "= 320000 (expected 320000)" in out.out, out


def test_defaults_from_a_dask_config_yaml_file(mpich, script, tmp_path):
    config = tmp_path / "config"
    config.mkdir()
    (config / "site.yaml").write_text("mpi-launch:\n  name: fromyaml\n  nthreads: 3\n")
    path = script(CLIENT + "\nprint('threads', sorted(w['nthreads'] for w in workers.values()))\n")
    out = mpich.launch(4, path, timeout=HANG, env={"DASK_CONFIG": str(config)})
    assert out.status == 0, out
    assert "names=fromyaml-2,fromyaml-3" in out.out and "threads [3, 3]" in out.out, out
