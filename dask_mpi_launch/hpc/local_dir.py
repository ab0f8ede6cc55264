"""The workers' local (spill) directory: on the node, not on a network file system.

Dask's workers put their spill files and a lock file per worker in their local directory,
by default the temporary directory (``$TMPDIR``, else ``/tmp``). On many clusters
``$TMPDIR`` or the working directory is on NFS, Lustre or GPFS: file locks there hang or
fail (workers "hung at start-up in NFS file locks"), spilling competes with every other
job for the shared servers, and the spill of a thousand workers lands on one metadata
server. So, when the directory the workers would use is on a network file system, we say
so in one line and use node-local storage instead when there is some (``$TMPDIR``,
``$SLURM_TMPDIR``, ``/tmp``, ``/dev/shm``: the first local and writable), unless the user
chose the directory (``--local-directory``, ``mpi-launch.local-directory``, or dask's
``temporary-directory``): then it is only said.

How the file system is known: ``statfs(2)``'s ``f_type`` of the path itself (through
``ctypes``: ``os.statvfs`` has no ``f_type``). It answers for the very path, through bind
mounts, automounts and symbolic links, where matching ``/proc/self/mountinfo`` by longest
prefix needs the path resolved and the mount table's escapes undone, and a stale or
private mount namespace lies. Standard library only (a thin rank imports it).
"""
from __future__ import annotations

import ctypes
import os

from dask_mpi_launch.base.layout import WORKER
from dask_mpi_launch.base.record import replace
from dask_mpi_launch.base.status import say

#: statfs f_type magic numbers of network file systems (linux/magic.h, and the vendors')
NETWORK = {
    0x6969: "NFS",
    0x0BD00BD0: "Lustre",
    0x47504653: "GPFS",
    0x19830326: "BeeGFS",
    0xFF534D42: "CIFS",
    0xFE534D42: "SMB",
    0x517B: "SMB",
    0x5346414F: "AFS",
    0x6B414653: "AFS",  # kAFS
    0x00C36400: "CephFS",
    0x013111A8: "IBRIX",
    0xAAD7AAEA: "PanFS",
}


def network_fs(f_type: int | None) -> str | None:
    """The name of the network file system of statfs type ``f_type``, or None (local, or
    unknown)."""
    if f_type is None:
        return None
    return NETWORK.get(f_type & 0xFFFFFFFF)


def _existing(path: str) -> str:
    """``path``, or its nearest existing parent (Dask makes the directory itself)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def fs_type(path: str) -> int | None:
    """statfs(2)'s ``f_type`` of ``path`` (or its nearest existing parent); None if unknown.

    ``f_type`` is the first field of ``struct statfs`` (a ``long`` on Linux's 64-bit
    ABIs); the buffer is larger than the structure on every architecture (120 bytes on
    x86-64)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(512)
        if libc.statfs(os.fsencode(_existing(path)), buf) != 0:
            return None
        return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF
    except (OSError, AttributeError, ValueError):
        return None


def _writable_dir(path: str | None) -> bool:
    return bool(path) and os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def candidates(env=os.environ) -> list[str]:
    """Node-local storage to spill to, in order of preference."""
    return [p for p in (env.get("TMPDIR"), env.get("SLURM_TMPDIR"), "/tmp", "/dev/shm") if p]


def default_directory(env=os.environ) -> str:
    """Where Dask's workers spill when nobody chose: dask's ``temporary-directory`` from the
    environment, else Python's temporary directory (``$TMPDIR``, ``$TEMP``, ``$TMP``,
    ``/tmp``)."""
    for key in ("TMPDIR", "TEMP", "TMP"):  # tempfile.gettempdir()'s order, without its
        if _writable_dir(env.get(key)):  # imports (a thin rank imports this module)
            return env[key]
    return "/tmp"


def choose(chosen: str | None, env=os.environ, kind=fs_type) -> tuple[str | None, str | None]:
    """(the workers' local directory, the one line to say or None).

    ``chosen``: the user's ``--local-directory`` (None: not chosen). A chosen directory on
    a network file system is kept (it is said); the default one is replaced by the first
    node-local writable candidate, if any. ``kind``: path -> statfs type (tests)."""
    explicit = chosen or env.get("DASK_TEMPORARY_DIRECTORY")
    path = explicit or default_directory(env)
    network = network_fs(kind(path))
    if network is None:
        return chosen, None
    if explicit:
        return chosen, (f"the workers' local directory {path} is on {network}, a network "
                        "file system (spilling and file locks there are slow or hang); "
                        "kept, since you chose it")
    for candidate in candidates(env):
        if _writable_dir(candidate) and network_fs(kind(candidate)) is None:
            return candidate, (f"the workers' local directory {path} is on {network}, a "
                               f"network file system: spilling to {candidate} instead "
                               "(node-local; --local-directory chooses)")
    return chosen, (f"the workers' local directory {path} is on {network}, a network file "
                    "system, and no node-local directory is writable here: kept")


def settle(settings, layout, rank: int):
    """A rank's settings with its workers' local directory on the node (:func:`choose`);
    the line is said once, by the first worker rank."""
    if WORKER not in layout.roles(rank):
        return settings
    directory, line = choose(settings.local_directory)
    if line and rank == layout.worker_ranks[0]:
        say(line)
    return replace(settings, local_directory=directory)
