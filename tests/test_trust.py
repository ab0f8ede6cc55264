"""Never trust what another user could have written (issue 21, cases 8-11 and the directory
of case 16): the checks of security/trust.py and scheduler_file.py in-process, then real launches under
both MPIs. Another user's files are planted as ``nobody`` in a sticky 1777 directory, like
/scratch (test_filecontrol's ``scratch`` and ``as_user``); we are root, as in the issue."""
import errno
import json
import os
import pwd
import re
import stat
import subprocess
import sys
import time

import pytest

from conftest import unavailable
from dask_mpi_launch.security import scheduler_file
from dask_mpi_launch.security import trust
from dask_mpi_launch.base.errors import LaunchError, UsageError
from dask_mpi_launch.configure.settings import check_scheduler_file
from launch import finish, run, wait_no_leftovers
from test_filecontrol import as_user, scratch  # noqa: F401  (a fixture)
from test_launch import CLIENT, _wait_for_file

HANG = 60
CREDENTIALS = {"ca": "CA PEM", "cert": "CERT PEM", "key": "KEY PEM"}
THEIRS = {"address": "tls://127.0.0.1:1", "type": "Scheduler", "id": "their-scheduler"}


def plant(path, identity=THEIRS, credentials=True):
    """As ``nobody``: a scheduler file naming their cluster, and their credentials."""
    def make():
        with open(path, "w") as f:
            json.dump(identity, f)
        if credentials:
            os.mkdir(f"{path}.credentials", 0o700)
            for name in ("ca.pem", "cert.pem", "key.pem"):
                with open(os.path.join(f"{path}.credentials", name), "w") as f:
                    f.write("THEIRS")

    as_user("nobody", make)


def nobody() -> int:
    """The uid of ``nobody``, to give it our files (we are root)."""
    if os.geteuid() != 0:
        unavailable("giving files to another user needs root")
    return pwd.getpwnam("nobody").pw_uid


# ---------------------------------------------------------------------------
# reading: only what is ours


def test_another_users_scheduler_file_is_refused_with_its_owner(scratch):  # noqa: F811
    path = os.path.join(scratch, "sched.json")
    plant(path)
    with pytest.raises(trust.Untrusted) as e:
        scheduler_file.read(path)
    assert str(e.value) == (
        f"the scheduler file {path} belongs to user nobody, not to you: another user may have "
        "planted it (their cluster would run your code): have it removed, or choose another "
        "--scheduler-file")
    assert e.value.status == 2 and isinstance(e.value, (UsageError, PermissionError))


def test_a_second_user_refuses_roots_file_too(scratch):  # noqa: F811
    """The other way round: nobody, given root's scheduler file, refuses it (root's files
    are no job of theirs either)."""
    path = os.path.join(scratch, "sched.json")
    with open(path, "w") as f:
        json.dump(THEIRS, f)

    def refused():
        try:
            scheduler_file.read(path)
        except trust.Untrusted as e:
            assert f"{path} belongs to user root, not to you" in str(e), e
        else:
            raise AssertionError("root's file was read")

    as_user("nobody", refused)


def test_another_users_credentials_are_refused(scratch):  # noqa: F811
    path = os.path.join(scratch, "sched.json")
    plant(path)
    os.chown(path, 0, 0)  # even beside a scheduler file of ours
    assert scheduler_file.read(path) == THEIRS
    with pytest.raises(trust.Untrusted, match=r"the credentials directory .*\.credentials "
                                              "belongs to user nobody, not to you"):
        scheduler_file.read_credentials(path)


def test_a_file_of_theirs_in_our_credentials_directory_is_refused(tmp_path):
    path = str(tmp_path / "sched.json")
    os.mkdir(f"{path}.credentials", 0o700)
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / "sched.json.credentials" / name).write_text("x")
    os.chown(tmp_path / "sched.json.credentials" / "key.pem", nobody(), -1)
    with pytest.raises(trust.Untrusted, match="key.pem belongs to user nobody"):
        scheduler_file.read_credentials(path)


def test_links_and_writable_files_are_refused(tmp_path):
    ours = tmp_path / "real.json"
    ours.write_text(json.dumps({"address": "tls://127.0.0.1:2"}))
    link = tmp_path / "link.json"
    link.symlink_to(ours)
    with pytest.raises(trust.Untrusted, match="is a symbolic link: links are never followed"):
        scheduler_file.read(str(link))
    os.chmod(ours, 0o666)
    with pytest.raises(trust.Untrusted, match=r"is writable by others \(mode 0666\): "
                                              "anyone who can write it could have changed it"):
        scheduler_file.read(str(ours))
    os.chmod(ours, 0o644)
    assert scheduler_file.read(str(ours)) == {"address": "tls://127.0.0.1:2"}
    assert scheduler_file.read(str(tmp_path / "absent.json")) is None  # not there yet: wait


def test_a_directory_is_no_scheduler_file(tmp_path):
    with pytest.raises(trust.Untrusted) as e:
        check_scheduler_file(str(tmp_path))
    assert str(e.value) == (f"the scheduler file {tmp_path} is a directory: give the path of "
                            f"a file, e.g. {tmp_path}/scheduler.json")
    with pytest.raises(trust.Untrusted, match="is a directory"):
        scheduler_file.read(str(tmp_path))


def test_connect_refuses_another_users_file_at_once(scratch):  # noqa: F811
    from dask_mpi_launch import connect

    path = os.path.join(scratch, "sched.json")
    plant(path)
    start = time.monotonic()
    with pytest.raises(PermissionError) as e:
        connect(path, timeout=30)
    assert time.monotonic() - start < 10  # refused, not waited for
    assert str(e.value) == (
        f"the scheduler file {path} belongs to user nobody, not to you: another user may have "
        "planted it (their cluster would run your code): have it removed, or give another "
        "scheduler file path")


# ---------------------------------------------------------------------------
# writing: anew, privately, never through a link


def test_published_files_and_their_modes(tmp_path):
    path = str(tmp_path / "sched.json")
    old = os.umask(0o002)  # a group project's umask: no group-writable file results
    try:
        made = scheduler_file.publish(path, {"address": "tls://127.0.0.1:3"}, CREDENTIALS)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
        creds = f"{path}.credentials"
        assert stat.S_IMODE(os.stat(creds).st_mode) == 0o700
        assert {n: stat.S_IMODE(os.stat(os.path.join(creds, n)).st_mode)
                for n in os.listdir(creds)} == {"ca.pem": 0o600, "cert.pem": 0o600,
                                                "key.pem": 0o600}
        assert sorted(os.listdir(tmp_path)) == ["sched.json", "sched.json.credentials"]
        assert scheduler_file.read(path) == {"address": "tls://127.0.0.1:3"}
        assert scheduler_file.read_credentials(path) == CREDENTIALS
    finally:
        scheduler_file.remove(made)
    assert os.listdir(tmp_path) == []


def test_temporary_names_cannot_be_guessed():
    names = {trust.temporary_name("sched.json") for _ in range(100)}
    assert len(names) == 100  # 64 random bits each, no pid
    assert all(re.fullmatch(r"\.sched\.json\.[0-9a-f]{16}\.tmp", n) for n in names), names


def test_a_link_planted_at_the_temporary_name_is_never_followed(scratch, monkeypatch):  # noqa: F811
    """Case 9: the old temporary name (<file>.<pid>.tmp), and even the new one if it could
    be guessed: the user's file the link points to is never written."""
    path = os.path.join(scratch, "sched.json")
    victim = os.path.join(scratch, "victim")
    with open(victim, "w") as f:
        f.write("precious")
    monkeypatch.setattr(os, "urandom", lambda n: b"\x01" * n)  # a guessable name
    guessed = os.path.join(scratch, trust.temporary_name("sched.json"))
    as_user("nobody", lambda: (os.symlink(victim, f"{path}.{os.getppid()}.tmp"),
                               os.symlink(victim, guessed)))
    with pytest.raises(LaunchError, match=f"cannot write the scheduler file {path}: "
                                          "File exists"):
        scheduler_file.publish(path, {"address": "tls://127.0.0.1:4"}, CREDENTIALS)
    assert open(victim).read() == "precious"
    # nothing of ours left behind: no scheduler file, no credentials, no temporary file
    assert sorted(os.listdir(scratch)) == sorted(
        ["victim", f"sched.json.{os.getpid()}.tmp", os.path.basename(guessed)])
    monkeypatch.undo()
    made = scheduler_file.publish(path, {"address": "tls://127.0.0.1:4"}, CREDENTIALS)
    scheduler_file.remove(made)
    assert open(victim).read() == "precious"


def test_a_failed_publication_leaves_no_credentials_behind(tmp_path, monkeypatch):
    path = str(tmp_path / "sched.json")
    real = trust.new_file

    def full(name, data, dir_fd=None, mode=0o600):
        if name.startswith(".sched.json.") and not name.startswith(".sched.json.credentials"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(name, data, dir_fd, mode)

    monkeypatch.setattr(trust, "new_file", full)
    with pytest.raises(LaunchError) as e:
        scheduler_file.publish(path, {"address": "tls://127.0.0.1:5"}, CREDENTIALS)
    assert str(e.value) == f"cannot write the scheduler file {path}: No space left on device"
    assert os.listdir(tmp_path) == []


def test_another_users_files_are_never_replaced(scratch):  # noqa: F811
    """Case 11: one line saying what and whose; their files stay as they were."""
    path = os.path.join(scratch, "sched.json")
    plant(path)
    for attempt in (check_scheduler_file, scheduler_file.remove_stale,
                    lambda p: scheduler_file.publish(p, {"address": "tls://x:1"}, CREDENTIALS)):
        with pytest.raises(trust.Untrusted, match=f"^the scheduler file {path} belongs to "
                                                  "user nobody, not to you"):
            attempt(path)
    assert json.load(open(path)) == THEIRS and os.stat(path).st_uid == nobody()
    os.unlink(path)  # their credentials directory alone is in the way too
    with pytest.raises(trust.Untrusted, match=r"the credentials directory .*belongs to user "
                                              "nobody"):
        check_scheduler_file(path)
    assert sorted(os.listdir(scratch)) == ["sched.json.credentials"]


HOLD = """
import sys
from dask_mpi_launch.security import scheduler_file
made = scheduler_file.publish(sys.argv[1], {"address": "tls://127.0.0.1:6"}, {"ca": "a", "cert": "b", "key": "c"})
print("published", flush=True)
sys.stdin.read()
scheduler_file.remove(made)
"""


def test_a_live_jobs_file_is_refused_and_a_stale_one_replaced(tmp_path):
    """Case 10: another process holds the file (as a job's rank 0 does): refused, nothing
    changed; once it is gone without removing it (killed), the file is stale."""
    path = str(tmp_path / "sched.json")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "published\n"
        before = os.stat(path)
        for attempt in (check_scheduler_file, scheduler_file.remove_stale,
                        lambda p: scheduler_file.publish(p, {"address": "tls://x:1"}, CREDENTIALS)):
            with pytest.raises(trust.Untrusted) as e:
                attempt(path)
            assert str(e.value) == (
                f"the scheduler file {path} is in use by a running cluster (tls://127.0.0.1:6): "
                "give this job its own --scheduler-file, or end that cluster first")
        assert os.stat(path).st_ino == before.st_ino
        assert scheduler_file.read_credentials(path) == {"ca": "a", "cert": "b", "key": "c"}
        assert sorted(os.listdir(tmp_path)) == ["sched.json", "sched.json.credentials"]
        os.unlink(path)  # its file deleted by hand: its credentials are still live
        for attempt in (check_scheduler_file,
                        lambda p: scheduler_file.publish(p, {"address": "tls://x:1"}, CREDENTIALS)):
            with pytest.raises(trust.Untrusted) as e:
                attempt(path)
            assert str(e.value) == (
                f"the credentials directory {path}.credentials is in use by a running cluster: "
                "give this job its own --scheduler-file, or end that cluster first")
        assert scheduler_file.read_credentials(path) == {"ca": "a", "cert": "b", "key": "c"}
        assert os.listdir(tmp_path) == ["sched.json.credentials"]
    finally:
        holder.kill()
        holder.wait()
    made = scheduler_file.publish(path, {"address": "tls://127.0.0.1:7"}, CREDENTIALS)  # stale
    assert scheduler_file.read(path)["address"] == "tls://127.0.0.1:7"
    assert scheduler_file.read_credentials(path) == CREDENTIALS
    scheduler_file.remove(made)
    assert os.listdir(tmp_path) == []


def test_what_a_killed_job_left_is_removed_at_the_start(tmp_path):
    path = str(tmp_path / "sched.json")
    (tmp_path / "sched.json").write_text(json.dumps({"address": "tls://127.0.0.1:10"}))
    os.mkdir(f"{path}.credentials", 0o700)
    (tmp_path / "sched.json.credentials" / "key.pem").write_text("old")
    check_scheduler_file(path)  # stale: no job holds it
    scheduler_file.remove_stale(path)
    assert os.listdir(tmp_path) == []


def test_the_end_removes_only_what_this_job_made(tmp_path):
    path = str(tmp_path / "sched.json")
    made = scheduler_file.publish(path, {"address": "tls://127.0.0.1:8"}, CREDENTIALS)
    os.unlink(path)  # someone removed ours and another job wrote its own since
    os.rename(f"{path}.credentials", str(tmp_path / "moved"))
    with open(path, "w") as f:
        json.dump({"address": "tls://127.0.0.1:9"}, f)
    os.mkdir(f"{path}.credentials")
    scheduler_file.remove(made)
    assert json.load(open(path))["address"] == "tls://127.0.0.1:9"
    assert sorted(os.listdir(tmp_path)) == ["moved", "sched.json", "sched.json.credentials"]


# ---------------------------------------------------------------------------
# real launches


def _one_error(out, text):
    """One line of ours, and nothing else from us (Open MPI's launcher adds its own block
    about the non-zero status, as for every failed job)."""
    lines = [line for line in out.output.splitlines() if "dask-mpi-launch" in line]
    assert len(lines) == 1 and text in lines[0], out
    assert lines[0].startswith("dask-mpi-launch: error"), out
    assert "Traceback" not in out.output and "internal error" not in out.output, out


@pytest.mark.mpi
def test_join_mode_refuses_another_users_scheduler_file(venv, scratch):  # noqa: F811
    """Case 8: root's join job must not join nobody's cluster (whose client.run would run
    code as root): one line naming the owner, status 2, nothing left running."""
    path = os.path.join(scratch, "sched.json")
    plant(path)
    out = venv.launch(2, "--no-scheduler", "--scheduler-file", path, "--wait-timeout", "20",
                      timeout=HANG)
    assert out.status == 2, out
    _one_error(out, f"the scheduler file {path} belongs to user nobody, not to you")
    assert out.seconds < HANG / 2, out  # refused, not waited for
    assert wait_no_leftovers(path) == []


@pytest.mark.mpi
def test_cluster_refuses_a_scheduler_file_another_user_planted(venv, scratch):  # noqa: F811
    """Case 11: say what and whose it is (was: "internal error: PermissionError")."""
    path = os.path.join(scratch, "sched.json")
    plant(path)
    out = venv.launch(3, "--scheduler-file", path, timeout=HANG)
    assert out.status == 2, out
    _one_error(out, f"the scheduler file {path} belongs to user nobody, not to you")
    assert json.load(open(path)) == THEIRS and os.stat(path).st_uid == nobody()
    assert sorted(os.listdir(scratch)) == ["sched.json", "sched.json.credentials"]
    assert wait_no_leftovers(path) == []


@pytest.mark.mpi
def test_a_directory_as_scheduler_file(venv, tmp_path):
    """Case 16: one line, status 2 (was: "internal error")."""
    out = venv.launch(3, "--scheduler-file", tmp_path, timeout=HANG)
    assert out.status == 2, out
    _one_error(out, f"the scheduler file {tmp_path} is a directory: give the path of a file")
    assert os.listdir(tmp_path) == []
    out = venv.launch(2, "--no-scheduler", "--scheduler-file", tmp_path, timeout=HANG)
    assert out.status == 2, out
    _one_error(out, f"the scheduler file {tmp_path} is a directory")
    assert wait_no_leftovers(str(tmp_path)) == []


@pytest.mark.mpi
def test_a_live_jobs_scheduler_file_is_refused_to_a_second_job(venv, tmp_path, script):
    """Case 10: job B, given job A's --scheduler-file while A runs, is refused with one line
    and changes nothing: A keeps running, its file and credentials intact, and A's end
    removes them."""
    sched = tmp_path / "scheduler.json"
    creds = tmp_path / "scheduler.json.credentials"
    a = venv.start([venv.mpiexec, "-n", "3", venv.bin / "dask-mpi-launch",
                    "--scheduler-file", sched])
    try:
        assert _wait_for_file(sched, a), finish(a, 5)
        before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in [sched, *creds.iterdir()]}
        b = venv.launch(3, "--scheduler-file", sched, script(CLIENT), timeout=HANG)
        assert b.status == 2, b
        _one_error(b, f"the scheduler file {sched} is in use by a running cluster (tls://")
        assert "result" not in b.out, b
        after = {p.name: (p.stat().st_ino, p.read_bytes()) for p in [sched, *creds.iterdir()]}
        assert after == before
        assert a.poll() is None, finish(a, 5)
        owner = ("import sys; from dask_mpi_launch import connect\n"
                 "c = connect(sys.argv[1], timeout=20)\n"
                 "print('RAN', c.submit(lambda: 42).result(timeout=20))\n"
                 "c.shutdown()\n")
        out = run([venv.python, "-c", owner, sched], timeout=HANG, env=venv.env())
        assert "RAN 42" in out.out, out
        ended = finish(a, HANG)
        assert ended.status == 0, ended
    finally:
        if a.poll() is None:
            a.terminate()
            finish(a, HANG)
    assert sorted(os.listdir(tmp_path)) == [p.name for p in tmp_path.glob("script*")]
    assert wait_no_leftovers(str(sched)) == []
