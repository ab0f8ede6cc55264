"""One settings object from CLI options or initialize() keywords, and its checks.

Every option defaults to ``None`` and falls back to ``dask.config`` (``mpi-launch.*``).
Checks raise :class:`UsageError` with one line saying what is wrong and how to fix it.
They import nothing heavy: no mpi4py, no distributed; ``dask.config`` only to resolve
(done by the zygote for the command line: the rank that runs with the result never
imports dask).
"""
from __future__ import annotations

import json
import os
import socket
from dask_mpi_launch.base.errors import UsageError
from dask_mpi_launch.base.layout import LAYOUTS, Layout, layout_name
from dask_mpi_launch.base.record import Record, factory, replace


class Settings(Record):
    # what runs on the client rank: a script file, a module (-m), or the
    # caller of initialize() (script is None and module is None)
    script: str | None = None
    module: str | None = None
    args: tuple[str, ...] = ()
    in_process: bool = False  # True for initialize(): the client is the calling script
    layout: str = "dedicated"
    scheduler_rank: int = 0  # the rank of the scheduler (coordination stays on rank 0)
    client_rank: int | None = None  # None: the layout's default (see base/layout.py)
    exclusive_workers: bool | None = None  # dask-mpi's term: False is --layout full
    nanny: bool | None = None  # dask-mpi's term: True is distributed.Nanny, False Worker
    interface: str | None = None
    protocol: str | None = None
    tls: bool = True  # per-job credentials, passed between ranks in memory
    scheduler_port: int = 0
    dashboard: bool = True
    dashboard_address: str = ":8787"
    nthreads: int | None = None
    memory_limit: object = "auto"  # bytes, a size like "4GB", "auto", 0 or None
    local_directory: str | None = None
    worker_class: str = "distributed.Worker"
    worker_options: dict = factory(dict)
    worker_processes: int = 1
    worker_restarts: int = 3  # per worker process, before its death ends the job
    scheduler: bool = True  # False: join the cluster of scheduler_file (join mode)
    name: str | None = None
    scheduler_file: str | None = None
    wait_for_workers: bool = True
    wait_timeout: float = 120.0
    connect_timeout: float = 30.0
    startup_timeout: float = 600.0
    shutdown_timeout: float = 10.0
    log_level: str = "warning"
    quiet: bool = False  # no banner
    login_host: str | None = None  # for the SSH tunnel line of the banner
    jupyter: bool = False  # the client rank runs JupyterLab instead of a script
    bootstrap: str = "mpi"  # mpi | slurm (no MPI: Slurm's variables + files) | auto
    bootstrap_dir: str = "."  # where --bootstrap slurm exchanges its files (shared FS)
    share_imports: bool = True  # one zygote per node (the CLI), not one per rank
    record: str | None = None  # --record DIR: logs, summary.json, report.html (process/job_record.py)
    record_report: bool = True  # the record's report.html (+0.44 s a job: README, Job record)
    explicit: frozenset = frozenset()  # config keys given as options (they win over tuning)
    time_limit: float | None = None  # seconds (--time-limit); None: the batch system's
    time_grace: float | None = None  # seconds before the end the script is warned
    end: float | None = None  # the allocation's end (epoch), set by process/deadline.py

    @property
    def door_protocol(self) -> str | None:
        """The protocol of the scheduler and of everything that talks to it (with --protocol
        mpi only the workers' data between them goes over MPI)."""
        if self.protocol == "mpi":
            return "tls" if self.tls else "tcp"
        return self.protocol

    @property
    def has_client(self) -> bool:
        return (self.in_process or self.jupyter or self.script is not None
                or self.module is not None)

    def layout_for(self, size: int) -> Layout:
        return Layout(self.layout, size, self.has_client, self.scheduler,
                      self.scheduler_rank, self.client_rank)

    def worker_name(self, rank: int, index: int = 0, prefix: str | None = None) -> str | int:
        prefix = prefix or self.name
        base = f"{prefix}-{rank}" if prefix else rank
        if self.worker_processes > 1:
            return f"{base}-{index}"
        return base


_CONFIG_KEYS = {
    "layout": "layout",
    "interface": "interface",
    "protocol": "protocol",
    "scheduler_port": "scheduler-port",
    "dashboard": "dashboard",
    "dashboard_address": "dashboard-address",
    "nthreads": "nthreads",
    "memory_limit": "memory-limit",
    "local_directory": "local-directory",
    "worker_class": "worker-class",
    "worker_options": "worker-options",
    "name": "name",
    "scheduler_file": "scheduler-file",
    "wait_for_workers": "wait-for-workers",
    "wait_timeout": "wait-timeout",
    "connect_timeout": "connect-timeout",
    "startup_timeout": "startup-timeout",
    "shutdown_timeout": "shutdown-timeout",
    "log_level": "log-level",
    "worker_processes": "worker-processes",
    "worker_restarts": "worker-restarts",
    "bootstrap": "bootstrap",
    "bootstrap_dir": "bootstrap-dir",
    "login_host": "login-host",
    "share_imports": "share-imports",
}

# newer keys, read with a default so a site config without them keeps working
_OPTIONAL_CONFIG_KEYS = {
    "scheduler_rank": "scheduler-rank",
    "client_rank": "client-rank",
    "exclusive_workers": "exclusive-workers",
    "nanny": "nanny",
    "time_limit": "time-limit",
    "time_grace": "time-grace",
    "record": "record",
    "record_report": "record-report",
}


def resolve(**options) -> Settings:
    """Settings from explicit options (None = use the config), checked for consistency.

    Raises UsageError for values that are wrong wherever they are read (bad sizes,
    bad JSON, ...). Host-dependent checks are in :func:`check_on_host`.
    """
    from dask_mpi_launch.configure import defaults

    known = set(Settings.FIELDS)
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown options: {', '.join(sorted(unknown))}")
    values = {}
    for name in known:
        value = options.get(name)
        if name in _CONFIG_KEYS:
            value = defaults.get(_CONFIG_KEYS[name], value)
        elif name in _OPTIONAL_CONFIG_KEYS and value is None:
            import dask.config

            value = dask.config.get(f"mpi-launch.{_OPTIONAL_CONFIG_KEYS[name]}", None)
        if value is not None:
            values[name] = value
    values["explicit"] = frozenset(f"mpi-launch.{key}" for name, key in _CONFIG_KEYS.items()
                                   if options.get(name) is not None)
    values["tls"], protocol = _tls(options.get("tls"), values.get("protocol"))
    if protocol:
        values["protocol"] = protocol
    values["worker_class"] = _worker_class(values.get("nanny"), options.get("worker_class"),
                                           values.get("worker_class"))
    values["layout"] = _layout_of(options.get("layout"), values.get("layout", "dedicated"),
                                  values)
    s = Settings(**values)
    s = replace(
        s,
        layout=_layout(s.layout),
        scheduler_rank=_count(s.scheduler_rank, "--scheduler-rank"),
        client_rank=None if s.client_rank is None else _count(s.client_rank, "client_rank"),
        scheduler_port=_port(s.scheduler_port),
        protocol=_protocol(s.protocol),
        dashboard_address=_dashboard_address(s.dashboard_address),
        nthreads=_nthreads(s.nthreads),
        memory_limit=parse_memory_limit(s.memory_limit),
        worker_options=parse_worker_options(s.worker_options),
        worker_processes=_positive_int(s.worker_processes, "--worker-processes"),
        worker_restarts=_count(s.worker_restarts, "--worker-restarts"),
        wait_timeout=parse_timeout(s.wait_timeout, "--wait-timeout"),
        connect_timeout=parse_timeout(s.connect_timeout, "--connect-timeout"),
        startup_timeout=parse_timeout(s.startup_timeout, "startup-timeout"),
        shutdown_timeout=parse_timeout(s.shutdown_timeout, "shutdown-timeout"),
        log_level=_log_level(s.log_level),
        bootstrap=_choice(s.bootstrap, "--bootstrap", ("mpi", "slurm", "auto")),
        scheduler_file=os.path.abspath(s.scheduler_file) if s.scheduler_file else None,
        time_limit=_time_limit(s.time_limit),
        time_grace=None if s.time_grace is None else parse_timeout(s.time_grace,
                                                                   "--time-grace"),
        record=os.path.abspath(os.path.expanduser(s.record)) if s.record else None,
        args=tuple(s.args),
    )
    s.layout_for(1 << 30)  # the ranks fit the layout (raises UsageError with the fix)
    check_dask_config()
    if s.protocol == "mpi":
        if s.worker_processes != 1:
            raise UsageError("--protocol mpi runs one worker in each rank: drop "
                             "--worker-processes (or start more ranks)")
        if s.bootstrap == "slurm":
            raise UsageError("--protocol mpi needs MPI: drop --bootstrap slurm")
    if not s.scheduler:
        if not s.scheduler_file:
            raise UsageError("--no-scheduler joins the cluster of a scheduler file: "
                             "give --scheduler-file PATH")
        if s.has_client:
            raise UsageError("--no-scheduler only adds workers: drop the script, "
                             "or drop --no-scheduler")
    return s


def _tls(explicit, protocol):
    """(tls, protocol): TLS unless another protocol is asked for, or --no-tls. With the
    ``mpi`` protocol (workers' data over MPI) the cluster's door stays TLS unless --no-tls."""
    from dask_mpi_launch.configure import defaults

    if protocol == "mpi":
        return (explicit if explicit is not None else bool(defaults.get("tls"))), protocol
    if protocol not in (None, "tls"):
        if explicit:
            raise UsageError(f"--tls needs the tls protocol, not --protocol {protocol}")
        return False, protocol
    tls = explicit if explicit is not None else bool(defaults.get("tls"))
    if protocol == "tls" and not tls:
        raise UsageError("--no-tls and --protocol tls contradict each other: choose one")
    return tls, ("tls" if tls else protocol)


def _worker_class(nanny, explicit, value):
    """dask-mpi's --nanny/--no-nanny as a worker class; an explicit --worker-class wins
    unless the two contradict each other."""
    if nanny is None:
        return value
    wanted = "distributed.Nanny" if nanny else "distributed.Worker"
    if explicit is None:
        return wanted
    named = {"distributed.Nanny": True, "distributed.nanny.Nanny": True,
             "distributed.Worker": False, "distributed.worker.Worker": False}.get(explicit)
    if named is not None and named != bool(nanny):
        flag = "--nanny" if nanny else "--no-nanny"
        raise UsageError(f"{flag} and --worker-class {explicit} contradict each other: "
                         "give one of them")
    return explicit


def _layout_of(explicit, value, values):
    """The layout from --layout and dask-mpi's exclusive_workers / client and scheduler
    ranks: inclusive workers is ``full``; exclusive workers with the client on the
    scheduler's rank is ``compact``, on another rank ``dedicated``."""
    exclusive = values.get("exclusive_workers")
    if exclusive is not None and not isinstance(exclusive, bool):
        raise UsageError(f"invalid exclusive_workers {exclusive!r}: give True or False")
    if explicit is not None:
        if exclusive is not None and (explicit == "full") == exclusive:
            flag = "--exclusive-workers" if exclusive else "--inclusive-workers"
            raise UsageError(f"{flag} and --layout {explicit} contradict each other "
                             "(--inclusive-workers is --layout full): give one of them")
        return explicit
    if exclusive is False:
        return "full"
    if value == "full" and exclusive is None:
        return value
    client = values.get("client_rank")
    if client is not None:
        return layout_name(True, values.get("scheduler_rank", 0), client)
    return "dedicated" if value == "full" else value


def _choice(value, option, choices):
    if value not in choices:
        raise UsageError(f"invalid {option} {value!r}: choose one of {', '.join(choices)}")
    return value


def _layout(value):
    if value not in LAYOUTS:
        raise UsageError(f"invalid --layout {value!r}: choose one of {', '.join(LAYOUTS)}")
    return value


def _positive_int(value, option):
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(n) != str(value).strip():
        raise UsageError(f"invalid {option} {value!r}: give a whole number of 1 or more")
    return n


def _count(value, option):
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if n < 0 or str(n) != str(value).strip():
        raise UsageError(f"invalid {option} {value!r}: give a whole number of 0 or more")
    return n


def _nthreads(value):
    return None if value is None else _positive_int(value, "--nthreads")


def _port(value):
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = -1
    if not 0 <= port <= 65535:
        raise UsageError(
            f"invalid --scheduler-port {value!r}: give a port number, or 0 for a free one"
        )
    return port


_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _log_level(value):
    level = str(value).lower()
    if level not in _LOG_LEVELS:
        raise UsageError(f"invalid --log-level {value!r}: choose one of {', '.join(_LOG_LEVELS)}")
    return level


def parse_memory_limit(value):
    """'auto', None, a byte count, a size string ('4GB', '4 GiB') or a fraction (0.5)."""
    hint = ("use a size such as 4GB or 4GiB, a fraction of the node's memory such as 0.5, "
            "auto, or 0 for no limit")
    if value is None or value == "auto":
        return "auto"
    if isinstance(value, bool):
        raise UsageError(f"invalid --memory-limit {value!r}: {hint}")
    if isinstance(value, (int, float)):
        number = value
    else:
        text = str(value).strip()
        if text.lower() == "auto":
            return "auto"
        try:
            number = float(text)
        except ValueError:
            from dask.utils import parse_bytes

            try:  # '-1GB' parses, as -10**9: checked below like any number
                number = int(parse_bytes(text))
            except (ValueError, TypeError, OverflowError):
                raise UsageError(f"invalid --memory-limit {value!r}: {hint}") from None
    if number < 0 or number != number:
        raise UsageError(f"invalid --memory-limit {value!r}: {hint}")
    if 0 < number <= 1 and not float(number).is_integer():
        return float(number)
    if not float(number).is_integer():
        raise UsageError(f"invalid --memory-limit {value!r}: {hint}")
    return int(number)


# distributed's own schemes (distributed.comm: tcp and tls always, ws and wss with tornado),
# ours; any other comes from a package (entry points "distributed.comm.backends", e.g.
# distributed-ucxx). "inproc" joins the threads of one process: our roles are processes.
_PROTOCOLS = ("tls", "tcp", "ws", "wss", "mpi")


def _protocol(value):
    """A protocol the scheduler can listen with. Checked here, before any process starts:
    an unknown one made the scheduler fail with "Scheduler failed to start" (status 1)."""
    if value is None or value in _PROTOCOLS:
        return value
    name = str(value)
    hint = f"choose one of {', '.join(_PROTOCOLS)}, or one a package adds (ucx: distributed-ucxx)"
    if name == "inproc":
        raise UsageError("invalid --protocol 'inproc': it connects the threads of one "
                         f"process, and every role is a process of its own: {hint}")
    if name == "ucx":
        import importlib.util

        if importlib.util.find_spec("distributed_ucxx") is None:
            raise UsageError("--protocol ucx needs the distributed-ucxx package (pip install "
                             "distributed-ucxx-cu12, or -cu13): install it, or use tls")
        return name
    from importlib.metadata import entry_points

    if not entry_points(group="distributed.comm.backends", name=name):
        raise UsageError(f"invalid --protocol {value!r}: {hint}")
    return name


def _dashboard_address(value):
    """``[HOST]:PORT`` or ``PORT``, the port a number from 0 to 65535 (0: a free one). A
    bad port made Dask quietly serve the dashboard elsewhere (``:99999``); a missing one a
    one-line gaierror with status 1 (``foo``)."""
    text = str(value).strip()
    host, colon, port = text.rpartition(":")
    if not colon:
        host, port = "", text
    if host.startswith("[") and host.endswith("]"):  # [::1]:8787
        host = host[1:-1]
    if not (port.isdigit() and 0 <= int(port) <= 65535) or "://" in text or " " in host:
        raise UsageError(f"invalid --dashboard-address {value!r}: give [HOST]:PORT such as "
                         ":8787 or 127.0.0.1:8787 (port 0: a free one)")
    return text


def check_dashboard_host(settings: Settings) -> None:
    """On the scheduler's host: the dashboard's host name resolves (Dask failed with a bare
    "gaierror: Name or service not known", status 1)."""
    if not settings.dashboard:
        return
    host = str(settings.dashboard_address).rpartition(":")[0].strip("[]")
    if not host:
        return
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError) as e:
        raise UsageError(f"invalid --dashboard-address {settings.dashboard_address!r}: host "
                         f"{host!r} is unknown on {socket.gethostname()} ({e.strerror or e}): "
                         "give an address of this host, or only :PORT") from None


# dask.config values of distributed that the processes we start read only once running: a
# bad one made every worker fail with "Worker failed to start" (status 1). A table, so
# more keys are one line each: (key, kind).
_DASK_CONFIG_CHECKS = (
    ("distributed.comm.timeouts.connect", "duration"),
    ("distributed.comm.timeouts.tcp", "duration"),
    ("distributed.scheduler.allowed-failures", "count"),
    ("distributed.worker.memory.target", "fraction"),
    ("distributed.worker.memory.spill", "fraction"),
    ("distributed.worker.memory.pause", "fraction"),
    ("distributed.worker.memory.terminate", "fraction"),
)


def check_dask_config(get=None) -> None:
    """The values of :data:`_DASK_CONFIG_CHECKS` (``get``: dask.config.get, for tests)."""
    if get is None:
        import dask.config

        get = dask.config.get
    for key, kind in _DASK_CONFIG_CHECKS:
        value = get(key, None)
        if value is None:
            continue
        where = "DASK_" + key.upper().replace(".", "__").replace("-", "_")
        option = f"dask config {key} (or {where})"
        if kind == "duration":
            parse_timeout(value, option)
        elif kind == "count":
            _count(value, option)
        elif value is not False:  # fraction: False turns the threshold off
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = -1.0
            if not 0 <= number <= 1 or isinstance(value, bool):
                raise UsageError(f"invalid {option} {value!r}: give a fraction of the "
                                 "memory limit between 0 and 1, or false")


def parse_worker_options(value) -> dict:
    """A dict, or a JSON object given as text."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        parsed = json.loads(value)
    except ValueError as e:
        raise UsageError(
            f"invalid --worker-options JSON ({e}): give a JSON object such as "
            """'{"resources": {"GPU": 1}}'"""
        ) from None
    if not isinstance(parsed, dict):
        raise UsageError(
            f"invalid --worker-options {value!r}: give a JSON object such as "
            """'{"resources": {"GPU": 1}}', not a JSON """ + type(parsed).__name__
        )
    return parsed


def _time_limit(value) -> float | None:
    from dask_mpi_launch.hpc.time_limit import parse_duration

    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as e:
        raise UsageError(f"invalid --time-limit: {e}") from None


def parse_timeout(value, option) -> float:
    """Seconds from a number or a duration string ('90s', '2 minutes')."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        from dask.utils import parse_timedelta

        try:
            seconds = float(parse_timedelta(value, default="seconds"))
        except (TypeError, ValueError, KeyError):
            seconds = -1.0
    if not seconds > 0:
        raise UsageError(
            f"invalid {option} {value!r}: give a duration such as 60, 60s or 5 minutes"
        )
    return seconds


# ---------------------------------------------------------------------------
# Checks that depend on the rank's host and role (run on every rank before the
# cluster starts; the first failure is reported once for the whole job).


def check_interface(interface: str | None, names=None, ipv4=None) -> None:
    """The interface exists and has an IPv4 address, which is what Dask listens on
    (``distributed.utils.get_ip_interface``: a worker on an interface without one failed
    with "Worker failed to start"). ``names``, ``ipv4``: the host's, for tests."""
    if not interface:
        return
    if names is None:
        names = {name for _, name in socket.if_nameindex()}  # as psutil.net_if_addrs()
    names = sorted(names)
    if interface not in names:
        raise UsageError(
            f"no network interface named {interface!r} on host {socket.gethostname()}: "
            f"this host has {', '.join(names)} (choose one with --interface)"
        )
    address = interface_ipv4(interface) if ipv4 is None else ipv4(interface)
    if address is None:
        raise UsageError(
            f"network interface {interface!r} on host {socket.gethostname()} has no IPv4 "
            "address, which Dask needs: choose another with --interface, or give it one"
        )


def interface_ipv4(name: str) -> str | None:
    """The IPv4 address of interface ``name``, or None (SIOCGIFADDR: no psutil here)."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915,  # SIOCGIFADDR
                                 struct.pack("256s", name.encode()[:15]))
        except OSError:  # EADDRNOTAVAIL: no IPv4 address; ENODEV: gone
            return None
    return socket.inet_ntoa(packed[20:24])


def check_scheduler_file(path: str | None) -> None:
    """The scheduler file can be written: its directory exists and is writable, and what
    is at the path (if anything) is a scheduler file of ours that no live job holds; not
    another user's file, a link or a directory (``scheduler_file.py``)."""
    if not path:
        return
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise UsageError(
            f"cannot write the scheduler file {path}: directory {directory} does not exist "
            "(create it or choose another --scheduler-file)"
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(
            f"cannot write the scheduler file {path}: directory {directory} is not writable "
            "(choose another --scheduler-file)"
        )
    from dask_mpi_launch.security import scheduler_file

    scheduler_file.check_replaceable(path)  # nothing there, or a stale file of ours


def check_script(settings: Settings) -> None:
    """The script exists and compiles, or the module can be found."""
    if settings.module:
        if not _module_exists(settings.module):
            raise UsageError(
                f"no module named {settings.module!r} (check -m and the PYTHONPATH)"
            )
        return
    path = settings.script
    if path is None:
        return
    if not os.path.isfile(path):
        raise UsageError(f"script not found: {path} (give the path of a Python file)")
    try:
        with open(path, "rb") as f:
            source = f.read()
        compile(source, path, "exec")
    except SyntaxError as e:
        where = f"{e.filename}, line {e.lineno}" if e.lineno else path
        raise UsageError(f"syntax error in the script ({where}): {e.msg}") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the script {path}: {e}") from None


def _module_exists(name: str) -> bool:
    """Whether ``python -m name`` finds a module, without running any of its packages'
    code (``importlib.util.find_spec`` imports the parents: their ``__init__`` is the user's
    code, to run in the client role only)."""
    import importlib.machinery
    import sys

    path = [os.getcwd(), *sys.path]  # as python -m does
    spec = None
    for part in name.split("."):
        if not part.isidentifier():
            return False
        if spec is None and part in sys.builtin_module_names:
            return "." not in name
        try:
            spec = importlib.machinery.PathFinder.find_spec(part, path)
        except (ImportError, ValueError):
            return False
        if spec is None:
            return False
        path = spec.submodule_search_locations or []
    if spec is not None and spec.submodule_search_locations is not None:
        # a package runs as its __main__ submodule (python -m email: "is a package and
        # cannot be directly executed", a runpy traceback on the client's rank)
        try:
            main = importlib.machinery.PathFinder.find_spec("__main__", path)
        except (ImportError, ValueError):
            main = None
        if main is None:
            raise UsageError(f"-m {name}: {name!r} is a package without a __main__ module, "
                             "so python -m cannot run it: give one of its modules "
                             f"(-m {name}.MODULE)")
    return True


def check_worker_class(name: str) -> None:
    """The worker class can be imported (imports it: do this after MPI init)."""
    from distributed.utils import import_term

    try:
        import_term(name)
    except Exception as e:  # ImportError, AttributeError, ValueError...
        raise UsageError(
            f"cannot use --worker-class {name!r}: {type(e).__name__}: {e} "
            "(give an importable class such as distributed.Worker or distributed.Nanny)"
        ) from None
