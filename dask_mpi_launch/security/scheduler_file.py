"""The scheduler file and its credentials directory: published whole, read only if they are
the user's own (``security/trust.py``), never taken from a live job, removed only by their job.

``<file>`` holds the scheduler's identity (its ``address``, as ``dask scheduler
--scheduler-file`` writes it; mode 0644: no secret) and ``<file>.credentials/`` the job's
TLS credentials (0700, files 0600). Rank 0 publishes them once the scheduler listens:

1. ``<file>`` must be absent, or a stale file of ours: another user's file, a link, a
   directory, or the file of a live job is refused with one line (status 2);
2. the credentials are written in a fresh directory with an unpredictable name, locked,
   then renamed to ``<file>.credentials`` (a rename onto a directory that is not empty
   fails: another job's credentials are never replaced); a stale directory of ours is
   removed first, another user's or a live one is refused;
3. ``<file>`` is written under an unpredictable name, locked and linked into place
   (``link`` fails if a file got there first: two jobs started at once cannot both take
   it); a reader finds the credentials already there.

**Live or stale**: a job's rank 0 holds an exclusive ``flock`` on its scheduler file and
on its credentials directory until it removes them. A second job given the same path tries
a shared lock: refused, they are live (the second job says so and changes nothing, even if
it starts at the same moment); granted, their job ended without removing them (killed)
and they are replaced. ``flock`` works across nodes on NFS (Linux emulates it with
byte-range locks) and GPFS; where a file system has no locks (Lustre mounted without
``flock``), or for a file ``dask scheduler`` wrote, a file cannot be known to be live and is
replaced, as before.

At the end rank 0 removes both, if they are still the (device, inode) it made: never the
files of a job that came after. If publishing fails half-way, what was made is removed.
"""
from __future__ import annotations

import errno
import os

from dask_mpi_launch.security import trust
from dask_mpi_launch.base.errors import LaunchError
from dask_mpi_launch.security.trust import Unsafe, Untrusted

CREDENTIALS = {"ca": "ca.pem", "cert": "cert.pem", "key": "key.pem"}
_NO_LOCKS = (errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF)


def credentials_directory(path: str) -> str:
    return f"{path}.credentials"


def _fix(e: Unsafe, path: str, option: str) -> str:
    """What to do about ``path`` (refused for ``e``); ``option``: how the user named it."""
    other = f"choose another {option}" if option.startswith("-") else f"give another {option}"
    return {
        "link": "links are never followed: give the path of the file itself",
        "directory": f"give the path of a file, e.g. {os.path.join(path, 'scheduler.json')}",
        "owner": f"another user may have planted it (their cluster would run your code): "
                 f"have it removed, or {other}",
        "writable": f"anyone who can write it could have changed it: chmod go-w it, or {other}",
    }.get(e.kind, other)


def refuse(what: str, path: str, e: Unsafe, option: str = "--scheduler-file") -> Untrusted:
    return Untrusted(f"{what} {path} {e}: {_fix(e, path, option)}")


# ---------------------------------------------------------------------------
# reading (join mode, connect())


def read(path: str, option: str = "--scheduler-file") -> dict | None:
    """The identity in scheduler file ``path`` (a dict with an ``address``), or None if
    it is not there yet, or not (yet) one; :class:`Untrusted` if it is not ours."""
    import json

    try:
        data = trust.read_own(path)
    except Unsafe as e:
        raise refuse("the scheduler file", path, e, option) from None
    except OSError:
        return None
    try:
        identity = json.loads(data) if data is not None else None
    except ValueError:
        return None
    if not (isinstance(identity, dict) and isinstance(identity.get("address"), str)):
        return None
    return identity


def read_credentials(path: str, option: str = "--scheduler-file") -> dict | None:
    """The TLS credentials beside scheduler file ``path``, or None if they cannot be read
    (absent, or not all there); :class:`Untrusted` if they are not ours."""
    directory = credentials_directory(path)
    try:
        fd = trust.open_own(directory, directory=True)
    except Unsafe as e:
        raise refuse("the credentials directory", directory, e, option) from None
    except OSError:
        return None
    try:
        credentials = {}
        for field, name in CREDENTIALS.items():
            try:
                data = trust.read_own(name, fd)
            except Unsafe as e:
                raise refuse("the credentials file", os.path.join(directory, name), e,
                             option) from None
            except OSError:
                return None
            if data is None:
                return None
            credentials[field] = data.decode()
        return credentials
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# live or stale


def _locked_by_another(fd: int) -> bool:
    """Whether another open file holds an exclusive lock on ``fd``'s file (a live job's);
    False also where the file system has no locks."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError as e:
        if e.errno in _NO_LOCKS:
            return False
        raise
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _lock(fd: int) -> None:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in _NO_LOCKS:
            raise


def check_replaceable(path: str, dir_fd: int | None = None, name: str | None = None,
                      credentials: bool = True) -> tuple:
    """Raise :class:`Untrusted` unless a new job may write scheduler file ``path``: nothing
    is there, or a stale scheduler file of ours (its job ended); and (``credentials``) its
    credentials directory is absent, or a stale one of ours. The (device, inode) of the
    stale file and directory found (None: none)."""
    name = name or path
    found = None
    try:
        fd = trust.open_own(name, dir_fd)
    except FileNotFoundError:
        fd = None
    except Unsafe as e:
        if e.kind == "writable":  # ours, and rewritten anyway
            fd = None
        else:
            raise refuse("the scheduler file", path, e) from None
    except OSError as e:  # (EACCES: a file of ours we cannot read)
        raise Untrusted(f"cannot use the scheduler file {path}: {e.strerror} (choose another "
                        "--scheduler-file)") from None
    if fd is not None:
        try:
            found = trust.identity(os.fstat(fd))
            live = _locked_by_another(fd)
            address = _address(fd) if live else None
        finally:
            os.close(fd)
        if live:
            raise Untrusted(f"the scheduler file {path} is in use by a running cluster"
                            f"{f' ({address})' if address else ''}: give this job its own "
                            "--scheduler-file, or end that cluster first")
    if not credentials:
        return found, None
    return found, _check_credentials(credentials_directory(path), dir_fd,
                                     credentials_directory(name))


def _check_credentials(directory: str, dir_fd: int | None, name: str) -> tuple | None:
    """Raise :class:`Untrusted` unless credentials directory ``name`` (``directory``, as
    the user named it) is absent, or a stale one of ours (its (device, inode))."""
    try:
        fd = trust.open_own(name, dir_fd, directory=True)
    except FileNotFoundError:
        return None
    except Unsafe as e:
        if e.kind == "writable":  # ours, and replaced anyway
            try:
                return trust.identity(os.stat(name, dir_fd=dir_fd, follow_symlinks=False))
            except OSError:
                return None
        raise refuse("the credentials directory", directory, e) from None
    except OSError as e:
        raise Untrusted(f"cannot use the credentials directory {directory}: {e.strerror} "
                        "(choose another --scheduler-file)") from None
    try:
        found = trust.identity(os.fstat(fd))
        live = _locked_by_another(fd)
    finally:
        os.close(fd)
    if live:
        raise Untrusted(f"the credentials directory {directory} is in use by a running "
                        "cluster: give this job its own --scheduler-file, or end that "
                        "cluster first")
    return found


def _address(fd: int) -> str | None:
    import json

    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return str(json.loads(os.read(fd, trust.MAX_READ))["address"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_stale(path: str) -> None:
    """Remove what an ended job left at ``path`` (so no reader takes its address while
    this job starts); :class:`Untrusted` if it is not a stale file of ours."""
    file, directory = check_replaceable(path)
    if file is not None:  # (only what was checked: never a file that came since)
        trust.remove(path, made=file)
    if directory is not None:
        trust.remove(credentials_directory(path), made=directory)


# ---------------------------------------------------------------------------
# publishing and removing (rank 0)


class Published:
    """What :func:`publish` made: the locked scheduler file's descriptor and what to
    remove at the end."""

    __slots__ = ("path", "fd", "file", "credentials", "credentials_fd")

    def __init__(self, path):
        self.path = path
        self.fd: int | None = None  # <file>, locked
        self.file: tuple | None = None  # (device, inode) of <file>
        self.credentials: tuple | None = None  # of <file>.credentials
        self.credentials_fd: int | None = None  # <file>.credentials, locked


def publish(path: str, identity: dict, credentials: dict | None) -> Published:
    """Write ``identity`` to scheduler file ``path`` and ``credentials`` beside it (see
    the module's text). :class:`Untrusted` if the path is not ours to take (nothing is
    changed then), :class:`LaunchError` if it cannot be written."""
    import json

    directory, base = os.path.split(path)
    made = Published(path)
    try:
        dir_fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise LaunchError(f"cannot write the scheduler file {path}: {e.strerror}") from None
    try:
        check_replaceable(path, dir_fd, base)
        if credentials:
            _publish_credentials(made, dir_fd, base, credentials)
        data = json.dumps(identity, indent=2).encode()
        tmp = trust.temporary_name(base)
        fd = trust.new_file(tmp, data, dir_fd, 0o644)
        try:
            _lock(fd)
            try:
                os.link(tmp, base, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except FileExistsError:  # a stale file of ours only (the credentials are ours)
                check_replaceable(path, dir_fd, base, credentials=False)
                os.replace(tmp, base, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except OSError:  # no hard links here (some FUSE or object stores)
                os.replace(tmp, base, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            trust.remove(tmp, dir_fd)
        except BaseException:
            os.close(fd)
            trust.remove(tmp, dir_fd)
            raise
        made.fd, made.file = fd, trust.identity(os.fstat(fd))
        return made
    except LaunchError:  # (Untrusted too)
        _remove(made, dir_fd)  # never leave the credentials behind
        raise
    except (OSError, Unsafe) as e:
        _remove(made, dir_fd)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise LaunchError(f"cannot write the scheduler file {path}: {reason}") from None
    except BaseException:
        _remove(made, dir_fd)
        raise
    finally:
        os.close(dir_fd)


def _publish_credentials(made: Published, dir_fd: int, base: str, credentials: dict) -> None:
    """``<file>.credentials``, made whole under another name, locked (for the job's life,
    like the file: a job starting at the same moment never removes it), renamed into
    place."""
    name = base + ".credentials"
    tmp = trust.temporary_name(name)
    os.mkdir(tmp, 0o700, dir_fd=dir_fd)
    try:
        fd = trust.open_private_dir(tmp, dir_fd)  # 0700 whatever the umask
        made.credentials_fd, made.credentials = fd, trust.identity(os.fstat(fd))
        _lock(fd)
        for field, file in CREDENTIALS.items():
            os.close(trust.new_file(file, credentials[field].encode(), fd))
        stale = _check_credentials(credentials_directory(made.path), dir_fd, name)
        if stale is not None:
            trust.remove(name, dir_fd, stale)
        try:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EPERM):
                raise
            raise Untrusted(f"the credentials directory {credentials_directory(made.path)} "
                            "was made by someone else while this job started: give this "
                            "job its own --scheduler-file") from None
    except BaseException:
        trust.remove(tmp, dir_fd)
        raise


def _remove(made: Published, dir_fd: int | None = None) -> None:
    directory, base = os.path.split(made.path)
    close = dir_fd is None
    if close:
        try:
            dir_fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            dir_fd = None
    try:
        if made.file is not None and dir_fd is not None:
            trust.remove(base, dir_fd, made.file)
        if made.credentials is not None and dir_fd is not None:
            trust.remove(base + ".credentials", dir_fd, made.credentials)
    finally:
        for fd in (made.fd, made.credentials_fd):  # (after the unlinks: the locks hold
            if fd is not None:                     # until the files are gone)
                os.close(fd)
        made.fd = made.file = made.credentials = made.credentials_fd = None
        if close and dir_fd is not None:
            os.close(dir_fd)


def remove(made: Published | None) -> None:
    """The job's end: remove the scheduler file and credentials it published, if they are
    still the ones it made."""
    if made is not None:
        _remove(made)
