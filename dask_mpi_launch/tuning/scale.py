"""Defaults for big jobs, chosen from the number of workers the launcher will start.

Pure: no MPI, no distributed; ``dask.config`` only to read and merge mappings. A rank knows
before any role starts how many workers the job will have (world size × worker processes,
from the layout); :func:`scale_defaults` turns that into Dask config changes, :func:`describe`
into one banner line, :func:`apply` sets them in the process (role processes forked after
it inherit them). A user's own setting of a key always wins: keys set in their dask config
(YAML, ``DASK_*`` variables, ``dask.config.set``) or by an explicit option are left alone.

Why these keys (``bin/bench-scale``, ``benchmarks/results/scale.md``): one scheduler takes
about :data:`REGISTRATIONS_PER_SECOND` TLS registrations per second, so N workers starting
together wait up to N / that rate for their turn:

* ``distributed.comm.socket-backlog`` (2048): connects beyond the accept queue are dropped
  and retried by the kernel after 1, 3, 7 ... s (measured at 3,000 workers: 6,639 dropped
  connects, 308 connect retries). Raised to the number of workers (the kernel caps it at
  ``net.core.somaxconn``).
* ``distributed.comm.timeouts.connect`` (30 s): a connect attempt, TLS handshake included,
  gets a fifth of it at first; behind a queue longer than that it is abandoned and redone,
  which costs the busy scheduler another handshake. Raised so a fifth covers the queue.
* ``mpi-launch.connect-timeout`` (30 s): after it, a worker role that is not yet registered
  probes the scheduler to diagnose a wrong interface; behind a long queue that probe would
  report a false "unreachable". Raised to twice the queue.
* ``mpi-launch.wait-timeout`` (120 s): the script waits that long for every worker. Raised
  to three times the queue.
* ``distributed.scheduler.worker-ttl`` (5 minutes): raised to twice the queue if that is
  longer (from ~30,000 workers); below, distributed already stretches it to 10 heartbeat
  intervals, which grow with the cluster.
* ``mpi-launch.shutdown-timeout`` (10 s): at the end the scheduler closes every worker's
  connection, about :data:`CLOSES_PER_SECOND` a second (bench-scale's teardown: ~2 ms of
  scheduler CPU per worker with TLS); raised to twice that time (from 2,500 workers) so a
  big job's scheduler is not killed halfway through its close.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

#: TLS registrations one scheduler takes per second (bench-scale on 2 busy cores: 200-300)
REGISTRATIONS_PER_SECOND = 200.0
#: worker connections one scheduler closes per second at the job's end (bench-scale)
CLOSES_PER_SECOND = 500.0

BACKLOG = "distributed.comm.socket-backlog"
CONNECT = "distributed.comm.timeouts.connect"
TTL = "distributed.scheduler.worker-ttl"
ROLE_CONNECT = "mpi-launch.connect-timeout"
WAIT = "mpi-launch.wait-timeout"
SHUTDOWN = "mpi-launch.shutdown-timeout"
KEYS = (BACKLOG, CONNECT, TTL, ROLE_CONNECT, WAIT, SHUTDOWN)
MAX_BACKLOG = 65535


def queue_seconds(n_workers: int) -> float:
    """How long the last of ``n_workers`` simultaneous registrations may wait.

    >>> queue_seconds(10_000)
    50.0
    """
    return max(0, int(n_workers)) / REGISTRATIONS_PER_SECOND


def scale_defaults(n_workers: int, current_config: Mapping, defaults: Mapping | None = None,
                   explicit: Iterable[str] = ()) -> dict:
    """Dask config changes ``{dotted key: value}`` for a job of ``n_workers`` workers.

    ``current_config``: the merged config (``dask.config.config``); ``defaults``: the
    packaged defaults only (default: merged from ``dask.config.defaults``); a key whose
    current value differs from its default, or that is in ``explicit`` (keys the user set
    by other means: an option such as ``--connect-timeout``, or their YAML/environment,
    see :func:`user_keys`), is the user's and never changed. Values only ever grow.

    >>> base = {"distributed": {"comm": {"socket-backlog": 2048,
    ...         "timeouts": {"connect": "30s"}}, "scheduler": {"worker-ttl": "5 minutes"}},
    ...         "mpi-launch": {"connect-timeout": "30s", "wait-timeout": "120s"}}
    >>> scale_defaults(1000, base, base)
    {}
    >>> scale_defaults(10_000, base, base)  # doctest: +NORMALIZE_WHITESPACE
    {'distributed.comm.socket-backlog': 10000, 'distributed.comm.timeouts.connect': '250s',
     'mpi-launch.connect-timeout': '100s', 'mpi-launch.wait-timeout': '150s'}
    >>> scale_defaults(10_000, base, base, explicit=["mpi-launch.wait-timeout"])
    ... # doctest: +NORMALIZE_WHITESPACE
    {'distributed.comm.socket-backlog': 10000, 'distributed.comm.timeouts.connect': '250s',
     'mpi-launch.connect-timeout': '100s'}
    """
    if defaults is None:
        defaults = packaged_defaults()
    explicit = {_canonical(k) for k in explicit}
    queue = queue_seconds(n_workers)
    wanted = {
        BACKLOG: min(MAX_BACKLOG, int(n_workers)),
        CONNECT: 5 * queue,
        ROLE_CONNECT: 2 * queue,
        WAIT: 3 * queue,
        TTL: 2 * queue,
        SHUTDOWN: 2 * max(0, int(n_workers)) / CLOSES_PER_SECOND,
    }
    changes = {}
    for key, value in wanted.items():
        current = _get(current_config, key)
        if current is None:
            continue  # a key this version does not have: nothing to scale
        if _canonical(key) in explicit or current != _get(defaults, key):
            continue  # the user's: theirs wins
        if key == BACKLOG:
            if value > int(current):
                changes[key] = value
        elif value > _seconds(current):
            changes[key] = f"{_ceil(value)}s"
    return changes


def describe(changes: Mapping) -> str:
    """One banner line for the changes ("" for none).

    >>> describe({"distributed.comm.socket-backlog": 10000})[:59]
    'scaled for a big job: distributed.comm.socket-backlog 10000'
    >>> describe({})
    ''
    """
    if not changes:
        return ""
    return ("scaled for a big job: " + ", ".join(f"{k} {v}" for k, v in changes.items())
            + " (set them in your dask config to choose)")


def apply(changes: Mapping) -> None:
    """Set the changes in this process's dask config (before forking role processes)."""
    import dask.config

    dask.config.set(dict(changes))


def settings_overrides(changes: Mapping) -> dict:
    """The ``Settings`` fields for the ``mpi-launch.*`` changes, in seconds (settings
    resolved before the job's size was known take them with ``record.replace``).

    >>> settings_overrides({"mpi-launch.wait-timeout": "150s", BACKLOG: 10000})
    {'wait_timeout': 150.0}
    """
    fields = {ROLE_CONNECT: "connect_timeout", WAIT: "wait_timeout",
              SHUTDOWN: "shutdown_timeout"}
    return {fields[k]: _seconds(v) for k, v in changes.items() if k in fields}


def packaged_defaults() -> dict:
    """Dask's, distributed's and our packaged defaults, merged (no user settings).
    distributed's are read from its YAML file where it is not imported (the rank)."""
    import dask.config

    return dask.config.merge(_distributed_defaults(), *dask.config.defaults)


def _distributed_defaults() -> dict:
    import importlib.util
    import os

    import yaml

    spec = importlib.util.find_spec("distributed")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = os.path.join(spec.submodule_search_locations[0], "distributed.yaml")
    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except OSError:
        return {}


def user_keys() -> set[str]:
    """Dotted keys the user set in their YAML files or ``DASK_*`` environment variables
    (which may equal a default: then only this tells they are theirs)."""
    import dask.config

    return set(_flatten(dask.config.collect()))


def for_job(n_workers: int, explicit: Iterable[str] = ()) -> dict:
    """:func:`scale_defaults` for this process's dask config and the user's own keys
    (which take a look at the user's files: only for a job big enough to change anything)."""
    if 5 * queue_seconds(n_workers) <= 30 and n_workers <= 2048:
        return {}  # below any change with the shipped defaults: no file read at start-up
    import dask.config

    from dask_mpi_launch.configure import defaults as _loaded  # noqa: F401 - our defaults

    defaults = packaged_defaults()
    if not scale_defaults(n_workers, defaults, defaults):
        return {}
    current = dask.config.merge(_distributed_defaults(), dask.config.config)
    return scale_defaults(n_workers, current, defaults, set(explicit) | user_keys())


# ---------------------------------------------------------------------------


def _canonical(key: str) -> str:
    return key.replace("_", "-")


def _get(config: Mapping, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, Mapping):
            return None
        for name in (part, part.replace("-", "_"), part.replace("_", "-")):
            if name in node:
                node = node[name]
                break
        else:
            return None
    return node


def _flatten(config: Mapping, prefix: str = ""):
    for k, v in config.items():
        key = _canonical(f"{prefix}{k}")
        if isinstance(v, Mapping) and v:
            yield from _flatten(v, key + ".")
        else:
            yield key


def _seconds(value) -> float:
    from dask.utils import parse_timedelta

    return float(parse_timedelta(value, default="seconds"))


def _ceil(x: float) -> int:
    return int(x) if x == int(x) else int(x) + 1
