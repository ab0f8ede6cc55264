"""Typed messages between ranks (base/messages.py), in-process: round trips, refusals with
one line, the docs' table generated from the classes, and the supervisors' conversation
over the in-memory world (memworld) carried as typed messages."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from dask_mpi_launch.base import messages
from dask_mpi_launch.base.errors import LaunchError
from dask_mpi_launch.base.messages import (CONTROL, Address, Closed, Fail, Hello, SchedulerClosed,
                                           Stop, UnknownMessage, decode)

ROOT = Path(__file__).resolve().parent.parent

EXAMPLES = [
    Hello(3, "node7", ["worker"]),
    Address({"address": "tls://10.0.0.1:8786", "credentials": None}),
    Fail(rank=2, host="node2", role="worker", message="killed", status=137, priority=3),
    Stop(1, 3),
    Closed(1),
    SchedulerClosed(),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.KIND)
def test_round_trip_through_the_wire(message):
    wire = pickle.loads(pickle.dumps(tuple(message)))  # what MPI carries: plain data
    assert type(wire) is tuple and wire[0] == message.KIND
    assert all(type(v) in (str, int, float, list, dict, type(None)) for v in wire)
    assert decode(CONTROL, wire) == message


def test_fields_are_named_and_frozen():
    m = Fail(rank=2, host="h", role="worker", message="m", status=1, priority=3)
    assert (m.rank, m.status, m.priority) == (2, 1, 3)
    with pytest.raises(Exception):
        m.status = 0
    with pytest.raises(TypeError):
        Stop(1)  # a field missing


@pytest.mark.parametrize("wire, fragment", [
    (("hello-again", 1), "unknown control message 'hello-again'"),
    (("stop", 1), "message 'stop' has 1 fields, expected 2 (status, priority)"),
    (("stop", 1, 2, 3), "has 3 fields, expected 2"),
    ("stop", "not (kind, *fields)"),
    ((), "not (kind, *fields)"),
])
def test_an_unknown_message_is_refused_with_one_line(wire, fragment):
    with pytest.raises(UnknownMessage) as e:
        decode(CONTROL, wire)
    assert isinstance(e.value, LaunchError)  # one line at the top, never a traceback
    assert fragment in e.value.message and "\n" not in e.value.message


def test_every_kind_is_one_class():
    kinds = messages.REGISTRY[CONTROL]
    assert len(kinds) == 13
    with pytest.raises(TypeError, match="two messages of kind 'stop'"):
        class Again(messages.Message):
            KIND, CONVERSATION = "stop", CONTROL


@pytest.mark.parametrize("conversation", ["control", "zygote", "event"])
def test_the_docs_table_is_the_classes(conversation):
    page = (ROOT / "docs" / "messages.rst").read_text()
    start = page.index(f".. {conversation}-messages-start") + len(f".. {conversation}-messages-start")
    table = page[start:page.index(f".. {conversation}-messages-end")].strip()
    assert table == messages.table(conversation)


def test_the_docs_table_of_role_specs_is_the_classes():
    page = (ROOT / "docs" / "messages.rst").read_text()
    start = page.index(".. role-specs-start") + len(".. role-specs-start")
    assert page[start:page.index(".. role-specs-end")].strip() == messages.specs_table()


def _exits_7(child):
    child.exit(7)


def test_supervisors_talk_in_typed_messages(tmp_path):
    """A whole job over the in-memory world: the supervisors' conversation decodes."""
    import memworld

    from dask_mpi_launch.configure.settings import Settings

    script = tmp_path / "job.py"
    script.write_text("pass\n")
    settings = Settings(script=str(script), tls=False, quiet=True, shutdown_timeout=2.0,
                        wait_timeout=5.0, startup_timeout=5.0, worker_restarts=0)

    seen = []
    original = messages.decode

    def spy(conversation, data):
        message = original(conversation, data)
        seen.append(message.KIND)
        return message

    from dask_mpi_launch.process import supervisor

    supervisor.decode, saved = spy, supervisor.decode
    try:
        statuses, _, _ = memworld.run_job(4, settings, {(1, "script"): _exits_7})
    finally:
        supervisor.decode = saved
    assert statuses == [7, 7, 7, 7]
    assert {"address", "ready", "all-ready", "stop"} <= set(seen), seen


def test_role_specs_say_what_runs_and_travel_pickled():
    from dask_mpi_launch.base.messages import ClientSpec, SchedulerSpec, StartRole, WorkerSpec
    from dask_mpi_launch.base.record import replace

    specs = [SchedulerSpec(new_credentials=True),
             WorkerSpec(address="tls://a:1", name="3", nthreads=2, memory_limit=2**30),
             ClientSpec(kind="jupyter", address="tls://a:1")]
    assert [s.ROLE for s in specs] == ["scheduler", "worker", "client"]  # the layout's names
    assert [s.runs for s in specs] == ["scheduler", "worker", "jupyter"]  # the titles
    for spec in specs:
        wire = pickle.loads(pickle.dumps(tuple(StartRole("worker", "w", spec, False, False))))
        assert decode("zygote", wire).spec == spec
    node = replace(specs[1], env={"A": "1"}, cwd="/", affinity=[0])
    assert node.name == "3" and node.env == {"A": "1"} and specs[1].env is None
    with pytest.raises(ValueError, match="unknown client kind 'notebook'"):
        ClientSpec(kind="notebook")


def test_events_from_a_role_are_typed_and_unknown_ones_refused():
    import json

    from dask_mpi_launch.base.messages import (Leaving, ListensAt, RoleError, decode_event,
                                               event_line)

    line = event_line("address", address="tls://a:1", interfaces={"ib0": ["10.0.0.1"]})
    m = decode_event(json.loads(line))
    assert line.endswith(b"\n") and isinstance(m, ListensAt)
    assert (m.address, m.interfaces, m.dashboard) == ("tls://a:1", {"ib0": ["10.0.0.1"]}, None)
    assert decode_event({"event": "error"}) == RoleError("unknown error")  # fields may be left out
    assert decode_event({"event": "leaving", "reason": "x"}) == Leaving("x")
    for bad, fragment in [({"event": "hello"}, "unknown event 'hello'"),
                          ({"event": "ready", "colour": 1}, "unknown fields colour"),
                          (["ready"], "not {'event': kind, ...}")]:
        with pytest.raises(UnknownMessage, match=fragment):
            decode_event(bad)
