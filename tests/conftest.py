import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from launch import IMPLEMENTATIONS, Venv  # noqa: E402

IN_CI = os.environ.get("CI") == "true"


def unavailable(reason: str):
    """Skip with the reason, but fail in CI, where everything must run."""
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(params=IMPLEMENTATIONS, scope="session")
def venv(request) -> Venv:
    v = Venv(request.param)
    if not v.exists():
        unavailable(f"no {request.param} venv at {v.path}: run ./bin/test (it creates it)")
    return v


@pytest.fixture(scope="session")
def mpich() -> Venv:
    v = Venv("mpich")
    if not v.exists():
        unavailable(f"no mpich venv at {v.path}: run ./bin/test (it creates it)")
    return v


@pytest.fixture
def script(tmp_path):
    """Write a script file from text: ``script("print(1)")`` -> path."""
    counter = iter(range(1000))

    def make(text: str, name: str | None = None) -> Path:
        path = tmp_path / (name or f"script{next(counter)}.py")
        path.write_text(text)
        return path

    return make


@pytest.fixture(scope="session")
def slurm():
    """The live one-node Slurm (tests/slurm_cluster.py), one per session, shared by every
    test module that submits to a single node (the templates, the time limit)."""
    from slurm_cluster import SlurmCluster, SlurmError, ensure_slurm_installed

    reason = ensure_slurm_installed()
    if reason:
        unavailable(reason)
    cluster = SlurmCluster()
    try:
        cluster.start()
    except SlurmError as e:
        cluster.stop()
        unavailable(f"Slurm could not be started: {e}")
    try:
        print(f"slurm cluster up in {cluster.start_seconds:.2f} s")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def sge():
    """The live one-host Grid Engine cell (tests/sge_cluster.py), one per session: its
    daemons use fixed ports and a machine-wide lock, so every test that needs a cell shares
    this one (a second cell would wait for the lock)."""
    from sge_cluster import GridEngine, SGEError, ensure_sge_installed

    reason = ensure_sge_installed()
    if reason:
        unavailable(reason)
    cell = GridEngine()
    try:
        cell.start()
    except SGEError as e:
        cell.stop()
        unavailable(f"Grid Engine could not be started: {e}")
    try:
        print(f"grid engine cell up in {cell.start_seconds:.2f} s")
        yield cell
    finally:
        cell.stop()
