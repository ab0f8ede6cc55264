"""The rooms of the package and their floors (issue 22), checked by import-linter.

The contracts live in pyproject.toml (``[tool.importlinter]``): each room imports only the
rooms below it, and no two modules of a room import each other, counting imports made
inside functions (import-linter reads every import statement, not only the module's top).
A toy package with both faults shows that the same contracts do break."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dask_mpi_launch"
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed "
                                "(pip install -e '.[test]')")


def _lint(cwd: Path, config: Path | None = None) -> subprocess.CompletedProcess:
    argv = [str(LINT), "--no-cache"] + (["--config", str(config)] if config else [])
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_package_keeps_its_contracts():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout, result.stdout


def test_an_upward_import_inside_a_function_and_a_loop_break_the_contracts(tmp_path):
    """The same two contracts on a toy package: ``low`` imports ``high`` inside a function
    (the kind of hidden arrow issue 22 found), and two modules of ``low`` import each other."""
    pkg = tmp_path / "toy"
    for name, text in {
        "__init__.py": "",
        "high/__init__.py": "",
        "high/front.py": "from toy.low import a\n",
        "low/__init__.py": "",
        "low/a.py": "from toy.low import b\n\ndef later():\n    from toy.high import front\n",
        "low/b.py": "from toy.low import a\n",
    }.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    config = tmp_path / ".importlinter"
    config.write_text(textwrap.dedent("""\
        [importlinter]
        root_package = toy

        [importlinter:contract:floors]
        name = floors
        type = layers
        containers = toy
        layers =
            high
            low

        [importlinter:contract:loops]
        name = loops
        type = acyclic_siblings
        ancestors =
            toy
            toy.*
        """))
    result = _lint(tmp_path, config)
    assert result.returncode != 0
    assert "0 kept, 2 broken" in result.stdout, result.stdout
    assert "toy.low.a -> toy.high.front" in result.stdout, result.stdout


def test_the_top_level_holds_only_the_front_doors():
    """A newcomer finds the ways in at the top (the command, ``initialize``/``execute``),
    and everything else in a room whose name says its purpose."""
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "bootstrap.py", "cli.py", "execute.py"], top
    rooms = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert rooms == ["base", "configure", "control", "dataplane", "hpc", "process", "roles",
                     "security", "tuning"], rooms
    for room in rooms:  # each room says what lives there and what it may import
        assert "import" in (PACKAGE / room / "__init__.py").read_text(), room
