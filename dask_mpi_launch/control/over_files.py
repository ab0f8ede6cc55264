"""A control plane without MPI: messages through files in a shared directory.

For sites where mpi4py cannot match the site's MPI (``--bootstrap slurm``): each task knows
its rank and the number of tasks from Slurm (``SLURM_PROCID``, ``SLURM_NTASKS``), and the
ranks exchange the same small messages as over MPI (``control/over_mpi.py``) through a directory
scoped to the job step, on a file system every node sees. Every wait is bounded; the
directory is removed at the end.

Layout under ``--bootstrap-dir``::

    dask-mpi-launch-<jobid>.<stepid>/        the step directory: 0700, ours, never a symlink
        hello-<rank>-<nonce>                 rank > 0 asks rank 0 for this run's directory
        welcome-<rank>-<nonce>               rank 0's answer: {"run": "run.<random>"}
        run.<random>/                        this run's directory, made fresh by rank 0
            inbox-<rank>/<seq>-<sender>.msg  one message (JSON), written atomically,
                                             deleted by the rank that reads it
            reduce-<round>/<rank>            one rank's value for a bounded all-reduce
            left/<rank>                      the rank has finished (rank 0 then cleans up)

Security (the directory is often on a shared scratch file system, ``/scratch`` is 1777;
the checks are ``security/trust.py``'s, shared with the scheduler file):

* every directory is made 0700 and every file 0600 at its creation (``mkdir(mode=0o700)``,
  ``open(O_CREAT | O_EXCL, 0o600)``: a umask only removes bits), and checked with
  ``fstat`` on the descriptor that is then used;
* a step directory that is a symbolic link, not owned by the user, or writable by the group
  or others is refused with one line (someone else made it: what it holds cannot be
  trusted); one that others can merely read is made 0700. Everything below it is reached
  through directory descriptors (``openat``), so renaming it afterwards changes nothing;
* messages are plain data (JSON with tuples and dicts tagged), never unpickled;
* a message is deleted as soon as it is read: the job's TLS key (in the ``address``
  message) stays on disk only between its send and its receipt, 0600 in 0700 directories.

Each run starts clean, whatever an earlier run of the same job step (a requeued job keeps
its ``SLURM_JOB_ID``) left behind after a crash: rank 0 deletes every earlier run
directory and makes a new one with a random name; every other rank picks a random nonce,
leaves ``hello-<rank>-<nonce>`` and only follows a ``welcome-<rank>-<nonce>`` with that
very nonce, which only the current rank 0 can have written (after the hello). No clock is
compared, so skew between nodes does not matter. Sends before that answer are queued;
every wait for it is one of the caller's bounded waits (``poll``, the all-reduces).

A rank killed mid-job (out of memory, a node lost) cannot be noticed the way MPI does: each
rank rewrites ``alive-<rank>`` (a counter) as it polls, rank 0 watches every rank and the
others watch rank 0. A counter that has not changed for ``dead_after`` seconds (measured by
the watcher's own clock: no clocks compared) makes the watcher say so, once for the job
(``dead-<rank>``, made with O_EXCL, says who said it): a ``fail`` message for the
supervisor, which stops the job; the all-reduces then leave dead ranks out.
``DASK_MPI_LAUNCH__BOOTSTRAP_PEER_TIMEOUT`` sets ``dead_after`` (default 60 s).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import socket
import stat
import time

from dask_mpi_launch.base.messages import Fail, Stop
from dask_mpi_launch.base.status import FAILED
from dask_mpi_launch.base.errors import LaunchError, UsageError
from dask_mpi_launch.security.trust import Unsafe as UnsafeDirectory, open_private_dir, remove

POLL = 0.02  # seconds between looks at the file system while waiting
MAX_MESSAGE = 16 << 20  # bytes; a longer file is not a message of ours
DEAD_AFTER = 60.0  # seconds without a heartbeat after which a rank is said to be dead

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_RUN = re.compile(r"run\.[0-9a-f]{32}")
_HELLO = re.compile(r"hello-([0-9]+)-([0-9a-f]{32})")


# ---------------------------------------------------------------------------
# messages as plain data


def encode(message: tuple) -> bytes:
    """A message as JSON text: None, bool, int, float, str and lists as themselves, tuples
    as ``{"t": [...]}``, dicts as ``{"d": [[key, value], ...]}``; anything else is an
    error (it would not arrive as it was sent)."""
    return json.dumps(_pack(tuple(message)), separators=(",", ":")).encode()


def decode(data: bytes) -> tuple:
    """The message of :func:`encode`'s text; ValueError if it is not one."""
    try:
        value = _unpack(json.loads(data))
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not (isinstance(value, tuple) and value and isinstance(value[0], str)):
        raise ValueError("not a message: no (kind, ...) tuple")
    return value


def _pack(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_pack(v) for v in value]
    if isinstance(value, tuple):
        return {"t": [_pack(v) for v in value]}
    if isinstance(value, dict):
        return {"d": [[_pack(k), _pack(v)] for k, v in value.items()]}
    raise TypeError(f"a {type(value).__name__} cannot be sent between ranks through files")


def _unpack(value):
    if isinstance(value, list):
        return [_unpack(v) for v in value]
    if isinstance(value, dict):
        if value.keys() == {"t"} and isinstance(value["t"], list):
            return tuple(_unpack(v) for v in value["t"])
        if value.keys() == {"d"} and isinstance(value["d"], list):
            out = {}
            for pair in value["d"]:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise ValueError("a dict entry is not a [key, value] pair")
                key = _unpack(pair[0])
                if isinstance(key, (list, dict)):
                    raise ValueError("a dict key is not hashable")
                try:
                    out[key] = _unpack(pair[1])
                except TypeError:  # a tuple holding a list
                    raise ValueError("a dict key is not hashable") from None
            return out
        raise ValueError("an object that is not a tagged tuple or dict")
    return value


# ---------------------------------------------------------------------------
# private directories and files, reached through descriptors


def _write_new(dir_fd: int, path: str, data: bytes) -> None:
    """Write ``path`` (relative to ``dir_fd``) atomically: a new private temporary file
    (0600 from its creation, never an existing file or a link), then renamed."""
    head, _, tail = path.rpartition("/")
    tmp = f"{head + '/' if head else ''}.{tail}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, _NEW_FILE, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


def _read(dir_fd: int, path: str, take: bool = False) -> bytes | None:
    """The bytes of regular file ``path`` of ours (relative to ``dir_fd``), or None; with
    ``take`` the file is deleted once read."""
    try:
        fd = os.open(path, _READ, dir_fd=dir_fd)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        ok = stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
        data = f.read(MAX_MESSAGE + 1) if ok else None
    if take:
        try:
            os.unlink(path, dir_fd=dir_fd)
        except OSError:
            pass
    if data is None or len(data) > MAX_MESSAGE:
        return None
    return data


def _mkdir(dir_fd: int, path: str) -> None:
    try:
        os.mkdir(path, 0o700, dir_fd=dir_fd)
    except FileExistsError:
        pass


def _remove(dir_fd: int, name: str) -> None:
    remove(name, dir_fd)  # a file or a tree, never following a link (security/trust.py)


# ---------------------------------------------------------------------------
# the control plane


class FileControl:
    """The interface of ``control.Control``, through files in the step directory
    ``directory`` (made if missing; see the module's text)."""

    def __init__(self, directory: str, rank: int, size: int, *,
                 dead_after: float = DEAD_AFTER):
        self.rank = rank
        self.size = size
        self.dead_after = float(dead_after)
        self.host = socket.gethostname()
        self._beats = 0
        self._next_beat = 0.0
        self._heard: dict[int, tuple[bytes, float]] = {}  # rank -> (heartbeat, seen since)
        self._dead: set[int] = set()
        self.directory = os.path.abspath(directory)
        self._seq = 0
        self._round = 0
        self._loopback: list[tuple] = []
        self._outbox: list[tuple[int, bytes]] = []  # before this run's directory is known
        self._inboxes: set[int] = set()  # inbox directories known to exist
        self._all_joined = False  # rank 0: every rank found the run (an all-reduce ended)
        self._inbox_fd: int | None = None
        self._run_fd: int | None = None
        self._closed = False
        parent, name = os.path.split(self.directory)
        self._name = name
        self._parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._step_fd = open_private_dir(name, self._parent_fd, create=True)
        except BaseException:
            os.close(self._parent_fd)
            raise
        if rank == 0:
            self._start_run()
        else:
            self._nonce = secrets.token_hex(16)
            _write_new(self._step_fd, f"hello-{rank}-{self._nonce}", b"")

    def _start_run(self) -> None:
        """Rank 0: delete what earlier runs of this step left, make this run's directory."""
        for entry in os.listdir(self._step_fd):
            if not entry.startswith(("hello-", ".hello-")):  # this run's, maybe
                _remove(self._step_fd, entry)
        self.run = f"run.{secrets.token_hex(16)}"
        os.mkdir(self.run, 0o700, dir_fd=self._step_fd)
        self._joined(open_private_dir(self.run, self._step_fd))

    def _joined(self, run_fd: int) -> None:
        self._run_fd = run_fd
        _mkdir(run_fd, f"inbox-{self.rank}")
        self._inbox_fd = open_private_dir(f"inbox-{self.rank}", run_fd)
        outbox, self._outbox = self._outbox, []
        for dest, data in outbox:
            self._deliver(dest, data)

    def _join(self) -> bool:
        """Whether this rank knows this run's directory (rank > 0 looks for rank 0's
        welcome; rank 0 answers the hellos)."""
        if self.rank == 0:
            self._welcome()
            return True
        if self._run_fd is not None:
            return True
        data = _read(self._step_fd, f"welcome-{self.rank}-{self._nonce}", take=True)
        if data is None:
            return False
        try:
            run = json.loads(data)["run"]
        except (ValueError, KeyError, TypeError):
            return False
        if not isinstance(run, str) or not _RUN.fullmatch(run):
            return False
        try:
            run_fd = open_private_dir(run, self._step_fd)
        except (OSError, UnsafeDirectory) as e:
            raise LaunchError(f"the run directory {self.directory}/{run} is not usable: {e}")
        self.run = run
        self._joined(run_fd)
        return True

    def _welcome(self) -> None:
        """Rank 0: tell every rank that said hello where this run's directory is."""
        if self._all_joined:
            return
        for entry in os.listdir(self._step_fd):
            found = _HELLO.fullmatch(entry)
            if found and 0 < int(found[1]) < self.size:
                _write_new(self._step_fd, f"welcome-{found[1]}-{found[2]}",
                           json.dumps({"run": self.run}).encode())
                try:
                    os.unlink(entry, dir_fd=self._step_fd)
                except OSError:
                    pass

    # -- point to point ---------------------------------------------------
    def send(self, dest: int, *message) -> None:
        data = encode(message)  # an unsendable message fails here, on the sender
        if dest == self.rank:
            self._loopback.append(message)
        elif self._run_fd is None:
            self._outbox.append((dest, data))
        else:
            self._deliver(dest, data)

    def _deliver(self, dest: int, data: bytes) -> None:
        if dest not in self._inboxes:
            _mkdir(self._run_fd, f"inbox-{dest}")
            self._inboxes.add(dest)
        self._seq += 1
        _write_new(self._run_fd, f"inbox-{dest}/{self._seq:08d}-{self.rank}.msg", data)

    def broadcast(self, *message) -> None:
        for dest in range(self.size):
            if dest != self.rank:
                self.send(dest, *message)

    def poll(self) -> list[tuple]:
        """All messages that have arrived, without waiting."""
        if self._closed or not self._join():
            received, self._loopback = self._loopback, []
            return received
        self._heartbeat()
        received, self._loopback = self._loopback, []
        try:
            names = sorted(n for n in os.listdir(self._inbox_fd) if n.endswith(".msg"))
        except OSError:
            return received
        for name in names:
            data = _read(self._inbox_fd, name, take=True)
            if data is None:
                continue
            try:
                received.append(decode(data))
            except ValueError:
                continue  # not a message of ours
        return received

    def flush(self, timeout: float) -> None:
        """Wait up to ``timeout`` s until the messages sent are on disk (only sends made
        before rank 0 said where this run's directory is can be waiting)."""
        deadline = time.monotonic() + timeout
        while self._outbox and not self._closed and not self._join():
            if time.monotonic() > deadline:
                return
            time.sleep(POLL)

    # -- collectives with a bound ----------------------------------------
    def _allreduce(self, value: int, combine, timeout: float, poll) -> int | None:
        self._round += 1
        folder = f"reduce-{self._round}"
        deadline = time.monotonic() + timeout
        values: dict[int, int] = {}
        while True:
            if self._join():
                if not values:
                    _mkdir(self._run_fd, folder)
                    _write_new(self._run_fd, f"{folder}/{self.rank}", str(int(value)).encode())
                    values[self.rank] = int(value)
                for rank in range(self.size):
                    if rank not in values:
                        data = _read(self._run_fd, f"{folder}/{rank}")
                        try:
                            values[rank] = int(data)
                        except (TypeError, ValueError):
                            pass
                looked = self._heartbeat()  # dead ranks: looked for only now and then
                if len(values) == self.size or self._only_dead_missing(values, looked):
                    self._all_joined = True
                    return combine(values.values())
            if time.monotonic() > deadline:
                return None
            if poll is not None:
                poll()
            time.sleep(POLL)

    # -- ranks that died -------------------------------------------------
    def _heartbeat(self) -> bool:
        """Every ``dead_after / 10`` s: this rank's heartbeat, and a look at the ranks
        it watches (rank 0: all; the others: rank 0); what it finds is polled next.
        Whether it was time to."""
        now = time.monotonic()
        if now < self._next_beat or self._run_fd is None:
            return False
        self._next_beat = now + max(self.dead_after / 10, 0.01)
        self._beats += 1
        _write_new(self._run_fd, f"alive-{self.rank}",
                   json.dumps([self._beats, self.host]).encode())
        for rank in range(1, self.size) if self.rank == 0 else (0,):
            if rank in self._dead:
                continue
            beat = _read(self._run_fd, f"alive-{rank}")
            if beat is None:
                continue  # not started: the first all-reduce bounds that wait
            last = self._heard.get(rank)
            if last is None or last[0] != beat:
                self._heard[rank] = (beat, now)
            elif now - last[1] > self.dead_after:
                self._dead.add(rank)
                self._loopback.append(_death_message(self._run_fd, rank, beat, self.dead_after))
        return True

    def _only_dead_missing(self, values: dict, look: bool) -> bool:
        """Whether every rank missing from ``values`` is known dead (``look``: also
        from the other ranks' ``dead-<rank>`` files)."""
        missing = [r for r in range(self.size) if r not in values]
        if not look:
            return set(missing) <= self._dead
        for rank in missing:
            if rank not in self._dead:
                try:
                    os.stat(f"dead-{rank}", dir_fd=self._run_fd)
                except OSError:
                    return False
                self._dead.add(rank)
        return True

    def allreduce_max(self, value: int, timeout: float, poll=None) -> int | None:
        return self._allreduce(value, max, timeout, poll)

    def allreduce_sum(self, value: int, timeout: float, poll=None) -> int | None:
        return self._allreduce(value, sum, timeout, poll)

    def finish(self) -> None:
        pass

    def finalize(self) -> None:
        """The job's end (after the last all-reduce): every rank says it has left, and rank 0
        removes the step directory once all have (bounded)."""
        if self._closed:
            return
        if self.rank != 0:
            if self._run_fd is not None:
                _mkdir(self._run_fd, "left")
                _write_new(self._run_fd, f"left/{self.rank}", b"")
                if 0 in self._dead and self._cleaner():  # rank 0 died: it cannot clean up
                    self._wait_left(self.size - len(self._dead))
                    self._remove_step_directory()
            self._close()
            return
        _mkdir(self._run_fd, "left")
        self._wait_left(self.size - 1 - len(self._dead))
        self._remove_step_directory()
        self._close()

    def _wait_left(self, ranks: int) -> None:
        """Until ``ranks`` ranks have left (at most 10 s: a rank that died unnoticed)."""
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            try:
                if len(_list(self._run_fd, "left")) >= ranks:
                    return
            except OSError:
                return
            time.sleep(POLL)

    def _cleaner(self) -> bool:
        """Whether this rank is the one (the first to ask) that removes the step directory
        in rank 0's place: a run whose rank 0 died left it behind, for good."""
        try:
            os.close(os.open("cleaner", _NEW_FILE, 0o600, dir_fd=self._run_fd))
        except OSError:
            return False
        return True

    def _remove_step_directory(self) -> None:
        """Remove the step directory we hold, if its name still leads to it."""
        try:
            held = os.fstat(self._step_fd)
            there = os.stat(self._name, dir_fd=self._parent_fd, follow_symlinks=False)
        except OSError:
            return
        if (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino):
            _remove(self._parent_fd, self._name)

    def _close(self) -> None:
        self._closed = True
        for fd in (self._inbox_fd, self._run_fd, self._step_fd, self._parent_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._inbox_fd = self._run_fd = None

    def abort(self, status: int) -> None:
        self.broadcast(*Stop(status, 3))
        os._exit(status)


def _death_message(run_fd: int, rank: int, beat: bytes, dead_after: float) -> tuple:
    """The message saying ``rank`` died: a ``fail`` from the first rank to find it (it
    makes the run's ``dead-<rank>`` file), a plain ``stop`` from the others (the job says
    it once)."""
    try:
        host = str(json.loads(beat)[1])
    except (ValueError, TypeError, IndexError):
        host = "?"
    try:
        os.close(os.open(f"dead-{rank}", _NEW_FILE, 0o600, dir_fd=run_fd))
    except FileExistsError:
        return tuple(Stop(1, FAILED))
    return tuple(Fail(rank, host, "its supervisor",
                      f"no sign of life for {dead_after:g} s: killed, out of memory, or its "
                      "node failed", 1, FAILED))


def _list(dir_fd: int, name: str) -> list[str]:
    """The entries of subdirectory ``name`` of ``dir_fd``."""
    fd = os.open(name, _DIR, dir_fd=dir_fd)
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def peer_timeout(env=os.environ) -> float:
    """``DASK_MPI_LAUNCH__BOOTSTRAP_PEER_TIMEOUT``, checked like every duration option:
    0 or -5 were taken, and every healthy run then failed ("no sign of life for -5 s")."""
    from dask_mpi_launch.configure.settings import parse_timeout

    value = env.get("DASK_MPI_LAUNCH__BOOTSTRAP_PEER_TIMEOUT")
    if value is None:
        return DEAD_AFTER
    return parse_timeout(value, "DASK_MPI_LAUNCH__BOOTSTRAP_PEER_TIMEOUT")


def from_slurm(directory: str, env=os.environ) -> FileControl:
    """Rank and size from Slurm, the exchange directory scoped to this job step."""
    try:
        rank, size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        job = env["SLURM_JOB_ID"]
    except (KeyError, ValueError):
        raise UsageError(
            "--bootstrap slurm needs to run as the tasks of a Slurm job step "
            "(srun dask-mpi-launch --bootstrap slurm ...): SLURM_PROCID, SLURM_NTASKS and "
            "SLURM_JOB_ID are not all set"
        ) from None
    step = env.get("SLURM_STEP_ID", "batch")
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(
            f"--bootstrap-dir {directory} is not a writable directory: give one on a file "
            "system every node of the job sees (the home or project directory)"
        )
    path = os.path.join(os.path.abspath(directory), f"dask-mpi-launch-{job}.{step}")
    dead_after = peer_timeout(env)
    try:
        return FileControl(path, rank, size, dead_after=dead_after)
    except UnsafeDirectory as e:
        raise UsageError(
            f"--bootstrap slurm: {path} {e}: another user may have made it to read or plant "
            "messages; remove it, or give a --bootstrap-dir only you can write to (e.g. $HOME)"
        ) from None
    except OSError as e:
        raise LaunchError(f"--bootstrap slurm: cannot use {path}: {e.strerror or e}") from None
