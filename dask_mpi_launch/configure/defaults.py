"""Defaults under the ``mpi-launch`` key of dask.config, loaded from the package's YAML."""
from __future__ import annotations

import os

try:
    import dask.config
except ValueError as e:  # a malformed dask config file: dask says it in 10 lines
    from dask_mpi_launch.base.errors import ConfigFileError

    error = ConfigFileError.from_dask(e)
    if error is None:
        raise
    raise error from None
import yaml

_FILE = os.path.join(os.path.dirname(__file__), "dask-mpi-launch.yaml")

with open(_FILE) as f:
    _DEFAULTS = yaml.safe_load(f)

dask.config.update_defaults(_DEFAULTS)


def get(key: str, value=None):
    """``value`` if given, else the configured ``mpi-launch.<key>``; the packaged default
    where the config has lost it (a ``dask.config.set`` block that began before this module
    was imported removes the whole ``mpi-launch`` section when it ends)."""
    if value is not None:
        return value
    return dask.config.get(f"mpi-launch.{key}",
                           default=_DEFAULTS.get("mpi-launch", {}).get(key))
