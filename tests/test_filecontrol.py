"""--bootstrap slurm's control plane (control/over_files.py) driven in-process: several FileControl
objects with different ranks over one directory. The launches are in test_bootstrap_slurm.py."""
import os
import pickle
import pwd
import shutil
import socket
import stat
import tempfile
import threading
import time

import pytest

from conftest import unavailable
from dask_mpi_launch.base.errors import UsageError
from dask_mpi_launch.control.over_files import FileControl, UnsafeDirectory, decode, encode, from_slurm

KEY = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49\n-----END PRIVATE KEY-----\n"

# every kind of message the supervisor and --check send, with the types they carry
MESSAGES = [
    ("address", {"address": "tls://10.0.0.1:8786", "identity": {"type": "Scheduler",
                 "id": "Scheduler-1", "workers": {}, "started": 1.5e9},
                 "dashboard": None, "name_prefix": None, "host": "n1",
                 "interfaces": {"lo": ["127.0.0.1/8"], "ib0": ["10.0.0.1/24"]},
                 "credentials": {"ca": "CA", "cert": "CERT", "key": KEY}}),
    ("hello", 3, "n2", ("worker",)),
    ("ready", 3, "n2", ["3", "3-1"]),
    ("all-ready", 14),
    ("fail", 3, "n2", "worker", "the worker 3 process was killed by signal 9", 1, 3),
    ("stop", 0, 2),
    ("closed", 3),
    ("jupyter", "http://n1:8888/lab?token=abc"),
    ("check-failed", 2, "n2", "worker", "no such interface: ib1", 2),
    ("check-hello", 1, "n2", {"lo": ("127.0.0.1", 40001), "eth0": "cannot listen on x"}),
    ("check-result", 1, "n2", [("n2", "ib0", "n1", None), ("n2", "eth0", "n1", "timed out")]),
    ("odd", {1: "int key", (1, "a"): "tuple key", "nested": [(1, [2.5, True])]}, float("inf")),
]


def controls(directory, size, order=None):
    return {r: FileControl(str(directory), r, size) for r in (order or range(size))}


def exchange(ranks, expect, timeout=10.0):
    """Poll every rank until each has ``expect[rank]`` messages; {rank: messages}."""
    got = {r: [] for r in ranks}
    deadline = time.monotonic() + timeout
    while any(len(got[r]) < expect.get(r, 0) for r in ranks):
        assert time.monotonic() < deadline, got
        for r, c in ranks.items():
            got[r] += c.poll()
        time.sleep(0.005)
    for r, c in ranks.items():
        got[r] += c.poll()
    return got


def allreduce(ranks, values, timeout=10.0):
    out = {}

    def one(r):
        out[r] = ranks[r].allreduce_max(values[r], timeout)

    threads = [threading.Thread(target=one, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    return out


def modes(directory):
    """{relative path: permission bits} of everything under ``directory`` (not followed)."""
    found = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, directory)] = stat.S_IMODE(os.lstat(path).st_mode)
    return found


def as_user(user, fn):
    """Run ``fn()`` in a forked child as ``user`` (we are root); fail if it fails."""
    if os.geteuid() != 0:
        unavailable("planting files as another user needs root (to become that user)")
    entry = pwd.getpwnam(user)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            fn()
            status = 0
        finally:
            os._exit(status)
    _, wait = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait) == 0, f"{fn} failed as {user}"


@pytest.fixture
def scratch():
    """A world-writable sticky directory like /scratch, that ``nobody`` can reach."""
    path = tempfile.mkdtemp(prefix="dml-scratch-", dir="/tmp")
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Evil:
    """Unpickling this creates the file ``path``: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


# ---------------------------------------------------------------------------
# messages are plain data


@pytest.mark.parametrize("message", MESSAGES, ids=[m[0] for m in MESSAGES])
def test_every_message_kind_arrives_as_sent(tmp_path, message):
    assert decode(encode(message)) == message
    ranks = controls(tmp_path / "step", 2)
    ranks[0].send(1, *message)
    got = exchange(ranks, {1: 1})[1]
    assert got == [message]
    assert [type(v) for v in got[0]] == [type(v) for v in message]  # tuples stay tuples


def test_a_pickle_is_never_loaded(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(ValueError):
        decode(pickle.dumps(("address", Evil(marker))))
    for text in [b'{"t": 1}', b'[1, 2]', b'{"t": []}', b'{"x": 1}', b'{"t": [{"d": [[[1], 2]]}]}',
                 b"[" * 100000]:
        with pytest.raises(ValueError):
            decode(text)
    assert not marker.exists()


def test_unsendable_value_fails_on_the_sender(tmp_path):
    ranks = controls(tmp_path / "step", 2)
    with pytest.raises(TypeError, match="set cannot be sent"):
        ranks[0].send(1, "odd", {1, 2})


# ---------------------------------------------------------------------------
# private from their creation


def test_files_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        ranks = controls(tmp_path / "step", 3, order=[2, 0, 1])
        ranks[0].broadcast(*MESSAGES[0])  # the TLS key
        ranks[1].send(0, "hello", 1, "n1", ("client",))
        exchange({0: ranks[0], 1: ranks[1]}, {0: 1, 1: 1})
        assert allreduce(ranks, {0: 1, 1: 2, 2: 3}) == {0: 3, 1: 3, 2: 3}
        ranks[1].send(2, "stop", 0, 1)  # one unread message stays on disk
        found = modes(tmp_path / "step")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "step").st_mode) == 0o700
    assert any(p.endswith(".msg") for p in found) and any("reduce-1" in p for p in found), found
    exposed = {p: f"{m:04o}" for p, m in found.items()
               if m != (0o700 if os.path.isdir(tmp_path / "step" / p) else 0o600)}
    assert exposed == {}
    # the key is on disk only until read: rank 1 read it, rank 2 not yet
    assert keys_on_disk(tmp_path / "step") == ["inbox-2"], found
    assert exchange(ranks, {2: 2})[2] == [MESSAGES[0], ("stop", 0, 1)]
    assert keys_on_disk(tmp_path / "step") == []


def keys_on_disk(directory):
    return sorted(os.path.basename(os.path.dirname(p)) for p in modes(directory)
                  if p.endswith(".msg") and "BEGIN PRIVATE KEY" in (directory / p).read_text())


def test_a_directory_only_others_can_read_is_made_private(tmp_path):
    (tmp_path / "step").mkdir(mode=0o755)
    os.chmod(tmp_path / "step", 0o755)
    FileControl(str(tmp_path / "step"), 1, 2)
    assert stat.S_IMODE(os.stat(tmp_path / "step").st_mode) == 0o700


# ---------------------------------------------------------------------------
# a step directory someone else made


def test_a_step_directory_another_user_planted_is_refused(scratch):
    """In a 1777 scratch directory, nobody made our step directory and put a pickle in
    rank 1's inbox: every rank refuses it, and nothing of it is loaded."""
    step = os.path.join(scratch, "dask-mpi-launch-77.0")
    marker = os.path.join(scratch, "pwned")

    def plant():
        os.mkdir(step, 0o777)
        os.chmod(step, 0o777)
        os.mkdir(os.path.join(step, "inbox-1"), 0o777)
        with open(os.path.join(step, "inbox-1", "00000001-0.msg"), "wb") as f:
            pickle.dump(("address", Evil(marker)), f)

    as_user("nobody", plant)
    for rank in range(3):
        with pytest.raises(UnsafeDirectory, match="belongs to user nobody"):
            FileControl(step, rank, 3)
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "3", "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0"}
    with pytest.raises(UsageError) as e:
        from_slurm(scratch, env)
    assert str(e.value) == (
        f"--bootstrap slurm: {step} belongs to user nobody, not to you: another user may have "
        "made it to read or plant messages; remove it, or give a --bootstrap-dir only you can "
        "write to (e.g. $HOME)")
    assert not os.path.exists(marker)
    assert os.stat(step).st_uid == pwd.getpwnam("nobody").pw_uid  # left as it was


def test_a_planted_symbolic_link_is_refused(scratch):
    step = os.path.join(scratch, "dask-mpi-launch-78.0")
    target = os.path.join(scratch, "theirs")

    def plant():
        os.mkdir(target, 0o700)
        os.symlink(target, step)

    as_user("nobody", plant)
    with pytest.raises(UnsafeDirectory, match="is a symbolic link"):
        FileControl(step, 0, 2)
    assert os.listdir(target) == []


def test_our_directory_that_others_can_write_is_refused(tmp_path):
    (tmp_path / "step").mkdir()
    os.chmod(tmp_path / "step", 0o770)  # a group project directory's umask
    with pytest.raises(UnsafeDirectory, match=r"is writable by others \(mode 0770\)"):
        FileControl(str(tmp_path / "step"), 0, 2)


def test_a_clean_run_in_a_shared_scratch_directory(scratch):
    step = os.path.join(scratch, "dask-mpi-launch-79.0")
    ranks = controls(step, 3)
    ranks[0].broadcast("all-ready", 1)
    assert exchange(ranks, {1: 1, 2: 1})[2] == [("all-ready", 1)]
    assert allreduce(ranks, {0: 0, 1: 5, 2: 1}) == {0: 5, 1: 5, 2: 5}
    for r in (2, 1, 0):
        ranks[r].finalize()
    assert os.listdir(scratch) == []


# ---------------------------------------------------------------------------
# each run starts clean


def test_a_rerun_never_reads_what_a_crashed_run_left(tmp_path):
    """A requeued job keeps its job and step id: the new run must not read the address
    the dead run sent, nor follow its answers to the hellos."""
    step = tmp_path / "step"
    dead = controls(step, 3, order=[1, 0, 2])
    dead[0].poll()  # answers rank 1's hello (rank 1 dies before reading the answer)
    dead[0].broadcast("address", {"address": "tcp://dead:1"})
    dead[2].poll()  # rank 2 found the dead run (and dies before reading its inbox)
    dead[2].send(0, "ready", 2, "n2", ["2"])
    for c in dead.values():
        c._close()  # killed: nothing cleaned up
    stale = os.listdir(step)
    assert any(n.startswith("run.") for n in stale) and any(n.startswith("welcome-")
                                                            for n in stale), stale
    # the new run: its ranks 1 and 2 start before its rank 0
    new = controls(step, 3, order=[1, 2, 0])
    assert [n for n in os.listdir(step) if n.startswith("run.")] == [new[0].run]
    new[0].broadcast("address", {"address": "tcp://new:1"})
    got = exchange(new, {1: 1, 2: 1})
    assert got == {0: [], 1: [("address", {"address": "tcp://new:1"})],
                   2: [("address", {"address": "tcp://new:1"})]}
    assert new[1].run == new[2].run == new[0].run
    assert allreduce(new, {0: 1, 1: 1, 2: 1}) == {0: 1, 1: 1, 2: 1}
    for r in (1, 2, 0):
        new[r].finalize()
    assert not step.exists()


# ---------------------------------------------------------------------------
# bounded


def test_without_rank_0_every_wait_is_bounded(tmp_path):
    alone = FileControl(str(tmp_path / "step"), 1, 3)
    alone.send(0, "hello", 1, "n1", ("client",))
    alone.send(1, "closed", 1)
    t0 = time.monotonic()
    assert alone.poll() == [("closed", 1)]  # to itself: at once
    alone.flush(0.2)
    assert alone.allreduce_sum(1, 0.3) is None
    assert time.monotonic() - t0 < 5
    alone.finalize()
    assert os.listdir(tmp_path / "step") != []  # rank 0 cleans up, and it never came


# ---------------------------------------------------------------------------
# a rank that dies mid-job


def _poll_until(ranks, predicate, timeout=10.0):
    got = {r: [] for r in ranks}
    deadline = time.monotonic() + timeout
    while not predicate(got):
        assert time.monotonic() < deadline, got
        for r, c in ranks.items():
            got[r] += c.poll()
        time.sleep(0.01)
    return got


def test_a_worker_rank_that_dies_is_reported_by_rank_0_once(tmp_path):
    ranks = {r: FileControl(str(tmp_path / "step"), r, 3, dead_after=0.3) for r in range(3)}
    assert allreduce(ranks, {0: 0, 1: 0, 2: 0}) == {0: 0, 1: 0, 2: 0}
    for c in ranks.values():
        c.poll()  # everyone beats once
    del ranks[2]  # killed: no more heartbeats
    t0 = time.monotonic()
    got = _poll_until(ranks, lambda g: g[0])
    assert time.monotonic() - t0 < 5
    [(kind, rank, host, role, text, status, priority)] = got[0]
    assert (kind, rank, role, status, priority) == ("fail", 2, "its supervisor", 1, 3), got
    assert text == "no sign of life for 0.3 s: killed, out of memory, or its node failed"
    assert host == socket.gethostname()
    assert got[1] == []  # rank 1 watches rank 0 only
    # the job's last all-reduce leaves the dead rank out, at once
    assert allreduce(ranks, {0: 0, 1: 4}, timeout=30) == {0: 4, 1: 4}


def test_rank_0_dying_is_said_once_by_the_others(tmp_path):
    ranks = {r: FileControl(str(tmp_path / "step"), r, 3, dead_after=0.3) for r in range(3)}
    assert allreduce(ranks, {0: 0, 1: 0, 2: 0}) == {0: 0, 1: 0, 2: 0}
    for c in ranks.values():
        c.poll()
    del ranks[0]
    got = _poll_until(ranks, lambda g: g[1] and g[2])
    kinds = sorted(m[0] for r in (1, 2) for m in got[r])
    assert kinds == ["fail", "stop"], got  # one rank says it, the other just stops
    assert allreduce(ranks, {1: 1, 2: 0}, timeout=30) == {1: 1, 2: 1}


def test_a_slow_rank_is_not_dead(tmp_path):
    ranks = {r: FileControl(str(tmp_path / "step"), r, 2, dead_after=0.5) for r in range(2)}
    assert allreduce(ranks, {0: 0, 1: 0}) == {0: 0, 1: 0}
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:  # both keep polling: no one is said dead
        assert ranks[0].poll() == [] and ranks[1].poll() == []
        time.sleep(0.02)
