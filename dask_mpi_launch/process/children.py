"""Role processes as a rank sees them: start, restart, signal, reap, read what they say.

A role process (scheduler, worker, the client script) reports through a pipe with JSON
lines (``address``, ``ready``, ``error``, ...) and ends with a POSIX wait status. It runs in
a process group of its own (so the launcher's SIGKILL of the rank's group does not skip the
script's ``finally`` blocks), and that whole group is what the rank signals: a script's
subprocesses end with it. It dies with its rank: SIGTERM when the rank dies
(``PR_SET_PDEATHSIG``), and its group killed by the zygote that forked it once the grace
is over (``zygote._guard``), for a role stuck in C code never runs Python's handler. A
worker ends alive and well only by saying "leaving" (``roles.run_worker``); every role
ends as ``python`` ends (:func:`end_as_python_would`); what the roles leave running below
the rank (a subreaper) is ended with the job (:func:`end_descendants`).

Who forks it is a :class:`Launcher`: the rank's zygote (``process/zygote.py``, forked before
``MPI_Init``, so role processes never hold an initialized MPI), or, where MPI was
initialized before we could fork a zygote (a script that imported ``mpi4py.MPI`` before
``initialize()``), the rank itself (:class:`ForkLauncher`).
"""
from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
import warnings

from dask_mpi_launch.base.record import replace
from dask_mpi_launch.base.status import Ended
from dask_mpi_launch.roles.record_output import tee
from dask_mpi_launch.roles.life import (  # noqa: F401 (the role's side, used here)
    ENDING, RESTART_REASON, BecomeClient, Channel, end_as_python_would, flush, run_body,
    set_title)

FORK_SAFETY = {  # fabrics that pin memory: make fork after MPI_Init as safe as they allow
    "RDMAV_FORK_SAFE": "1", "IBV_FORK_SAFE": "1",
    "CXI_FORK_SAFE": "1", "CXI_FORK_SAFE_HP": "1",
    "OMPI_MCA_mpi_warn_on_fork": "0",
}


class Child:
    """The rank's handle on one role process."""

    #: a worker process says "leaving" when it ends alive and well; without it, its end is a
    #: death whatever its status (roles.run_worker)
    announces_leaving = True

    def __init__(self, role: str, label: str, pid: int, fd: int, spec=None):
        self.role = role
        self.label = label  # e.g. "worker 3-1", for messages
        self.pid = pid
        self.fd = fd  # read end of its pipe, non-blocking; -1 once closed
        self.spec = spec  # what it runs, to start it again
        self.ended: Ended | None = None
        self.fresh = False  # ended, reaped by Family.ended(), not yet handled
        self.left: str | None = None  # why it said it leaves ("leaving"), if it did
        self.cause: str | None = None  # how it ended, where its wait status cannot say
        self.peak_memory: int | None = None  # bytes, from its rusage once reaped
        self._buffer = b""

    @property
    def alive(self) -> bool:
        return self.ended is None

    def read_events(self) -> list[dict]:
        """Every complete event in the pipe now (never blocks); closes it at end of file."""
        chunks = []
        while self.fd >= 0:
            try:
                data = os.read(self.fd, 65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                self.close_pipe()
                break
            chunks.append(data)
        self._buffer += b"".join(chunks)
        *lines, self._buffer = self._buffer.split(b"\n")
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
        return events

    def close_pipe(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def reap(self) -> bool:
        """Collect the wait status if the process ended; True if it did just now."""
        if self.ended is not None:
            return False
        try:
            pid, raw, usage = os.wait4(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: no status to tell
            self.ended = Ended(exited=255)
            return True
        if pid == 0:
            return False
        self.ended = Ended.from_wait(raw)
        self.peak_memory = usage.ru_maxrss * 1024
        return True

    def signal(self, signum: int) -> None:
        """Signal the role's whole process group (its subprocesses too)."""
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            if self.alive:
                try:
                    os.kill(self.pid, signum)
                except ProcessLookupError:
                    pass


class Family:
    """A rank's role processes: start and restart them, collect what they say and how
    they end, stop them in groups with a bound."""

    def __init__(self, launcher: "Launcher", settings, reap_orphans: bool, config=None):
        """``reap_orphans``: this process runs no user code, so every child that ends is
        ours to reap (orphans of our roles are reparented to us, the subreaper);
        ``config``: dask.config changes every role starts with (``tuning/scale.py``)."""
        self.launcher = launcher
        self.settings = settings
        self.config = dict(config or {})
        self.reap_orphans = reap_orphans
        self.members: list[Child] = []
        self.restarts: dict[str, int] = {}  # label -> restarts so far
        self.gone: list[Child] = []  # ended and started again (for the job record)
        self.log = None  # --record: label -> the file its output is copied to (job_record)

    def __iter__(self):
        return iter(list(self.members))

    def of(self, role: str) -> list[Child]:
        return [c for c in self.members if c.role == role]

    def start(self, role: str, label: str, spec, **kwargs) -> Child | None:
        spec = replace(spec, settings=self.settings, dask_config=self.config,
                       log=self.log(label) if self.log else None)
        child = self.launcher.start(role, label, spec, **kwargs)
        if child is not None:
            self.members.append(child)
        return child

    def may_restart(self, child: Child) -> bool:
        return self.restarts.get(child.label, 0) < self.settings.worker_restarts

    def restart(self, child: Child, counted: bool = True) -> int:
        """Start ``child``'s role again under the same label; return the restart count
        (``counted``: a death, not a restart Dask asked for)."""
        n = self.restarts.get(child.label, 0) + counted
        self.restarts[child.label] = n
        self.members.remove(child)
        self.gone.append(child)
        child.signal(signal.SIGKILL)  # whatever it left in its group
        self.start(child.role, child.label, child.spec)
        return n

    def fds(self) -> list[int]:
        return [c.fd for c in self.members if c.fd >= 0]

    def said(self, readable) -> list[tuple[Child, dict]]:
        """Events from the children whose pipes are readable."""
        return [(c, e) for c in self.members if c.fd in readable for e in c.read_events()]

    def ended(self) -> list[tuple[Child, list[dict]]]:
        """Children that ended since the last call, each with what it said just before."""
        if self.reap_orphans:
            by_pid = {c.pid: c for c in self.members if c.alive}
            while True:
                try:
                    pid, raw, usage = os.wait4(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                if pid in by_pid:
                    by_pid[pid].ended = Ended.from_wait(raw)
                    by_pid[pid].peak_memory = usage.ru_maxrss * 1024
                    by_pid[pid].fresh = True
        done = []
        for child in self.members:
            if child.reap() or child.fresh:
                child.fresh = False
                events = child.read_events()  # an error said just before the end counts
                child.close_pipe()
                done.append((child, events))
        return done

    def terminate(self, children: list[Child], grace: float, signum: int, poll) -> None:
        """Signal the children's groups, wait (polling) up to ``grace``, then kill them."""
        for child in children:
            if child.alive:
                child.signal(signum)
        deadline = time.monotonic() + grace
        while any(c.alive for c in children):
            if time.monotonic() > deadline:
                for child in children:
                    child.signal(signal.SIGKILL)
                deadline = float("inf")
            poll()

    def kill_leftovers(self) -> None:
        """What the roles left running in their process groups."""
        for child in self.members:
            child.signal(signal.SIGKILL)


class Launcher:
    """Starts role processes for a rank (see :class:`ForkLauncher` and ``process/zygote.py``): an
    interface, duck-typed (not ``typing.Protocol``, which thin ranks do not import)."""

    def start(self, role: str, label: str, spec: dict, *, stdin: int | None = None,
              returns: bool = False) -> Child | None: ...

    def check(self, what: str, value) -> str | None: ...

    def close(self) -> None: ...


def descendants(root: int | None = None, spare=()) -> list[int]:
    """Every process below ``root`` (default: this one) in the process tree, from /proc,
    without the subtrees of ``spare``. Orphans of our roles (a double-forked daemon, a
    ``start_new_session`` helper) are reparented to the rank, a child subreaper, so they
    are found here however they detached."""
    root = os.getpid() if root is None else root
    below: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                state, ppid = f.read().rsplit(b")", 1)[1].split()[:2]
        except (OSError, IndexError, ValueError):
            continue
        if state != b"Z":  # a zombie runs nothing: it only waits to be reaped
            below.setdefault(int(ppid), []).append(int(name))
    found, todo = [], [root]
    while todo:
        for pid in below.get(todo.pop(), ()):
            if pid not in spare:
                found.append(pid)
                todo.append(pid)
    return found


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:60]
    except OSError:
        return "?"


def end_descendants(grace: float = 2.0, spare=()) -> list[str]:
    """End what the job's roles left running below this process (SIGTERM, then SIGKILL
    after ``grace`` seconds), reaping each; return them as "pid (command)" for the
    rank's one line. Nothing below a rank outlives it, and nothing keeps the launcher's
    standard output open after the job (``mpiexec`` waits for its end of file)."""
    left = descendants(spare=spare)
    named = [f"{pid} ({_command(pid)})" for pid in left]
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 1.0)):
        for pid in left:
            try:
                os.kill(pid, signum)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            _reap_any()
            left = descendants(spare=spare)
            if left:
                time.sleep(0.02)
        if not left:
            break
    _reap_any()
    return named


def _reap_any() -> None:
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def die_with(parent: int, wait: float = 0.0) -> None:
    """End this process (SIGTERM) when ``parent`` dies; exit now if it is already gone.

    ``wait``: how long to wait for ``parent`` to become our parent (a role forked by the
    zygote through an intermediate process is reparented to the rank, a subreaper)."""
    deadline = time.monotonic() + wait
    while os.getppid() != parent and time.monotonic() < deadline:
        time.sleep(0.0005)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the rank's shutdown still signals us
        pass
    if os.getppid() != parent:
        os._exit(1)


def become_subreaper() -> bool:
    """Orphaned descendants become our children (PR_SET_CHILD_SUBREAPER, Linux)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    except Exception:
        return False


def enter_role(parent: int, stdin: int | None, wait: float = 0.0) -> None:
    """What every role process does first, whoever forked it."""
    os.setpgid(0, 0)  # our own group, signalled as a whole by the rank
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    die_with(parent, wait)
    if stdin is None:
        stdin = os.open(os.devnull, os.O_RDONLY)
    if stdin != 0:
        os.dup2(stdin, 0)
        os.close(stdin)
    if "mpi4py.MPI" not in sys.modules:
        try:  # `import mpi4py.MPI` in a role must not start MPI with the rank's identity
            import mpi4py

            mpi4py.rc.initialize = False
            mpi4py.rc.finalize = False
        except ImportError:
            pass


class ForkLauncher:
    """Forks role processes from this very process (used where MPI is already initialized
    in it and no zygote could be forked before; sets the fabrics' fork-safety variables)."""

    def __init__(self, run_role):
        self.run_role = run_role  # (role, spec, channel) -> status
        for key, value in FORK_SAFETY.items():
            os.environ.setdefault(key, value)

    def start(self, role, label, spec, *, stdin=None, returns=False):
        read_fd, write_fd = os.pipe()
        parent = os.getpid()
        flush()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with MPI's threads
            pid = os.fork()
        if pid:
            os.close(write_fd)
            if stdin is not None:
                os.close(stdin)
            os.set_blocking(read_fd, False)
            return Child(role, label, pid, read_fd, spec)
        os.close(read_fd)
        enter_role(parent, stdin)
        channel = Channel(write_fd)
        if returns:
            os.set_inheritable(write_fd, False)
            tee(spec.log)  # --record: initialize()'s script, copied to its log too
            raise BecomeClient(spec.address, spec.credentials)
        run_body(lambda ch: self.run_role(role, spec, ch), channel, spec)

    def check(self, what, value):
        from dask_mpi_launch.roles.run import run_check

        return run_check(what, value)

    def close(self) -> None:
        pass


def exit_rank(status: int) -> None:
    """End a rank whose MPI is finalized: C ``exit()`` without the interpreter's teardown.

    ``os._exit`` skips the MPI library's own exit handlers and MPICH's launcher then takes
    the rank for dead and kills the others (status 9); the interpreter's teardown can free
    MPI objects after finalization. C ``exit()`` runs the library's handlers only.
    """
    flush()
    try:
        import ctypes

        ctypes.CDLL(None).exit(status)
    finally:
        os._exit(status)


class StdinRelay:
    """The job's standard input, for a client on another rank than the one that gets it.

    Launchers give stdin to rank 0 only (the other ranks get a pipe that never closes, and
    a script reading it would hang). Rank 0 reads it and sends it on; the client's rank
    writes it into a pipe that is the client's stdin, and closes it at end of file.
    """

    CHUNK = 65536

    def __init__(self):
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self.pending = bytearray()
        self.eof = False

    def take_read_end(self) -> int:
        fd, self.read_fd = self.read_fd, -1
        return fd

    def feed(self, text: str) -> None:
        """Data from rank 0 (latin-1 text, so any control plane carries it); '' is EOF."""
        if text:
            self.pending += text.encode("latin-1")
        else:
            self.eof = True
        self.pump()

    def pump(self) -> None:
        while self.pending and self.write_fd >= 0:
            try:
                n = os.write(self.write_fd, self.pending[:self.CHUNK])
            except BlockingIOError:
                return
            except OSError as e:  # the client is gone or closed stdin: drop the rest
                if e.errno in (errno.EPIPE, errno.EBADF):
                    self.pending.clear()
                    break
                raise
            del self.pending[:n]
        if self.eof and not self.pending and self.write_fd >= 0:
            os.close(self.write_fd)  # the client reads end of file
            self.write_fd = -1

    @property
    def waiting(self) -> bool:
        return self.write_fd >= 0 and bool(self.pending)

    def close(self) -> None:
        for name in ("read_fd", "write_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


def read_stdin() -> str | None:
    """What is on our stdin now, as latin-1 text: '' at end of file, None if nothing."""
    import select

    try:
        if not select.select([0], [], [], 0)[0]:
            return None
        data = os.read(0, StdinRelay.CHUNK)
    except (OSError, ValueError):
        return ""
    return data.decode("latin-1")
