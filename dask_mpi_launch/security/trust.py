"""Never trust what another user could have written: the one place that opens, creates and
removes what a job shares through the file system (the scheduler file and its credentials,
``security/scheduler_file.py``; ``--bootstrap slurm``'s step directory, ``control/over_files.py``).

Shared directories are where users meet: a sticky ``/tmp`` or ``/scratch`` (1777), a group
project directory. There another user can plant a file where ours is expected (a scheduler
file naming their cluster, whose ``client.run`` then runs code as us), or a symbolic link
where we are about to write (with ``fs.protected_symlinks = 0``, as on this machine and on
many clusters' nodes, the kernel follows it even in a sticky directory: a planted link once
made a job overwrite another file of its user). So:

* **read only what is ours.** A file or directory is opened with ``O_NOFOLLOW`` (a link in
  its place is refused, never followed) and checked with ``fstat`` on the opened
  descriptor, the very object then read (swapping it after the check changes nothing): a
  regular file (or a directory), owned by the effective user (root's files are no job of
  yours either), not writable by the group or others (anyone there could have changed it).
  A refusal says what it is and whose.
* **create only anew, privately.** A file is written under an unpredictable name (64
  random bits) opened with ``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600 (a umask only
  removes bits; ``fchmod`` gives another mode when one is wanted), then renamed into place
  (a reader never sees half a file). A directory is made with ``mkdir(0700)``, which fails
  if anything is there, and its files the same way through its descriptor.
* **remove only what we made**, by the (device, inode) noted at its making; a tree is
  walked through descriptors, never following a link.

The directory holding them is not required to be private: what is read is checked on its
descriptor and what is created cannot be opened by anyone else first, so in a directory
others can write, another user can at most delete or rename our files (the job then fails,
or a reader is refused, saying whose file is in the way), never make us read, follow or
write theirs.

Standard library only (the thin ranks import it: ``os`` and ``stat``, which ``os`` loads).
"""
from __future__ import annotations

import os
import stat

from dask_mpi_launch.base.errors import UsageError

_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # (a FIFO never blocks)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_READ = 1 << 20  # bytes: a scheduler file or a PEM file is a few KiB


class Unsafe(Exception):
    """Why a file or directory is not trusted: the text completes "<path> ..." ("belongs
    to user nobody, not to you"); ``kind`` is one of link, directory, not-directory,
    special, owner, writable."""

    def __init__(self, reason: str, kind: str):
        super().__init__(reason)
        self.kind = kind


class Untrusted(UsageError, PermissionError):
    """The one line for the user (what, whose, what to do; exit status 2); a
    ``PermissionError`` for the callers of ``connect()``."""


def owner(uid: int) -> str:
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name}"
    except (ImportError, KeyError):
        return f"uid {uid}"


def check(st: os.stat_result, directory: bool = False) -> None:
    """Raise :class:`Unsafe` unless ``st`` is a regular file (``directory``: a directory)
    of the effective user that the group and others cannot write."""
    if directory and not stat.S_ISDIR(st.st_mode):
        raise Unsafe("is not a directory", "not-directory")
    if not directory and stat.S_ISDIR(st.st_mode):
        raise Unsafe("is a directory", "directory")
    if not directory and not stat.S_ISREG(st.st_mode):
        raise Unsafe("is not a regular file", "special")
    if st.st_uid != os.geteuid():
        raise Unsafe(f"belongs to {owner(st.st_uid)}, not to you", "owner")
    if st.st_mode & 0o022:
        raise Unsafe(f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o})",
                     "writable")


def open_own(name: str, dir_fd: int | None = None, directory: bool = False) -> int:
    """A descriptor of ``name`` (relative to ``dir_fd``) that passed :func:`check`;
    ``FileNotFoundError`` if nothing is there, :class:`Unsafe` if something untrusted is."""
    try:
        fd = os.open(name, _DIR if directory else _READ, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as e:  # ELOOP (a link), ENOTDIR...: say what is there
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            raise e from None
        if stat.S_ISLNK(st.st_mode):
            raise Unsafe("is a symbolic link", "link") from None
        check(st, directory)
        raise
    try:
        check(os.fstat(fd), directory)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_own(name: str, dir_fd: int | None = None, limit: int = MAX_READ) -> bytes | None:
    """The bytes of file ``name`` if it passes :func:`check`; None if it does not exist;
    :class:`Unsafe` if it is not ours to trust."""
    try:
        fd = open_own(name, dir_fd)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(limit)


def open_private_dir(name: str, dir_fd: int | None = None, *, create: bool = False) -> int:
    """A descriptor of directory ``name`` (relative to ``dir_fd``), made 0700 if ``create``
    and it does not exist. Raises :class:`Unsafe` if it is a symbolic link, not a
    directory, not the user's own, or writable by the group or others; a directory of ours
    that others can only read or enter is made 0700."""
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            pass
    fd = open_own(name, dir_fd, directory=True)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o700:
            os.fchmod(fd, 0o700)  # ours: only readable by others, or an odd umask
    except BaseException:
        os.close(fd)
        raise
    return fd


def temporary_name(name: str) -> str:
    """A name beside ``name`` (a file name, no directory) that nobody can guess."""
    return f".{name}.{os.urandom(8).hex()}.tmp"


def new_file(name: str, data: bytes, dir_fd: int | None = None, mode: int = 0o600) -> int:
    """Create file ``name`` (relative to ``dir_fd``), never an existing file or a link,
    with ``data`` and ``mode``; its descriptor (open for reading and writing)."""
    fd = os.open(name, _NEW, 0o600, dir_fd=dir_fd)
    try:
        if mode != 0o600:
            os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        remove(name, dir_fd)
        raise
    return fd


def identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino


def remove(name: str, dir_fd: int | None = None, made: tuple | None = None) -> None:
    """Remove ``name`` (relative to ``dir_fd``): a file, or a tree, never following a link
    (what ``shutil.rmtree(dir_fd=)`` does from Python 3.11 on); with ``made``, only if it
    is still the (device, inode) we made. Errors are ignored."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if made is not None and identity(st) != made:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dir_fd)
            return
        fd = os.open(name, _DIR, dir_fd=dir_fd)
        try:
            for entry in os.listdir(fd):
                remove(entry, fd)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=dir_fd)
    except OSError:
        pass
