"""Live Slurm clusters for tests: one node on loopback (SlurmCluster), or several nodes
made of network namespaces (SlurmNodes), which a person can also drive by hand::

    eval "$(python tests/slurm_cluster.py up --nodes 3)"   # SLURM_CONF, SUBMIT, ...
    $SUBMIT sbatch -N 3 job.sh                             # from the login host
    python tests/slurm_cluster.py down                     # from any shell

The single-node cluster:

Usage from a test (tests/ on sys.path)::

    from slurm_cluster import SlurmCluster, ensure_slurm_installed

    reason = ensure_slurm_installed()
    if reason:
        pytest.skip(reason)
    with SlurmCluster() as slurm:
        job_id, state, exit_code, out = slurm.sbatch("job.sh", "-n", "4", timeout=60)

Everything lives in a fresh temporary directory (``dml-slurm-*`` under the system temp
dir): config, state, spool, logs and pid files.  The daemons listen on free loopback
ports, so a stale cluster from an earlier crashed run cannot collide with a new one; such
stale clusters (whose owning Python process is gone) are killed and removed on start.

``sbatch(script, *sbatch_options, timeout=..., script_args=())`` returns when the job has
ended, polling ``scontrol show job`` (``sbatch --wait`` polls every 2 s, then 8, then 32),
and gives ``(job_id, state, exit_code, output)``.  Measured on 2 cores: start 3.2 s (of
which ~3 s is slurmctld's first scheduling pass, absorbed by a warm-up job so that test jobs
take steady times), then ~0.5 s from submission to allocation (scheduler tick, with
batch_sched_delay=0) + the job itself: a 4-rank ``srun --mpi=pmi2`` job about 1 s in all.

munged is shared machine-wide: it is started if no munged answers, and left running.
Facts behind the configuration: shared/ANCHORS.md ("Slurm on one machine").
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

SLURM_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "libpmix2", "libpmix-dev"]
REQUIRED_PROGRAMS = ["slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel",
                     "munged"]
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
)
_TMP_PREFIX = "dml-slurm-"
MUNGE_KEY = Path("/etc/munge/munge.key")

_install_result: list[str | None] = []  # memo: [reason or None] once decided


# job states in which a job has not finished yet
_ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED",
                  "REQUEUED", "RESIZING", "SIGNALING", "STAGE_OUT"}


class SlurmError(RuntimeError):
    """The cluster could not be started, or a job could not be run."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


def _missing_programs() -> list[str]:
    return [p for p in REQUIRED_PROGRAMS if _which(p) is None]


def _tail(text: str | bytes | None, lines: int = 15) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join(text.strip().splitlines()[-lines:])


def ensure_slurm_installed(timeout: float = 600.0) -> str | None:
    """Install Slurm + munge from Debian if missing.

    Returns None when Slurm is usable, otherwise a one-line reason (for ``pytest.skip``).
    The outcome is memoised for the process; apt-get update runs at most once.
    """
    if _install_result:
        return _install_result[0]
    reason = _ensure_slurm_installed(timeout)
    _install_result.append(reason)
    return reason


def _ensure_slurm_installed(timeout: float) -> str | None:
    missing = _missing_programs()
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"Slurm programs missing ({', '.join(missing)}) and not root, cannot apt-get install"
    if _which("apt-get") is None:
        return f"Slurm programs missing ({', '.join(missing)}) and no apt-get on this machine"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    deadline = time.monotonic() + timeout
    for cmd in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", *SLURM_PACKAGES],
    ):
        left = deadline - time.monotonic()
        try:
            proc = subprocess.run(
                cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                text=True, timeout=max(left, 1.0),
            )
        except subprocess.TimeoutExpired:
            return f"{' '.join(cmd[:2])} timed out after {timeout:.0f} s"
        if proc.returncode != 0:
            last = _tail(proc.stderr or proc.stdout, 1)
            return f"{' '.join(cmd[:2])} failed (rc {proc.returncode}): {last}"
    missing = _missing_programs()
    if missing:
        return f"after apt-get install still missing: {', '.join(missing)}"
    return None


# --------------------------------------------------------------------------- processes

def _alive(pid: int) -> bool:
    """True if pid runs and is not a zombie (PID 1 here may not reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _terminate(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM, bounded wait, then SIGKILL."""
    pids = [p for p in pids if p > 1 and p != os.getpid() and _alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            if not pids:
                return
            time.sleep(0.05)


def _ancestors() -> set[int]:
    """This process and its parents: never killed by a sweep."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[-1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _pids_with_slurm_conf(conf_prefix: str) -> list[int]:
    """Processes (daemons, slurmstepd, job steps) whose SLURM_CONF starts with conf_prefix."""
    needle = b"SLURM_CONF=" + conf_prefix.encode()
    spare = _ancestors()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in spare:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if any(var.startswith(needle) for var in environ.split(b"\0")):
            found.append(int(entry))
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reap_stale_clusters() -> None:
    """Kill and remove clusters left behind by Python processes that are gone."""
    for d in glob.glob(os.path.join(tempfile.gettempdir(), _TMP_PREFIX + "*")):
        path = Path(d)
        owner = _read_pid(path / "owner.pid")
        if owner is not None and owner != os.getpid() and _alive(owner):
            continue  # another live test session owns it
        if owner == os.getpid():
            continue  # ours, still in use
        pids = [_read_pid(Path(n)) for n in glob.glob(str(path / "slurm*.pid"))]
        _terminate([p for p in pids if p] + _pids_with_slurm_conf(str(path) + "/"))
        shutil.rmtree(path, ignore_errors=True)


def _stop_daemons(tmpdir: Path, run=None) -> None:
    """Cancel every job (``run`` runs a Slurm client command; slurmstepd then cleans up
    the jobs' processes), stop the daemons by their pid files (slurmd first), then any
    stray process (slurmstepd, job steps) whose SLURM_CONF lies in ``tmpdir``."""
    if run is not None and _alive(_read_pid(tmpdir / "slurmctld.pid") or 0):
        try:
            run(["scancel", "--partition=debug"], timeout=10)
        except (subprocess.TimeoutExpired, OSError):
            pass
    names = sorted(glob.glob(str(tmpdir / "slurmd*.pid"))) + [str(tmpdir / "slurmctld.pid")]
    _terminate([p for p in map(_read_pid, map(Path, names)) if p])
    _terminate(_pids_with_slurm_conf(str(tmpdir) + "/"), grace=3.0)


# --------------------------------------------------------------------------- munge

def _munge_works() -> bool:
    munge = _which("munge")
    if munge is None:
        return False
    try:
        return subprocess.run([munge, "-n"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _ensure_munge() -> None:
    if _munge_works():
        return
    if not MUNGE_KEY.exists():
        MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        MUNGE_KEY.write_bytes(os.urandom(1024))
        shutil.chown(MUNGE_KEY, "munge", "munge")
        MUNGE_KEY.chmod(0o400)
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        os.makedirs(d, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    # a dead munged may have left its pid file / socket behind
    for stale in glob.glob("/run/munge/munged.pid") + glob.glob("/run/munge/munge.socket.2*"):
        pid = _read_pid(Path(stale)) if stale.endswith(".pid") else None
        if pid is None or not _alive(pid):
            try:
                os.unlink(stale)
            except OSError:
                pass
    proc = subprocess.run(
        ["runuser", "-u", "munge", "--", _which("munged") or "/usr/sbin/munged"],
        capture_output=True, text=True, timeout=30,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _munge_works():
            return
        time.sleep(0.1)
    raise SlurmError(f"munged did not start (rc {proc.returncode}): "
                     f"{_tail(proc.stderr or proc.stdout)}")


# --------------------------------------------------------------------------- cluster

_CONF_TEMPLATE = """\
ClusterName={cluster}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmi2
ReturnToService=2
MinJobAge=600
FirstJobId={first_job_id}
SchedulerParameters=batch_sched_delay=0
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


class SlurmCluster:
    """Single-node Slurm (slurmctld + slurmd) on 127.0.0.1, as a context manager.

    Attributes once started: ``tmpdir`` (Path), ``conf_path`` (Path), ``env`` (dict to merge
    into a subprocess environment), ``start_seconds`` (time to idle), ``last_job_seconds``.
    """

    def __init__(self, cpus: int = 16, memory_mb: int = 16000, start_timeout: float = 30.0,
                 warmup: bool = True):
        self.warmup = warmup
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.start_timeout = start_timeout
        self.tmpdir: Path | None = None
        self.conf_path: Path | None = None
        self.env: dict[str, str] = {}
        self.start_seconds: float | None = None
        self.last_job_seconds: float | None = None
        self._jobs = 0

    # -- lifecycle
    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        t0 = time.monotonic()
        missing = _missing_programs()
        if missing:
            raise SlurmError(f"Slurm not installed (missing {', '.join(missing)}); "
                             "call ensure_slurm_installed() first")
        _reap_stale_clusters()
        _ensure_munge()
        self._make_tmpdir()
        self.conf_path = self.tmpdir / "slurm.conf"
        self.conf_path.write_text(self._conf_text())
        self.env = {"SLURM_CONF": str(self.conf_path)}
        self._start_daemons()
        self._wait_idle()
        if self.warmup:
            self._warm_up()
        self.start_seconds = time.monotonic() - t0

    def _make_tmpdir(self, owner: int | None = None) -> None:
        self.tmpdir = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX))
        (self.tmpdir / "owner.pid").write_text(str(owner or os.getpid()))
        for sub in ("state", "spool", "jobs"):
            (self.tmpdir / sub).mkdir()

    def _conf_text(self) -> str:
        return _CONF_TEMPLATE.format(
            cluster="dml" + uuid.uuid4().hex[:8], d=self.tmpdir,
            ctld_port=_free_port(), slurmd_port=_free_port(),
            cpus=self.cpus, memory=self.memory_mb,
            # job ids name MPICH's shared-memory segments under srun: never reuse them
            first_job_id=random.randint(100_000, 60_000_000),
        )

    def _start_daemons(self) -> None:
        daemon_env = {**os.environ, **self.env}
        for cmd in (
            [_which("slurmctld"), "-f", str(self.conf_path), "-i"],
            [_which("slurmd"), "-f", str(self.conf_path), "-N", "localhost"],
        ):
            proc = subprocess.run(cmd, env=daemon_env, capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=30)
            self._check_started(cmd, proc)

    def _check_started(self, cmd, proc) -> None:
        if proc.returncode != 0:
            raise SlurmError(f"{' '.join(map(str, cmd))} failed (rc {proc.returncode}): "
                             f"{_tail(proc.stderr)}\n{self._logs()}")

    def _wait_idle(self, nodes: int = 1) -> None:
        """Poll ``sinfo`` until ``nodes`` nodes are idle (~0.1 s per node here)."""
        deadline = time.monotonic() + self.start_timeout
        state = ""
        while time.monotonic() < deadline:
            try:
                state = self.run(["sinfo", "-h", "-N", "-o", "%T"], timeout=10).stdout
            except subprocess.TimeoutExpired:
                state = "(sinfo timed out)"
            if state.split() == ["idle"] * nodes:
                return
            time.sleep(0.1)
        raise SlurmError(f"nodes not idle after {self.start_timeout:.0f} s "
                         f"(sinfo said {state.strip()!r})\n{self._logs()}")

    def _warm_up(self, *options: str) -> None:
        """slurmctld schedules nothing in its first ~3 s; a trivial job absorbs that delay
        here so that test jobs take steady times (and proves jobs run)."""
        script = self.tmpdir / "warmup.sh"
        script.write_text("#!/bin/bash\ntrue\n")
        _, state, code, out = self.sbatch(script, *options, timeout=self.start_timeout)
        if (state, code) != ("COMPLETED", 0):
            raise SlurmError(f"warm-up job ended {state} rc {code}: {out}\n{self._logs()}")

    def stop(self) -> None:
        if self.tmpdir is None:
            return
        _stop_daemons(self.tmpdir, self.run if self.conf_path else None)
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        self.tmpdir = None

    # -- helpers
    def run(self, cmd: list[str], timeout: float,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        return subprocess.run([_which(cmd[0]) or cmd[0], *cmd[1:]],
                              env={**os.environ, **(env or {}), **self.env},
                              capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=timeout)

    def _logs(self) -> str:
        parts = []
        logs = sorted(glob.glob(str(self.tmpdir / "slurm*.log"))) if self.tmpdir else []
        for path in logs or ["slurmctld.log"]:
            try:
                parts.append(f"--- {Path(path).name}\n" + _tail(Path(path).read_text(), 20))
            except OSError:
                parts.append(f"--- {Path(path).name}: (none)")
        return "\n".join(parts)

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (empty once the job record is gone)."""
        try:
            proc = self.run(["scontrol", "-o", "show", "job", job_id], timeout=10)
        except subprocess.TimeoutExpired:
            return {}
        if proc.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def sbatch(self, script_path, *args: str, timeout: float = 120.0,
               script_args: tuple[str, ...] = (), env: dict[str, str] | None = None):
        """Submit ``script_path`` and wait for the job; ``args`` are extra sbatch options.

        Returns ``(job_id, state, exit_code, stdout_text)``: state from ``scontrol show job``
        (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...), exit_code is the batch script's exit
        code (128 + signal if it was killed by a signal).  stdout_text holds stdout and stderr.
        On timeout the job is cancelled and SlurmError carries the output so far.
        """
        t0 = time.monotonic()
        job_id, out_path = self.submit(script_path, *args, script_args=script_args, env=env)
        state, exit_code = self.wait(job_id, timeout=timeout, what=" ".join(args),
                                     out_path=out_path)
        self.last_job_seconds = time.monotonic() - t0
        return job_id, state, exit_code, self._read(out_path)

    def submit(self, script_path, *args: str, script_args: tuple[str, ...] = (),
               env: dict[str, str] | None = None) -> tuple[str, Path]:
        """Submit without waiting: ``(job_id, path of its output)``; see :meth:`wait`."""
        self._jobs += 1
        name = f"dml-{self._jobs}-{uuid.uuid4().hex[:6]}"
        out_path = self.tmpdir / "jobs" / f"{name}.out"
        cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--output={out_path}",
               *args, str(script_path), *script_args]
        proc = self.run(cmd, timeout=30, env=env)
        job_id = proc.stdout.strip().split(";")[0]
        if proc.returncode != 0 or not job_id:
            raise SlurmError(f"sbatch failed (rc {proc.returncode}): {proc.stderr.strip()}")
        return job_id, out_path

    def wait(self, job_id: str, timeout: float, what: str = "",
             out_path: Path | None = None) -> tuple[str, int]:
        """``(state, exit_code)`` once the job has ended (see :meth:`sbatch`); on timeout
        the job is cancelled and SlurmError raised.

        Waiting polls ``scontrol show job`` itself rather than using ``sbatch --wait``, whose
        polling sleeps 2 s, then 8 s, then 32 s and so adds seconds to every job.
        """
        t0 = time.monotonic()
        info: dict[str, str] = {}
        delay = 0.02
        while True:
            info = self.job_info(job_id)
            state = info.get("JobState", "")
            if state and state not in _ACTIVE_STATES:
                break
            if not info and time.monotonic() - t0 > 5:
                break  # record gone (should not happen with MinJobAge=600)
            if time.monotonic() - t0 > timeout:
                try:
                    self.run(["scancel", job_id], timeout=10)
                except subprocess.TimeoutExpired:
                    pass
                raise SlurmError(
                    f"job {job_id} ({what}) still {state or '?'} after {timeout} s; "
                    f"cancelled. Output so far:\n{self._read(out_path)}\n{self._logs()}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)
        rc, _, sig = info.get("ExitCode", "0:0").partition(":")
        exit_code = int(rc) if rc.isdigit() else -1
        if exit_code == 0 and sig.isdigit() and int(sig):
            exit_code = 128 + int(sig)
        return info.get("JobState", "UNKNOWN"), exit_code

    @staticmethod
    def _read(path: Path | None) -> str:
        if path is None:
            return ""
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""


# --------------------------------------------------------------------------- several nodes

_NODES_CONF_TEMPLATE = """\
ClusterName={cluster}
SlurmctldHost=login({login_addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmi2
ReturnToService=2
SlurmdTimeout=10
KillWait=5
MinJobAge=600
FirstJobId={first_job_id}
SchedulerParameters=batch_sched_delay=0
SlurmdParameters=config_overrides
{node_lines}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""

FABRIC_NET = "10.213.17.0/24"  # not test_multihost's 10.213.7.0/24: both may run at once
MGMT_NET = "10.213.18.0/24"


class SlurmNodes(SlurmCluster):
    """Slurm on several "nodes" made of network namespaces (tests/netns_hosts.py).

    Host ``login`` runs slurmctld and is where jobs are submitted from (``run``,
    ``sbatch``, and by hand the ``SUBMIT`` prefix: ``ip netns exec <login namespace>``);
    hosts ``n1``..``nN`` each run one slurmd under their own hostname (UTS namespace),
    sharing the file system (like a cluster's shared home) and /dev/shm: UCX (under the
    MPICH wheel) takes all nodes for one machine (same boot id) and joins ranks through
    shared memory, which a private /dev/shm per node breaks (measured: MPI_Init fails). Their fabric interface is ``ib0`` (a bridge joins
    all hosts; slurm.conf's NodeAddr is each node's ib0 address) and their management
    interface ``eth0`` reaches nothing but carries the default route, so Dask's guess of
    "the external address" is the wrong one, as on many clusters. Daemons use Slurm's
    default ports: each namespace has its own, nothing can collide.

    Start time measured on 2 shared cores (load 4-13): 3 nodes up in 3.2-3.5 s, the
    warm-up job across all nodes (which absorbs slurmctld's first scheduling delay)
    included; ``stop`` ~0.5 s.
    SlurmdTimeout=10 and KillWait=5 make a lost node and a cancelled job end in seconds.
    """

    def __init__(self, nodes: int = 3, cpus: int = 16, memory_mb: int = 16000,
                 start_timeout: float = 30.0, warmup: bool = True, owner: int | None = None):
        super().__init__(cpus=cpus, memory_mb=memory_mb, start_timeout=start_timeout,
                         warmup=warmup)
        if not 1 <= nodes <= 20:
            raise ValueError("nodes must be in 1..20")
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.owner = owner
        self.hosts = None
        self.submit_prefix: list[str] = []

    def start(self) -> None:
        from netns_hosts import NetnsHosts, can_create_namespaces

        reason = can_create_namespaces()
        if reason:
            raise SlurmError(reason)
        self.hosts = NetnsHosts(len(self.nodes) + 1, names=["login", *self.nodes],
                                fabric="bridge", fabric_net=FABRIC_NET, mgmt_net=MGMT_NET,
                                owner=self.owner)
        self.hosts.setup()
        self.submit_prefix = ["ip", "netns", "exec", self.hosts.namespace("login")]
        super().start()

    def _make_tmpdir(self, owner: int | None = None) -> None:
        super()._make_tmpdir(self.owner)

    def _conf_text(self) -> str:
        lines = [f"NodeName={n} NodeAddr={self.hosts.address(n)} CPUs={self.cpus} "
                 f"RealMemory={self.memory_mb} State=UNKNOWN" for n in self.nodes]
        return _NODES_CONF_TEMPLATE.format(
            cluster="dml" + uuid.uuid4().hex[:8], d=self.tmpdir,
            login_addr=self.hosts.address("login"), node_lines="\n".join(lines),
            node_list=",".join(self.nodes), first_job_id=random.randint(100_000, 60_000_000))

    def _start_daemons(self) -> None:
        env = {**os.environ, **self.env}
        cmd = [_which("slurmctld"), "-f", str(self.conf_path), "-i"]
        self._check_started(cmd, self.hosts.run("login", cmd, timeout=30, env=env,
                                                capture_output=True, text=True))
        for node in self.nodes:
            (self.tmpdir / f"spool-{node}").mkdir()
            self.start_slurmd(node)

    def _wait_idle(self, nodes: int = 1) -> None:
        super()._wait_idle(len(self.nodes))

    def _warm_up(self, *options: str) -> None:
        super()._warm_up(f"--nodes={len(self.nodes)}")

    def run(self, cmd: list[str], timeout: float,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a Slurm client command on the login host, against this cluster."""
        return super().run([*self.submit_prefix, _which(cmd[0]) or cmd[0], *cmd[1:]],
                           timeout=timeout, env=env)

    def node_pids(self, node: str) -> list[int]:
        """Processes running on ``node`` (its network namespace), slurmd included."""
        out = subprocess.run(["ip", "netns", "pids", self.hosts.namespace(node)],
                             capture_output=True, text=True, timeout=10).stdout
        return [int(p) for p in out.split()]

    def kill_node(self, node: str) -> None:
        """The node dies: SIGKILL its slurmd and every process on it."""
        for _ in range(20):
            pids = self.node_pids(node)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def start_slurmd(self, node: str) -> None:
        """Start the node's slurmd (again, after :meth:`kill_node`: ReturnToService=2
        makes the node usable once it registers). The machine's cgroups are mounted in
        the node's fresh /sys ("ip netns exec" hides them): slurmd 22.05 needs them even
        with proctrack/linuxproc."""
        env = {**os.environ, **self.env}
        cmd = ["/bin/sh", "-c", _cgroup_mounts() + 'exec "$0" "$@"', _which("slurmd"),
               "-f", str(self.conf_path), "-N", node]
        self._check_started(cmd, self.hosts.run(node, cmd, timeout=30, env=env,
                                                capture_output=True, text=True))

    def slurmd_pid(self, node: str) -> int | None:
        return _read_pid(self.tmpdir / f"slurmd-{node}.pid") if self.tmpdir else None

    def stop(self) -> None:
        super().stop()
        if self.hosts is not None:
            self.hosts.close()
            self.hosts = None

    def exports(self) -> str:
        """Shell lines to ``eval``: SLURM_CONF, SUBMIT, and the nodes' names."""
        return "\n".join([
            f"export SLURM_CONF={shlex.quote(str(self.conf_path))}",
            f"export SUBMIT={shlex.quote(shlex.join(self.submit_prefix))}",
            f"export SLURM_NODES={shlex.quote(' '.join(self.nodes))}",
            "export DASK_MPI_LAUNCH__INTERFACE=ib0",
        ]) + "\n"

    def detach(self) -> dict:
        """Leave the cluster running after this process ends; the record lets
        :func:`remove_detached` stop and remove it from any process."""
        record = {"tmpdir": str(self.tmpdir), "conf": str(self.conf_path),
                  "submit": self.submit_prefix, "owner": self.owner,
                  "netns": self.hosts.detach()}
        self.tmpdir = None
        self.hosts = None
        return record


def _cgroup_mounts() -> str:
    """Shell commands that mount, in a node's fresh /sys, the cgroup file systems this
    machine has under /sys/fs/cgroup (a bind mount from another mount namespace is
    refused; mounting a v1 hierarchy again with its options attaches the same one)."""
    cmds = []
    with open("/proc/self/mounts") as f:
        for line in f:
            _, where, fstype, options = line.split()[:4]
            if not where.startswith("/sys/fs/cgroup"):
                continue
            kept = [o for o in options.split(",") if o not in ("rw", "relatime", "nosuid",
                                                                "nodev", "noexec")]
            opts = f" -o {shlex.quote(','.join(kept))}" if kept else ""
            mkdir = f"mkdir -p {where} && " if where != "/sys/fs/cgroup" else ""
            cmds.append(f"{mkdir}mount -t {fstype}{opts} {fstype} {where} && ")
    return "".join(cmds)


def remove_detached(record: dict) -> list[str]:
    """Stop and remove a cluster that :meth:`SlurmNodes.detach` left running."""
    from netns_hosts import remove_record

    tmpdir = Path(record["tmpdir"])
    env = {**os.environ, "SLURM_CONF": record["conf"]}

    def run(cmd, timeout):
        return subprocess.run([*record["submit"], _which(cmd[0]) or cmd[0], *cmd[1:]],
                              env=env, capture_output=True, timeout=timeout)

    _stop_daemons(tmpdir, run)
    left = remove_record(record["netns"])
    shutil.rmtree(tmpdir, ignore_errors=True)
    if record.get("owner"):
        _terminate([record["owner"]], grace=1.0)
    return left


# --------------------------------------------------------------------------- by hand

STATE_FILE = Path(tempfile.gettempdir()) / "dml-slurm-nodes.json"


def _up(nodes: int) -> int:
    if STATE_FILE.exists():
        print(f"slurm_cluster.py: a cluster is up already ({STATE_FILE}): run "
              "'python tests/slurm_cluster.py down' first", file=sys.stderr)
        return 1
    reason = ensure_slurm_installed()
    if reason:
        print(f"slurm_cluster.py: {reason}", file=sys.stderr)
        return 1
    # the cluster outlives this process: a detached keeper's life marks it as in use
    keeper = subprocess.Popen(["sleep", "infinity"], start_new_session=True,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    cluster = SlurmNodes(nodes=nodes, owner=keeper.pid)
    try:
        cluster.start()
    except BaseException as e:
        cluster.stop()
        _terminate([keeper.pid], grace=1.0)
        print(f"slurm_cluster.py: {e}", file=sys.stderr)
        return 1
    exports = cluster.exports()
    fd = os.open(STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(cluster.detach(), f)
    print(f"# {nodes} nodes up in {cluster.start_seconds:.1f} s; "
          "'python tests/slurm_cluster.py down' removes them", file=sys.stderr)
    sys.stdout.write(exports)
    return 0


def _down() -> int:
    try:
        record = json.loads(STATE_FILE.read_text())
    except FileNotFoundError:
        print("slurm_cluster.py: no cluster is up", file=sys.stderr)
        return 0
    left = remove_detached(record)
    STATE_FILE.unlink(missing_ok=True)
    if left:
        print(f"slurm_cluster.py: namespaces left: {' '.join(left)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``up [--nodes N]`` starts a cluster and prints shell lines to ``eval``;
    ``down`` removes it (state in STATE_FILE, so any shell can)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python tests/slurm_cluster.py",
                                     description=main.__doc__)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--nodes", type=int, default=3, choices=range(1, 21),
                        metavar="N", help="compute nodes n1..nN (default 3)")
    args = parser.parse_args(argv)
    return _up(args.nodes) if args.action == "up" else _down()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
