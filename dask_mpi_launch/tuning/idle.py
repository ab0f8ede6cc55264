"""Quiet when idle: dask.config defaults for the processes we start.

distributed's defaults wake a process up ~150 times a second (event-loop tick every 20 ms,
profiler every 10 ms, memory monitor every 100 ms, system monitor every 500 ms): 2-4% of a
core per idle worker, paid on every rank of an HPC job. ``apply_hpc_defaults()``, called
at the start of the scheduler, worker and client-script processes (never in a process that
merely imports this package), sets coarser intervals from ``mpi-launch.hpc-config`` for
every key the user has not set: keys in the user's YAML files or ``DASK_*`` variables, or
changed in this process (``dask.config.set``), keep the user's value.
``mpi-launch.hpc-defaults: false`` keeps distributed's own defaults.
"""
from __future__ import annotations

import dask.config

from dask_mpi_launch.configure import defaults as _config  # noqa: F401  (loads our defaults into dask.config)

_MISSING = object()


def flatten(tree: dict, prefix: str = "") -> dict:
    """Dotted keys of a nested mapping.

    >>> flatten({"a": {"b": 1, "c": {"d": "2s"}}, "e": None})
    {'a.b': 1, 'a.c.d': '2s', 'e': None}
    """
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _user_config() -> dict:
    """What the user set outside this process: YAML files, DASK_* environment variables
    (and the config a Nanny passes to its worker)."""
    return dask.config.collect(paths=dask.config.paths)


def hpc_settings() -> dict:
    """The values ``apply_hpc_defaults()`` would set now, by dotted key (empty when
    ``mpi-launch.hpc-defaults`` is false)."""
    if not _truthy(dask.config.get("mpi-launch.hpc-defaults", True)):
        return {}
    ours = flatten(dask.config.get("mpi-launch.hpc-config", None) or {})
    user = _user_config()
    library = dask.config.merge(*dask.config.defaults)  # distributed's (and dask's) own
    chosen = {}
    for key, value in ours.items():
        if dask.config.get(key, _MISSING, config=user) is not _MISSING:
            continue  # set in a YAML file or a DASK_* variable
        current = dask.config.get(key, _MISSING)
        if current is not _MISSING and current != dask.config.get(key, _MISSING, config=library):
            continue  # changed in this process, e.g. dask.config.set() before initialize()
        chosen[key] = value
    return chosen


def apply_hpc_defaults() -> dict:
    """Set our HPC defaults in this process's dask.config where the user has not chosen;
    return what was set. Call at the start of a role process, before Dask objects exist."""
    chosen = hpc_settings()
    if chosen:
        dask.config.set(chosen)
    return chosen


def _truthy(value) -> bool:
    """YAML gives booleans; DASK_* variables may give strings."""
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "no", "off", "0", "")
    return bool(value)
