"""The messages between ranks, typed: one :class:`Message` class per kind, encoded in one place.

On the wire a message stays what it always was, a tuple ``(kind, *fields)`` of plain data
(str, int, float, list, dict, None), which both control planes carry unchanged (over MPI,
``control/over_mpi.py``; over files, ``control/over_files.py``). In the code it is a
:class:`~dask_mpi_launch.base.record.Record` with named fields: a message is built by name
(``Fail(rank=3, host=..., ...)``), unpacks to its wire tuple (``control.send(0, *message)``)
and is read back with :func:`decode`, which refuses a kind it does not know, or a wrong
number of fields, with one line (:class:`UnknownMessage`).

The table of the control conversation (``docs/messages.rst``, and the control plane's
docstring) is :func:`table`'s output; ``tests/test_messages.py`` checks that it matches.

Imports only the standard library and ``base`` (a thin rank imports this module).
"""
from __future__ import annotations

import json

from dask_mpi_launch.base.errors import LaunchError
from dask_mpi_launch.base.record import Record

#: conversation -> {kind: class}
REGISTRY: dict[str, dict[str, type]] = {}


class UnknownMessage(LaunchError):
    """A message this version does not know: one line, never a traceback."""


class Message(Record):
    """A typed message: subclasses set ``KIND`` and ``CONVERSATION``, declare fields as
    annotations, and document who sends it to whom in ``ROUTE``."""

    KIND = ""
    CONVERSATION = ""
    ROUTE = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.KIND:
            known = REGISTRY.setdefault(cls.CONVERSATION, {})
            if cls.KIND in known:
                raise TypeError(f"two messages of kind {cls.KIND!r} in {cls.CONVERSATION!r}")
            known[cls.KIND] = cls

    def encode(self) -> tuple:
        """The wire form: ``(kind, *fields)``."""
        return (self.KIND, *self._values())

    def __iter__(self):  # control.send(dest, *message)
        return iter(self.encode())


def decode(conversation: str, data) -> Message:
    """The typed message of a wire tuple of ``conversation``; :class:`UnknownMessage` for
    anything else."""
    known = REGISTRY.get(conversation, {})
    if not isinstance(data, (tuple, list)) or not data or not isinstance(data[0], str):
        raise UnknownMessage(f"a {conversation} message that is not (kind, *fields): "
                             f"{str(data)[:80]!r} (ranks of different versions?)")
    kind, *fields = data
    cls = known.get(kind)
    if cls is None:
        raise UnknownMessage(f"unknown {conversation} message {kind!r} (ranks of different "
                             f"dask-mpi-launch versions?); known: {', '.join(sorted(known))}")
    if len(fields) != len(cls.FIELDS):
        raise UnknownMessage(f"{conversation} message {kind!r} has {len(fields)} fields, "
                             f"expected {len(cls.FIELDS)} ({', '.join(cls.FIELDS)})")
    return cls(*fields)


def table(conversation: str) -> str:
    """The reStructuredText table of a conversation's messages: kind, fields, route, and
    the class's docstring (what it carries beyond its fields)."""
    rows = [(cls.KIND, ", ".join(cls.FIELDS) or "(none)", cls.ROUTE, _doc(cls))
            for cls in REGISTRY[conversation].values()]
    return _rst_table(("kind", "fields", "from -> to", "what"), rows)


def _doc(cls) -> str:
    return " ".join((cls.__doc__ or "").split())


def _rst_table(head: tuple, rows: list) -> str:
    """A reStructuredText simple table of ``rows`` under ``head``."""
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    rule = "  ".join("=" * w for w in widths)
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([rule, line(head), rule, *map(line, rows), rule])


# ---------------------------------------------------------------------------
# the control conversation: between the ranks' supervisors

CONTROL = "control"


class _Control(Message):
    CONVERSATION = CONTROL


class CheckFailed(_Control):
    KIND, ROUTE = "check-failed", "any -> rank 0, while checking"
    rank: int
    host: str
    role: str
    message: str
    status: int


class Hello(_Control):
    KIND, ROUTE = "hello", "any -> rank 0 (for the banner)"
    rank: int
    host: str
    roles: list


class Address(_Control):
    """address, identity, dashboard, name_prefix, host, interfaces, network, credentials"""
    KIND, ROUTE = "address", "scheduler rank -> all"
    info: dict


class Ready(_Control):
    KIND, ROUTE = "ready", "worker rank -> rank 0"
    rank: int
    host: str
    names: list


class AllReady(_Control):
    KIND, ROUTE = "all-ready", "rank 0 -> client rank"
    workers: int


class Stdin(_Control):
    """latin-1 text of the job's stdin; '' is its end"""
    KIND, ROUTE = "stdin", "rank 0 -> client rank"
    text: str


class Jupyter(_Control):
    KIND, ROUTE = "jupyter", "client rank -> rank 0"
    url: str


class Fail(_Control):
    KIND, ROUTE = "fail", "any -> rank 0 (which tells everyone)"
    rank: int
    host: str
    role: str
    message: str
    status: int
    priority: int


class Stop(_Control):
    KIND, ROUTE = "stop", "any -> all"
    status: int
    priority: int


class Closed(_Control):
    KIND, ROUTE = "closed", "client rank -> scheduler rank"
    rank: int


class SchedulerClosed(_Control):
    KIND, ROUTE = "scheduler-closed", "scheduler rank -> all"


class Deadline(_Control):
    """the allocation's end (epoch seconds, None: no limit) and who said it (Slurm, ...)"""
    KIND, ROUTE = "deadline", "rank 0 -> all (it alone asks the batch system)"
    end: object
    source: str


class RankRecord(_Control):
    """--record: the rank's facts for summary.json (host, roles, its children's ends,
    restarts, peak memory, bytes sent), once its roles stopped"""
    KIND, ROUTE = "rank-record", "any -> rank 0, before the status is agreed"
    rank: int
    facts: dict


# ---------------------------------------------------------------------------
# the zygote conversation: a rank and the process that forks its roles (its own zygote, or
# its node's), pickled over a private socketpair or a Unix socket whose peer is checked to
# be the same user; the role's pipe, stdin and the rank's stdout/stderr travel as fds

ZYGOTE = "zygote"


class _Zygote(Message):
    CONVERSATION = ZYGOTE


class ParseRequest(_Zygote):
    """+ fds [stdout, stderr]: the rank's command line, parsed as the rank"""
    KIND, ROUTE = "parse", "rank -> zygote"
    argv: list
    env: dict
    cwd: str


class StartRole(_Zygote):
    """+ fds [pipe, stdin?]: fork a role with its RoleSpec"""
    KIND, ROUTE = "start", "rank -> zygote"
    role: str
    label: str
    spec: object
    returns: bool
    has_stdin: bool


class CheckValue(_Zygote):
    KIND, ROUTE = "check", "rank -> zygote"
    what: str
    value: object


class Exit(_Zygote):
    KIND, ROUTE = "exit", "rank -> zygote (the rank is done)"


class RolesReady(_Zygote):
    """the roles' modules are imported (or the one line saying why not)"""
    KIND, ROUTE = "ready", "zygote -> rank, first"
    error: object


class Parsed(_Zygote):
    """result: ("settings", settings, check) | ("status", n) | ("error", message)"""
    KIND, ROUTE = "parsed", "zygote -> rank"
    result: tuple


class Started(_Zygote):
    KIND, ROUTE = "started", "zygote -> rank"
    pid: int


class Checked(_Zygote):
    KIND, ROUTE = "checked", "zygote -> rank"
    error: object


class Refused(_Zygote):
    KIND, ROUTE = "error", "zygote -> rank (a role could not start)"
    message: str


class Exited(_Zygote):
    """a role of this rank ended (the node's zygote is its parent, not the rank)"""
    KIND, ROUTE = "exited", "node zygote -> rank"
    pid: int
    status: int


# ---------------------------------------------------------------------------
# role specs: what a role process is started with (``process/starting.py`` makes them, the
# zygote forks the role with one, ``roles/run.py`` runs it); plain data, pickled to the
# zygote with StartRole


class RoleSpec(Record):
    """What every role gets: the job's settings, the dask config for its size
    (``tuning/scale.py``), and, from a node's shared zygote, the rank's environment,
    working directory and CPU affinity (the role is not the rank's child there)."""

    ROLE = ""  # the role's name as the layout says it (base/layout.py)
    settings: object = None
    dask_config: object = None
    env: object = None
    cwd: object = None
    affinity: object = None
    log: object = None  # --record: the file its stdout and stderr are copied to

    @property
    def runs(self) -> str:
        """What the process runs, and its title (``dml-<runs>``)."""
        return self.ROLE


class SchedulerSpec(RoleSpec):
    ROLE = "scheduler"
    new_credentials: bool = False  # TLS: the scheduler makes the job's credentials


class WorkerSpec(RoleSpec):
    ROLE = "worker"
    address: str = ""
    name: str = ""
    nthreads: object = None
    memory_limit: object = None
    credentials: object = None
    scheduler_info: object = None  # the scheduler's host and interfaces (for diagnosis)


#: what a client role runs: the user's script (or module), JupyterLab, or the caller of
#: initialize() itself (its process returns into the script instead of running a body)
CLIENT_KINDS = ("script", "jupyter", "initialize")


class ClientSpec(RoleSpec):
    """kind: script, jupyter or initialize (CLIENT_KINDS)"""
    ROLE = "client"
    kind: str = "script"
    address: str = ""
    credentials: object = None
    scheduler_info: object = None

    def __post_init__(self):
        if self.kind not in CLIENT_KINDS:
            raise ValueError(f"unknown client kind {self.kind!r}: one of {CLIENT_KINDS}")

    @property
    def runs(self) -> str:
        return self.kind


def specs_table() -> str:
    """The reStructuredText table of the role specs: role, its own fields, the docstring."""
    rows = [(cls.ROLE or "(every role)",
             ", ".join(f for f in cls.FIELDS if cls is RoleSpec or f not in RoleSpec.FIELDS),
             _doc(cls))
            for cls in (RoleSpec, SchedulerSpec, WorkerSpec, ClientSpec)]
    return _rst_table(("role", "fields", "what"), rows)


# ---------------------------------------------------------------------------
# the event conversation: a role process tells its rank what happened, one JSON object a
# line on its private pipe ({"event": kind, field: value, ...}); fields may be left out

EVENT = "event"


class _Event(Message):
    CONVERSATION = EVENT


class ListensAt(_Event):
    """the scheduler's address, and what helps the ranks connect (credentials made here)"""
    KIND, ROUTE = "address", "scheduler -> its rank"
    address: str = ""
    identity: object = None
    dashboard: object = None
    credentials: object = None
    interfaces: object = None
    network: object = None


class WorkerReady(_Event):
    KIND, ROUTE = "ready", "worker -> its rank"
    name: str = ""
    address: object = None


class RoleError(_Event):
    """one line: why the role cannot go on (the rank fails the job with it)"""
    KIND, ROUTE = "error", "any role -> its rank"
    message: str = "unknown error"


class Leaving(_Event):
    """a worker ends with 0 only after saying why (a close it was asked for)"""
    KIND, ROUTE = "leaving", "worker -> its rank"
    reason: str = ""


class WorkerStats(_Event):
    """--record: bytes the worker sent to peers and clients, its peak memory (bytes)"""
    KIND, ROUTE = "stats", "worker -> its rank, as it leaves"
    bytes_sent: int = 0
    peak_memory: int = 0


class LabOpen(_Event):
    """JupyterLab's URLs (lab, dashboard), with their token"""
    KIND, ROUTE = "jupyter", "client (JupyterLab) -> its rank"
    url: object = None


def event_line(kind: str, **fields) -> bytes:
    """An event as its role writes it: one JSON object and a newline."""
    return (json.dumps({"event": kind, **fields}) + "\n").encode()


def decode_event(obj) -> Message:
    """The typed event of one decoded JSON line; :class:`UnknownMessage` for anything
    else (a field this version does not know included)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
        raise UnknownMessage(f"an event that is not {{'event': kind, ...}}: {str(obj)[:80]!r}")
    fields = {k: v for k, v in obj.items() if k != "event"}
    cls = REGISTRY[EVENT].get(obj["event"])
    if cls is None:
        raise UnknownMessage(f"unknown event {obj['event']!r}; known: "
                             f"{', '.join(sorted(REGISTRY[EVENT]))}")
    unknown = sorted(set(fields) - set(cls.FIELDS))
    if unknown:
        raise UnknownMessage(f"event {cls.KIND!r} has unknown fields {', '.join(unknown)}")
    return cls(**fields)
