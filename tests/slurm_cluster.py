"""A live single-node Slurm cluster on loopback, for tests.

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
import os
import random
import re
import shutil
import signal
import socket
import subprocess
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
        pids = [_read_pid(path / n) for n in ("slurmd.pid", "slurmctld.pid")]
        _terminate([p for p in pids if p] + _pids_with_slurm_conf(str(path) + "/"))
        shutil.rmtree(path, ignore_errors=True)


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
        self.tmpdir = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX))
        (self.tmpdir / "owner.pid").write_text(str(os.getpid()))
        for sub in ("state", "spool", "jobs"):
            (self.tmpdir / sub).mkdir()
        self.conf_path = self.tmpdir / "slurm.conf"
        self.conf_path.write_text(_CONF_TEMPLATE.format(
            cluster="dml" + uuid.uuid4().hex[:8], d=self.tmpdir,
            ctld_port=_free_port(), slurmd_port=_free_port(),
            cpus=self.cpus, memory=self.memory_mb,
            # job ids name MPICH's shared-memory segments under srun: never reuse them
            first_job_id=random.randint(100_000, 60_000_000),
        ))
        self.env = {"SLURM_CONF": str(self.conf_path)}
        daemon_env = {**os.environ, **self.env}
        for cmd in (
            [_which("slurmctld"), "-f", str(self.conf_path), "-i"],
            [_which("slurmd"), "-f", str(self.conf_path), "-N", "localhost"],
        ):
            proc = subprocess.run(cmd, env=daemon_env, capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=30)
            if proc.returncode != 0:
                raise SlurmError(f"{' '.join(cmd)} failed (rc {proc.returncode}): "
                                 f"{_tail(proc.stderr)}\n{self._logs()}")
        deadline = time.monotonic() + self.start_timeout
        state = ""
        while time.monotonic() < deadline:
            try:
                state = self.run(["sinfo", "-h", "-o", "%T"], timeout=10).stdout.strip()
            except subprocess.TimeoutExpired:
                state = "(sinfo timed out)"
            if state == "idle":
                break
            time.sleep(0.1)
        else:
            raise SlurmError(f"node not idle after {self.start_timeout:.0f} s "
                             f"(sinfo said {state!r})\n{self._logs()}")
        if self.warmup:
            # slurmctld schedules nothing in its first ~3 s; a trivial job absorbs that
            # delay here so that test jobs take steady times (and proves jobs run).
            script = self.tmpdir / "warmup.sh"
            script.write_text("#!/bin/bash\ntrue\n")
            _, state, code, out = self.sbatch(script, timeout=self.start_timeout)
            if (state, code) != ("COMPLETED", 0):
                raise SlurmError(f"warm-up job ended {state} rc {code}: {out}\n{self._logs()}")
        self.start_seconds = time.monotonic() - t0

    def stop(self) -> None:
        if self.tmpdir is None:
            return
        prefix = str(self.tmpdir) + "/"
        if self.conf_path and _alive(_read_pid(self.tmpdir / "slurmctld.pid") or 0):
            try:  # cancel running jobs so slurmstepd cleans up job processes
                self.run(["scancel", "--partition=debug"], timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for name in ("slurmd.pid", "slurmctld.pid"):
            pid = _read_pid(self.tmpdir / name)
            if pid:
                _terminate([pid])
        _terminate(_pids_with_slurm_conf(prefix), grace=3.0)  # stray slurmstepd / job steps
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
        for name in ("slurmctld.log", "slurmd.log"):
            try:
                parts.append(f"--- {name}\n" + _tail((self.tmpdir / name).read_text(), 20))
            except (OSError, TypeError):
                parts.append(f"--- {name}: (none)")
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

        Waiting polls ``scontrol show job`` itself rather than using ``sbatch --wait``, whose
        polling sleeps 2 s, then 8 s, then 32 s and so adds seconds to every job.
        """
        self._jobs += 1
        name = f"dml-{self._jobs}-{uuid.uuid4().hex[:6]}"
        out_path = self.tmpdir / "jobs" / f"{name}.out"
        cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--output={out_path}",
               *args, str(script_path), *script_args]
        t0 = time.monotonic()
        proc = self.run(cmd, timeout=30, env=env)
        job_id = proc.stdout.strip().split(";")[0]
        if proc.returncode != 0 or not job_id:
            raise SlurmError(f"sbatch failed (rc {proc.returncode}): {proc.stderr.strip()}")
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
                    f"job {job_id} ({' '.join(args)}) still {state or '?'} after {timeout} s; "
                    f"cancelled. Output so far:\n{self._read(out_path)}\n{self._logs()}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)
        self.last_job_seconds = time.monotonic() - t0
        rc, _, sig = info.get("ExitCode", "0:0").partition(":")
        exit_code = int(rc) if rc.isdigit() else -1
        if exit_code == 0 and sig.isdigit() and int(sig):
            exit_code = 128 + int(sig)
        return job_id, info.get("JobState", "UNKNOWN"), exit_code, self._read(out_path)

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""
