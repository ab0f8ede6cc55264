"""dask-mpi-launch on a live Slurm cluster of three nodes (tests/slurm_cluster.py SlurmNodes:
slurmctld on a login host, one slurmd per network-namespace node n1..n3, ib0 the fabric,
eth0 a management net that reaches nothing but holds the default route).

Jobs are submitted from the login host as a user would (sbatch exports the submitter's
environment: the venv's PATH, DASK_MPI_LAUNCH__INTERFACE=ib0 as the templates advise) and
run concurrently where they can, to keep the wall time low. Each job must end with the
status of its script, the exact result, its ranks on the nodes Slurm gave it (the banner's
hosts are the nodes' hostnames), and nothing of it left on any node.

Under Open MPI only the mpiexec template runs: the Open MPI wheel under srun works with
``--mpi=pmix`` and 2 tasks only (shared/ANCHORS.md). Open MPI's mpiexec inside a
multi-node allocation needs ``OMPI_MCA_btl_tcp_if_include=ib0`` and
``PRTE_MCA_oob_tcp_if_include=ib0`` (else it connects over eth0: "No route to host", the
job aborts), and the tests' usual ``PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe``
must go: with it PRRTE puts every rank on the first node.

Wall time on 2 shared cores (load 12-15 from other sessions): ~130 s for the file, of which
cluster start 4 s, the 6 MPICH jobs together 45 s, Open MPI 15 s, join 12 s, wrong interface
11 s, node lost 41 s. Skipped where namespaces or Slurm are unavailable (not root...),
except under CI=true.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import unavailable  # noqa: E402
from launch import Venv  # noqa: E402
from slurm_cluster import SlurmError, SlurmNodes, ensure_slurm_installed  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.mpi, pytest.mark.netns]

EXAMPLES = Path(__file__).resolve().parent.parent / "slurm-examples"
NODES = ["n1", "n2", "n3"]
SPREAD = ["--nodes=3", "--ntasks=6", "--ntasks-per-node=2"]
JOB_TIMEOUT = 120  # hang guard per job; several jobs share 2 cores
ONES = 2000 * 2000


@pytest.fixture(scope="module")
def cluster():
    reason = ensure_slurm_installed()
    if reason:
        unavailable(reason)
    nodes = SlurmNodes(nodes=3)
    try:
        nodes.start()
    except SlurmError as e:
        nodes.stop()
        unavailable(f"multi-node Slurm could not be started: {e}")
    try:
        print(f"\n[multinode] 3 nodes up in {nodes.start_seconds:.2f} s")
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("multinode")
    for f in EXAMPLES.iterdir():
        if f.is_file():
            shutil.copy2(f, path / f.name)
    return path


def job_env(venv: Venv, extra: dict | None = None) -> dict:
    """The submitter's environment: the venv first in PATH, ib0 for Dask and Open MPI."""
    env = venv.env({"DASK_MPI_LAUNCH__INTERFACE": "ib0", **(extra or {})})
    if venv.impl == "openmpi":
        env.pop("PRTE_MCA_rmaps_default_mapping_policy", None)  # all ranks on n1 with it
        env.update(OMPI_MCA_btl_tcp_if_include="ib0", PRTE_MCA_oob_tcp_if_include="ib0",
                   PRTE_MCA_hwloc_default_binding_policy="none")
    return env


def run_jobs(cluster, venv, jobs: dict, chdir: Path) -> dict:
    """Submit every job at once, wait for all: {name: (state, exit code, output)}.
    ``jobs``: {name: (script, [sbatch options], [script args], extra env)}."""
    ids = {}
    for name, (script, options, args, extra) in jobs.items():
        ids[name] = cluster.submit(script, f"--chdir={chdir}", *options,
                                   script_args=tuple(map(str, args)),
                                   env=job_env(venv, extra))
    t0 = time.monotonic()
    results = {}
    for name, (job_id, out_path) in ids.items():
        state, code = cluster.wait(job_id, timeout=JOB_TIMEOUT, out_path=out_path)
        results[name] = (state, code, cluster._read(out_path))
    print(f"\n[multinode] {venv.impl}: {len(jobs)} jobs together in "
          f"{time.monotonic() - t0:.1f} s")
    return results


def values(out: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+)=(.*)$", out, re.MULTILINE))


def banner_hosts(out: str) -> set[str]:
    """Host names on the banner's ranks line ("0 n1 scheduler; 1 n1 client; 2-3 n2 ...")."""
    [line] = [ln for ln in out.splitlines() if ln.strip().startswith("ranks ")]
    return set(re.findall(r"(?:^|;)\s*(?:ranks\s+)?[\d-]+ (\S+) ", line.strip()))


def nothing_left(cluster, timeout: float = 10) -> dict:
    """{node: [pids]} still on a node besides its slurmd (waits up to ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        left = {n: [p for p in cluster.node_pids(n) if p != cluster.slurmd_pid(n)]
                for n in NODES}
        left = {n: pids for n, pids in left.items() if pids}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


PLACES = textwrap.dedent("""
    import json, os, socket, sys
    import dask.array as da
    from distributed import Client

    def where():
        ppid = os.getppid()
        with open(f"/proc/{ppid}/comm") as f:
            return socket.gethostname(), ppid, f.read().strip()

    client = Client()
    x = da.random.RandomState(0).randint(0, 1000, (1200, 1200), chunks=(100, 1200))
    y = x.rechunk((1200, 100))  # all-to-all between the workers
    exact = bool((y.sum(axis=0).compute() == x.sum(axis=0).compute()).all())
    print("PLACES " + json.dumps({"where": client.run(where), "exact": exact,
                                  "result": int(da.ones((2000, 2000)).sum().compute())}))
    sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
""")


RESOURCES = textwrap.dedent("""
    import socket
    from distributed import Client
    client = Client()
    for address, worker in sorted(client.scheduler_info()["workers"].items()):
        print(f"worker {worker['host']} nthreads={worker['nthreads']} "
              f"memory_limit={worker['memory_limit']}")
""")


def places(out: str) -> dict:
    [line] = [ln for ln in out.splitlines() if ln.startswith("PLACES ")]
    return json.loads(line[len("PLACES "):])


def check_spread(job: dict, workers: int, zygote: bool = True) -> None:
    """Workers on n2 and n3 (n1 holds scheduler and client), one zygote per node (none
    with --protocol mpi: there each worker holds MPI, so it runs in its rank's process)."""
    hosts = [h for h, _, _ in job["where"].values()]
    assert len(hosts) == workers and set(hosts) == {"n2", "n3"}, job
    if not zygote:
        return
    parents = {}
    for host, ppid, comm in job["where"].values():
        assert comm == "dml-zygote", job
        parents.setdefault(host, set()).add(ppid)
    assert all(len(p) == 1 for p in parents.values()), job  # one zygote per node
    assert parents["n2"] != parents["n3"], job


def template_jobs(venv, workdir) -> dict:
    """The jobs to run at -N 3 (see :func:`run_jobs`): the srun and mpiexec templates with a
    client that says where its workers run and exits with a given status, the same over
    --protocol mpi, futures, initialize, and --bootstrap slurm under plain srun."""
    (workdir / "places.py").write_text(PLACES)
    for name in ("srun-script", "mpiexec-script"):
        text = (workdir / f"{name}.sbatch").read_text()
        (workdir / f"{name}-places.sbatch").write_text(text.replace("client.py", "places.py"))
    jobs = {"mpiexec-places": (workdir / "mpiexec-script-places.sbatch", SPREAD, [5], None)}
    if venv.impl != "mpich":
        return jobs  # Open MPI's wheel under srun: --mpi=pmix and 2 tasks only
    (workdir / "bootstrap.sbatch").write_text(
        "#!/bin/bash\nsrun --mpi=none dask-mpi-launch --bootstrap slurm "
        f"--bootstrap-dir {workdir} client.py\n")
    places = workdir / "srun-script-places.sbatch"
    (workdir / "resources.py").write_text(RESOURCES)
    (workdir / "srun-script-resources.sbatch").write_text(
        (workdir / "srun-script.sbatch").read_text().replace("client.py", "resources.py"))
    jobs.update({
        "resources": (workdir / "srun-script-resources.sbatch",
                      [*SPREAD, "--cpus-per-task=2", "--mem-per-cpu=1000"], [], None),
        "places": (places, SPREAD, [3], None),
        "protocol-mpi": (places, SPREAD, [], {"DASK_MPI_LAUNCH__PROTOCOL": "mpi"}),
        "futures": (workdir / "futures.sbatch", SPREAD, [20], None),
        "initialize": (workdir / "initialize.sbatch", SPREAD, [], None),
        "bootstrap": (workdir / "bootstrap.sbatch", SPREAD, [], None),
    })
    return jobs


def check_client_py(results: dict) -> None:
    """Jobs running slurm-examples/client.py: the exact sum, 4 workers, no traceback."""
    for name in ("bootstrap", "initialize"):
        if name in results:
            state, code, out = results[name]
            assert (state, code) == ("COMPLETED", 0), f"{name}\n{out}"
            assert values(out) == {"result": str(ONES), "workers": "4"}, f"{name}\n{out}"
            assert "Traceback" not in out, f"{name}\n{out}"


def check_places(results: dict) -> None:
    """Jobs running places.py: the script's status, exact results, the banner's hosts,
    workers on n2 and n3 (one zygote per node), mpi:// addresses on ib0 with --protocol mpi."""
    for name, status in (("places", 3), ("mpiexec-places", 5), ("protocol-mpi", 0)):
        if name in results:
            state, code, out = results[name]
            assert code == status, f"{name}\n{out}"
            assert banner_hosts(out) == set(NODES), f"{name}\n{out}"
            job = places(out)
            assert job["exact"] and job["result"] == ONES, f"{name}\n{out}"
            check_spread(job, workers=4, zygote=name != "protocol-mpi")
    if "protocol-mpi" in results:
        out = results["protocol-mpi"][2]
        assert all(a.startswith("mpi://10.213.17.") for a in places(out)["where"]), out


def test_templates_on_three_nodes(cluster, venv, workdir):
    """The templates at -N 3 (2 tasks per node), all submitted together."""
    results = run_jobs(cluster, venv, template_jobs(venv, workdir), workdir)
    for name, (state, code, out) in results.items():
        print(f"[multinode] {venv.impl} {name}: {state} {code}")
    check_client_py(results)
    check_places(results)
    if "resources" in results:  # per node: 2 threads, 2 x 1000 MiB per worker
        state, code, out = results["resources"]
        assert (state, code) == ("COMPLETED", 0), out
        workers = re.findall(r"^worker (\S+) nthreads=(\d+) memory_limit=(\d+)$", out,
                             re.MULTILINE)
        assert sorted(h for h, _, _ in workers) == ["10.213.17.3"] * 2 + ["10.213.17.4"] * 2
        assert {(t, m) for _, t, m in workers} == {("2", str(2000 * 2**20))}, out
    if "futures" in results:
        state, code, out = results["futures"]
        squares = [i * i for i in range(20)]
        assert (state, code) == ("COMPLETED", 0), out
        assert values(out) == {"results": str(squares), "sum": str(sum(squares)),
                               "workers": "4"}, out
    assert nothing_left(cluster) == {}


JOIN = textwrap.dedent("""
    import socket, sys
    from dask_mpi_launch import connect

    client = connect(sys.argv[1], timeout=30)
    client.wait_for_workers(int(sys.argv[2]), timeout=60)
    hosts = client.run(socket.gethostname)
    names = {a: str(w["name"]) for a, w in client.scheduler_info()["workers"].items()}
    print("joined=" + ",".join(sorted(h for a, h in hosts.items()
                                      if names[a].startswith("join"))))
    print("own=" + ",".join(sorted(h for a, h in hosts.items()
                                   if not names[a].startswith("join"))))
    print("sum=%d" % sum(client.gather(client.map(lambda x: x * 2, range(100)))))
    client.shutdown()
""")


def test_join_job_on_other_nodes(cluster, mpich, workdir, tmp_path):
    """cluster-only.sbatch on n1,n2 + add-workers.sbatch on n3; a client on the login
    host sees the joined workers on n3, computes, and its shutdown ends both jobs."""
    env = job_env(mpich, {"DASK_SCHEDULER_DIR": str(tmp_path)})
    main_id, main_out = cluster.submit(workdir / "cluster-only.sbatch", f"--chdir={workdir}",
                                       "--nodes=2", "--ntasks=4", "--ntasks-per-node=2",
                                       "--nodelist=n1,n2", env=env)
    scheduler_file = tmp_path / f"scheduler-{main_id}.json"
    add_id, add_out = cluster.submit(workdir / "add-workers.sbatch", f"--chdir={workdir}",
                                     "--nodes=1", "--ntasks=2", "--nodelist=n3",
                                     script_args=(str(scheduler_file),), env=env)
    (tmp_path / "join.py").write_text(JOIN)
    try:
        res = cluster.run([mpich.python, str(tmp_path / "join.py"), str(scheduler_file), "5"],
                          timeout=JOB_TIMEOUT, env=env)
        shown = f"{res.stdout}\n{res.stderr}\n--- main\n{cluster._read(main_out)}" \
                f"\n--- add\n{cluster._read(add_out)}"
        assert res.returncode == 0, shown
        # rank 0 (scheduler) and 1 on n1, ranks 2-3 on n2; the join job's two on n3
        assert values(res.stdout) == {"joined": "n3,n3", "own": "n1,n2,n2",
                                      "sum": "9900"}, shown
        assert cluster.wait(main_id, timeout=30) == ("COMPLETED", 0), shown
        assert cluster.wait(add_id, timeout=30) == ("COMPLETED", 0), shown
    finally:
        cluster.run(["scancel", main_id, add_id], timeout=10)
    assert nothing_left(cluster) == {}


WAIT_FOREVER = textwrap.dedent("""
    import time
    from distributed import Client
    client = Client()
    print("running", flush=True)
    time.sleep(300)
""")


def test_wrong_interface_names_ib0_quickly(cluster, mpich, workdir, tmp_path):
    """DASK_MPI_LAUNCH__INTERFACE=eth0: the workers on n2, n3 cannot reach the scheduler
    on n1's eth0; one message naming ib0, well before the 30 s connect timeout."""
    (tmp_path / "client.py").write_text(WAIT_FOREVER)
    t0 = time.monotonic()
    job_id, out_path = cluster.submit(workdir / "srun-script.sbatch", f"--chdir={tmp_path}",
                                      *SPREAD, env=job_env(mpich, {
                                          "DASK_MPI_LAUNCH__INTERFACE": "eth0"}))
    state, code = cluster.wait(job_id, timeout=JOB_TIMEOUT, out_path=out_path)
    seconds = time.monotonic() - t0
    out = cluster._read(out_path)
    errors = [ln for ln in out.splitlines() if "dask-mpi-launch: error" in ln]
    print(f"\n[multinode] --interface eth0: {state} {code} after {seconds:.1f} s\n{errors}")
    assert state == "FAILED" and code != 0, out
    assert len(errors) == 1 and "use --interface ib0" in errors[0], out
    assert seconds < 25, out  # the bound before the early probe: 30 s + 5 s, ~36 s seen
    assert nothing_left(cluster) == {}


def test_node_lost_mid_job(cluster, mpich, workdir, tmp_path):
    """n3 dies (its slurmd and every process on it SIGKILLed) while a job runs on n1-n3:
    the job ends, its output names n3, nothing is left on n1 and n2.

    What ends it today is Slurm, not dask-mpi-launch: slurmctld finds n3 not responding
    (SlurmdTimeout=10 here, 300 s by default), cancels the job "DUE TO NODE FAILURE" and
    srun says "Node failure on n3"; 26-30 s after the kill here (the job then stays
    COMPLETING until n3 comes back, and Slurm requeues a batch job by default: seen
    PENDING, Reason=BeginTime, once n3 was back; with ``--no-requeue``, as here, it ends
    with ExitCode 0:15, Reason=NodeDown). The ranks on n1
    and n2 had not noticed by then: their peers vanished, but nothing waits on them in an
    idle job, and a lost worker is survivable for Dask.
    """
    (tmp_path / "client.py").write_text(WAIT_FOREVER)
    job_id, out_path = cluster.submit(workdir / "srun-script.sbatch", f"--chdir={tmp_path}",
                                      "--no-requeue", *SPREAD, env=job_env(mpich))
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while "running" not in cluster._read(out_path):
            assert time.monotonic() < deadline, cluster._read(out_path)
            time.sleep(0.2)
        t0 = time.monotonic()
        cluster.kill_node("n3")
        info = {}
        while time.monotonic() - t0 < JOB_TIMEOUT:  # COMPLETING lasts: n3 never answers
            info = cluster.job_info(job_id)
            if info.get("JobState") not in ("RUNNING", "CONFIGURING"):
                break
            time.sleep(0.2)
        seconds = time.monotonic() - t0
        out = cluster._read(out_path)
        state, code = info.get("JobState"), info.get("ExitCode")
        print(f"\n[multinode] node n3 lost: job {state} {code} {seconds:.1f} s later, "
              f"reason {info.get('Reason')}\n{out}")
        assert state not in ("RUNNING", "COMPLETED"), out
        assert "n3" in out, out
        left = nothing_left(cluster)
        assert not left.get("n1") and not left.get("n2"), left
    finally:
        cluster.run(["scancel", job_id], timeout=10)
        cluster.kill_node("n3")
        cluster.start_slurmd("n3")


def test_early_probe_reports_only_definite_failures():
    """In-process: the early probe (roles/run.py EARLY_PROBE) stays silent on a refusal,
    which may be a scheduler still starting, while the full diagnosis reports it; only
    workers on another host than the scheduler's probe early, and a sample of big jobs."""
    import socket

    from dask_mpi_launch.roles import diagnose, run

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connects are refused
    address = f"tcp://127.0.0.1:{port}"
    assert diagnose.reachability_problem(address, 0.5, {}, definite_only=True) is None
    assert "connection refused" in diagnose.reachability_problem(address, 0.5, {})
    here = {"host": socket.gethostname()}
    assert not run._probes_early(5, here)
    assert [r for r in range(2, 200) if run._probes_early(r, {"host": "elsewhere"})] == [
        *range(2, run.EARLY_PROBE_RANKS), 64, 96, 128, 160, 192]
    assert run._probes_early("join123-0", {"host": "elsewhere"})
