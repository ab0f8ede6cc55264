"""record.Record: what Settings, Layout and Ended used of @dataclass(frozen=True), without
importing dataclasses in the ranks (in-process, milliseconds)."""
import dataclasses
import pickle

import pytest

from dask_mpi_launch.base.layout import Layout
from dask_mpi_launch.base.record import Record, factory, replace
from dask_mpi_launch.configure.settings import Settings
from dask_mpi_launch.base.status import Ended


class Point(Record):
    x: int
    y: int = 0
    tags: dict = factory(dict)

    def __post_init__(self):
        if self.x < 0:
            raise ValueError("negative")


def test_fields_defaults_and_construction():
    assert Point.FIELDS == ("x", "y", "tags")
    p, q = Point(1), Point(1)
    assert (p.x, p.y, p.tags) == (1, 0, {})
    assert p.tags is not q.tags  # a factory's default is made anew
    assert Point(1, 2) == Point(x=1, y=2) != Point(1, 3)
    assert hash(Layout("dedicated", 4)) == hash(Layout("dedicated", 4))
    assert repr(Point(1, 2)) == "Point(x=1, y=2, tags={})"
    for bad in (lambda: Point(), lambda: Point(1, z=2), lambda: Point(1, x=1),
                lambda: Point(1, 2, {}, 4)):
        with pytest.raises(TypeError):
            bad()
    with pytest.raises(ValueError):
        Point(-1)  # __post_init__ ran


def test_frozen_as_a_dataclass_is():
    p = Point(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.x = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        del p.y
    with pytest.raises(AttributeError):
        Ended(exited=0).signal = 9


def test_replace_and_pickle():
    s = Settings(script="job.py", nthreads=2)
    t = replace(s, nthreads=3)
    assert (s.nthreads, t.nthreads, t.script) == (2, 3, "job.py")
    assert pickle.loads(pickle.dumps(t)) == t
    layout = Layout("dedicated", 4)
    assert layout.client_rank == 1  # set by __post_init__
    assert replace(layout, client_rank=None, scheduler_rank=1).client_rank == 0  # runs again
    assert pickle.loads(pickle.dumps(Ended.from_wait(9))).describe() == \
        "was killed by signal 9 (SIGKILL)"
