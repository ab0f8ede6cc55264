"""A live one-host Grid Engine cell on this machine, for tests.

Usage from a test (tests/ on sys.path)::

    from sge_cluster import GridEngine, ensure_sge_installed

    reason = ensure_sge_installed()
    if reason:
        pytest.skip(reason)
    with GridEngine() as sge:
        status, output = sge.qsub("job.sh", "-pe", "mpi", "4", timeout=60)

Recipe (Debian gridengine 8.1.9; facts in shared/ANCHORS.md, "Grid Engine on one machine"):

1. Install: preseed debconf (``gridengine-common shared/gridengineconfig boolean true``,
   ``shared/gridenginecell string default``, ``shared/gridenginemaster string <hostname>``),
   then ``apt-get install -y --no-install-recommends gridengine-master gridengine-exec
   gridengine-client`` (~14 s).  The packages' postinst creates the cell
   (``SGE_ROOT=/var/lib/gridengine``, ``SGE_CELL=default``, berkeleydb spool under
   /var/spool/gridengine); their service start is refused here, which is fine: the daemons
   are started by hand.
2. Before qmaster starts: the hostname resolves to 127.0.0.1, which reverse-resolves to
   ``localhost``, and commlib refuses such clients ("access denied (client IP resolved to host
   name localhost ...)").  ``$SGE_ROOT/default/common/host_aliases`` gets the line
   ``<hostname> localhost`` and ``act_qmaster`` the hostname.  /etc/hosts is left alone.
3. ``/usr/sbin/sge_qmaster`` (daemonises; up in ~0.4 s; pid file
   /var/spool/gridengine/qmaster/qmaster.pid).
4. Configuration, idempotent (the spool keeps it between runs; each object is modified if it
   exists, added otherwise): global ``min_uid 0``, ``min_gid 0`` (jobs run as root here),
   ``shell_start_mode unix_behavior``; scheduler ``schedule_interval 0:0:1``,
   ``flush_submit_sec 1``, ``flush_finish_sec 1``; this host as submit host (``qconf -as``)
   and exec host (``qconf -Ae``); a parallel environment ``mpi`` (``slots 999``,
   ``allocation_rule $fill_up``, ``control_slaves TRUE``, ``job_is_first_task FALSE``); queue
   ``all.q`` on this host with ``slots 8``, ``pe_list mpi``, ``shell /bin/bash`` and
   ``load_thresholds NONE`` (two busy cores trip the default ``np_load_avg=1.75`` and the
   queue goes into alarm state: jobs would wait).
5. ``/usr/sbin/sge_execd`` (pid file /var/spool/gridengine/execd/<host>/execd.pid); the
   queue takes jobs ~2-3 s later: a warm-up job absorbs that.
6. Jobs: ``qsub -sync y -V -cwd -w e -pe mpi N job.sh`` returns the job's exit status
   (~2 s round trip).  ``-V`` passes PATH (Grid Engine resets it otherwise); ``-w e`` fails at
   once when a request cannot be met (without it, qsub waits).  ``-b y 'a; b'`` fails: use a
   script.
7. Stop: ``qdel`` every job, then SIGTERM (then SIGKILL) execd and qmaster by their pid files,
   and any ``sge_shepherd`` left.

The daemons use Grid Engine's own fixed ports 6444 (qmaster) and 6445 (execd): one cell per
machine at a time.  A lock file (``/run/lock/dml-sge.lock``, flock) held while the cell is up
makes a second test session wait for it (bounded), and daemons left by a crashed session
(whose lock is free) are stopped before starting.
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from slurm_cluster import _alive, _tail, _terminate  # the same helpers as Slurm's

SGE_PACKAGES = ["gridengine-master", "gridengine-exec", "gridengine-client"]
REQUIRED_PROGRAMS = ["sge_qmaster", "sge_execd", "qsub", "qconf", "qstat", "qdel"]
SGE_ROOT = Path("/var/lib/gridengine")
SGE_CELL = "default"
SPOOL = Path("/var/spool/gridengine")
LOCK_PATH = Path("/run/lock/dml-sge.lock")
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
)
_install_result: list[str | None] = []


class SGEError(RuntimeError):
    """The cell could not be started, or a job could not be run."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


def _missing_programs() -> list[str]:
    return [p for p in REQUIRED_PROGRAMS if _which(p) is None]


def ensure_sge_installed(timeout: float = 600.0) -> str | None:
    """Install Grid Engine from Debian if missing (root only).

    None when usable, else a one-line reason for a skip. Memoised for the process."""
    if not _install_result:
        _install_result.append(_ensure_sge_installed(timeout))
    return _install_result[0]


def _ensure_sge_installed(timeout: float) -> str | None:
    missing = _missing_programs()
    if not missing and (SGE_ROOT / SGE_CELL / "common" / "bootstrap").exists():
        return None
    what = f"Grid Engine missing ({', '.join(missing) or 'no cell in ' + str(SGE_ROOT)})"
    if os.geteuid() != 0:
        return f"{what} and not root, cannot apt-get install {' '.join(SGE_PACKAGES)}"
    if _which("apt-get") is None or _which("debconf-set-selections") is None:
        return f"{what} and no apt-get/debconf on this machine"
    host = socket.gethostname()
    preseed = "".join(f"gridengine-common shared/{k} {v}\n" for k, v in (
        ("gridengineconfig", "boolean true"), ("gridenginecell", f"string {SGE_CELL}"),
        ("gridenginemaster", f"string {host}")))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    deadline = time.monotonic() + timeout
    for cmd, stdin in ((["debconf-set-selections"], preseed), (["apt-get", "update"], ""),
                       (["apt-get", "install", "-y", "--no-install-recommends",
                         *SGE_PACKAGES], "")):
        try:
            proc = subprocess.run(cmd, env=env, input=stdin, capture_output=True, text=True,
                                  timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            return f"{' '.join(cmd[:2])} timed out after {timeout:.0f} s"
        if proc.returncode != 0:
            return f"{' '.join(cmd[:2])} failed (rc {proc.returncode}): " \
                   f"{_tail(proc.stderr or proc.stdout, 1)}"
    missing = _missing_programs()
    if missing:
        return f"after apt-get install still missing: {', '.join(missing)}"
    return None


# --------------------------------------------------------------------------- processes

def _read_pid(path: Path | str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _pids_named(name: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == name:
                        found.append(int(entry))
            except OSError:
                pass
    return found


def _daemon_pids() -> list[int]:
    """execd first (it reaps its jobs), then qmaster: from pid files, the cell's own."""
    files = glob.glob(str(SPOOL / "execd" / "*" / "execd.pid"))
    files.append(str(SPOOL / "qmaster" / "qmaster.pid"))
    return [p for p in (_read_pid(f) for f in files) if p]


# --------------------------------------------------------------------------- cell

_GLOBAL = {"min_uid": "0", "min_gid": "0", "shell_start_mode": "unix_behavior"}
_SCHEDULER = {"schedule_interval": "0:0:1", "flush_submit_sec": "1", "flush_finish_sec": "1"}
_PE = """\
pe_name            mpi
slots              999
user_lists         NONE
xuser_lists        NONE
start_proc_args    NONE
stop_proc_args     NONE
allocation_rule    $fill_up
control_slaves     TRUE
job_is_first_task  FALSE
urgency_slots      min
accounting_summary FALSE
qsort_args         NONE
"""
_EXEC_HOST = """\
hostname          {host}
load_scaling      NONE
complex_values    NONE
user_lists        NONE
xuser_lists       NONE
projects          NONE
xprojects         NONE
usage_scaling     NONE
report_variables  NONE
"""
_QUEUE = {"qname": "all.q", "hostlist": "{host}", "load_thresholds": "NONE",
          "pe_list": "mpi", "slots": "{slots}", "shell": "/bin/bash",
          "shell_start_mode": "unix_behavior"}


def _edit(text: str, values: dict[str, str]) -> str:
    """Replace ``key value`` lines of a qconf listing (continuation lines dropped)."""
    out, skip = [], False
    for line in text.splitlines():
        if skip:
            skip = line.rstrip().endswith("\\")
            continue
        key = line.split(None, 1)[0] if line.strip() else ""
        if key in values:
            out.append(f"{key} {values[key]}")
            skip = line.rstrip().endswith("\\")
        else:
            out.append(line)
    return "\n".join(out) + "\n"


class GridEngine:
    """Grid Engine qmaster + execd on this host, as a context manager.

    Attributes once started: ``host``, ``env`` (SGE_ROOT, SGE_CELL: merge into a client's
    environment), ``tmpdir`` (job scripts' output), ``start_seconds``, ``last_job_seconds``.
    """

    def __init__(self, slots: int = 8, start_timeout: float = 60.0, lock_timeout: float = 300.0):
        self.slots = slots
        self.start_timeout = start_timeout
        self.lock_timeout = lock_timeout
        self.host = socket.gethostname()
        self.env = {"SGE_ROOT": str(SGE_ROOT), "SGE_CELL": SGE_CELL}
        self.tmpdir: Path | None = None
        self.start_seconds: float | None = None
        self.last_job_seconds: float | None = None
        self._lock = None
        self._jobs = 0

    def __enter__(self) -> "GridEngine":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- lifecycle
    def _acquire_lock(self) -> None:
        LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(LOCK_PATH, "w")
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SGEError(f"another test session holds {LOCK_PATH} (its Grid Engine "
                                   f"cell) for more than {self.lock_timeout:.0f} s") from None
                time.sleep(0.5)

    def start(self) -> None:
        t0 = time.monotonic()
        missing = _missing_programs()
        if missing:
            raise SGEError(f"Grid Engine not installed (missing {', '.join(missing)}); "
                           "call ensure_sge_installed() first")
        self._acquire_lock()
        # the lock was free: whatever runs is left over from a crashed session
        _terminate(_daemon_pids() + _pids_named("sge_shepherd"))
        common = SGE_ROOT / SGE_CELL / "common"
        (common / "host_aliases").write_text(f"{self.host} localhost\n")
        (common / "act_qmaster").write_text(f"{self.host}\n")
        self.tmpdir = Path(tempfile.mkdtemp(prefix="dml-sge-"))
        self._daemon("sge_qmaster")
        self._wait(lambda: self.run(["qconf", "-sh"], timeout=10).returncode == 0,
                   "qmaster does not answer qconf")
        self._configure()
        self._daemon("sge_execd")
        self._wait(self._queue_up, f"queue all.q@{self.host} not usable")
        # the first job after execd starts waits for its first load report: absorb it here
        script = self.tmpdir / "warmup.sh"
        script.write_text("#!/bin/bash\ntrue\n")
        status, out = self.qsub(script, timeout=self.start_timeout)
        if status != 0:
            raise SGEError(f"warm-up job ended with {status}: {out}\n{self._logs()}")
        self.start_seconds = time.monotonic() - t0

    def stop(self) -> None:
        if self._lock is None:
            return
        if _alive(_read_pid(SPOOL / "qmaster" / "qmaster.pid") or 0):
            try:
                self.run(["qdel", "-f", "-u", "*"], timeout=10)
            except subprocess.TimeoutExpired:
                pass
        _terminate(_daemon_pids())
        _terminate(_pids_named("sge_shepherd"), grace=3.0)
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
        self._lock.close()  # releases the flock
        self._lock = None

    def _daemon(self, name: str) -> None:
        proc = subprocess.run([_which(name) or f"/usr/sbin/{name}"],
                              env={**os.environ, **self.env}, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=30, cwd="/")
        if proc.returncode != 0:
            raise SGEError(f"{name} failed (rc {proc.returncode}): "
                           f"{_tail(proc.stderr or proc.stdout)}\n{self._logs()}")

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            try:
                if ready():
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.1)
        raise SGEError(f"{what} after {self.start_timeout:.0f} s\n{self._logs()}")

    def _queue_up(self) -> bool:
        out = self.run(["qstat", "-f", "-q", "all.q"], timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("all.q@"):
                fields = line.split()
                # "all.q@vm BIP 0/0/8 0.41 lx-amd64 [states]": no state letters = usable
                return len(fields) == 5 and fields[3] != "-NA-"
        return False

    def _qconf(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = self.run(["qconf", *args], timeout=30)
        if check and proc.returncode != 0:
            raise SGEError(f"qconf {' '.join(args)} failed (rc {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")
        return proc

    def _apply(self, show: list[str], add: str, modify: str, name: str, text: str) -> None:
        """Write ``text`` to a file called ``name`` (qconf -Mconf wants the config's name)
        and add or modify the object, whichever applies."""
        path = self.tmpdir / "conf" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        exists = self._qconf(*show, check=False).returncode == 0
        self._qconf(modify if exists else add, str(path))

    def _configure(self) -> None:
        h = self.host
        glob_conf = self._qconf("-sconf", "global").stdout
        self._apply(["-sconf", "global"], "-Aconf", "-Mconf", "global",
                    _edit(glob_conf, _GLOBAL))
        self._apply(["-ssconf"], "-Msconf", "-Msconf", "sched",
                    _edit(self._qconf("-ssconf").stdout, _SCHEDULER))
        if h not in self._qconf("-ss", check=False).stdout.split():
            self._qconf("-as", h)
        self._apply(["-se", h], "-Ae", "-Me", "exechost", _EXEC_HOST.format(host=h))
        self._apply(["-sp", "mpi"], "-Ap", "-Mp", "mpi", _PE)
        queue = {k: v.format(host=h, slots=self.slots) for k, v in _QUEUE.items()}
        shown = self._qconf("-sq", "all.q", check=False)
        if shown.returncode == 0:
            base = shown.stdout
        else:  # the template qconf -aq would open in an editor
            base = self.run(["qconf", "-aq"], timeout=30, env={"EDITOR": "cat"}).stdout
            base = base[:base.find("\n", base.find("h_vmem")) + 1]
        self._apply(["-sq", "all.q"], "-Aq", "-Mq", "all.q", _edit(base, queue))

    def _logs(self) -> str:
        parts = []
        for path in [SPOOL / "qmaster" / "messages",
                     *map(Path, glob.glob(str(SPOOL / "execd" / "*" / "messages")))]:
            try:
                parts.append(f"--- {path}\n" + _tail(path.read_text(errors="replace"), 10))
            except OSError:
                pass
        return "\n".join(parts)

    # -- jobs
    def run(self, cmd: list[str], timeout: float,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """A Grid Engine client command against this cell."""
        return subprocess.run([_which(cmd[0]) or cmd[0], *cmd[1:]],
                              env={**os.environ, **(env or {}), **self.env},
                              capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=timeout)

    def qsub(self, script, *args: str, timeout: float = 120.0, cwd=None,
             env: dict[str, str] | None = None, script_args: tuple[str, ...] = ()):
        """``qsub -sync y -V -w e -j y ARGS script`` from ``cwd``: ``(status, output)``.

        ``status`` is the job's exit status as qsub reports it; output holds the job's
        stdout and stderr.  qsub runs in its own process group: past ``timeout`` that group
        is killed, the job deleted, and SGEError carries the output so far.
        """
        job = self.submit(script, *args, cwd=cwd, env=env, script_args=script_args)
        return self.wait(job, timeout)

    def submit(self, script, *args: str, cwd=None, env: dict[str, str] | None = None,
               script_args: tuple[str, ...] = ()) -> "Job":
        """Start ``qsub -sync y ...`` in the background; finish with ``wait``."""
        self._jobs += 1
        name = f"dml{self._jobs}-{uuid.uuid4().hex[:6]}"
        out_path = self.tmpdir / f"{name}.out"
        cmd = [_which("qsub") or "qsub", "-sync", "y", "-V", "-w", "e", "-j", "y",
               "-N", name, "-o", str(out_path), *(["-cwd"] if cwd else []), *args,
               str(script), *script_args]
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {}), **self.env}, cwd=cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        return Job(name, out_path, proc, time.monotonic(), args)

    def wait(self, job: "Job", timeout: float):
        """``(status, output)`` of a job from ``submit`` (see ``qsub``)."""
        left = max(timeout - (time.monotonic() - job.started), 0.1)
        try:
            said, _ = job.proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            os.killpg(job.proc.pid, signal.SIGKILL)
            said, _ = job.proc.communicate()
            try:
                self.run(["qdel", "-f", job.name], timeout=10)
            except subprocess.TimeoutExpired:
                pass
            raise SGEError(f"job {job.name} ({' '.join(job.args)}) not done after {timeout} s;"
                           f" deleted.\nqsub: {said}\nOutput so far:\n{job.output()}"
                           f"\n{self._logs()}") from None
        self.last_job_seconds = time.monotonic() - job.started
        if "has been submitted" not in said:
            raise SGEError(f"qsub refused the job (rc {job.proc.returncode}): {said.strip()}")
        return job.proc.returncode, job.output()

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""


class Job:
    """A ``qsub -sync y`` running in the background."""

    def __init__(self, name: str, out_path: Path, proc: subprocess.Popen, started: float,
                 args):
        self.name, self.out_path, self.proc, self.started, self.args = (
            name, out_path, proc, started, args)

    def output(self) -> str:
        return GridEngine._read(self.out_path)
