"""The documentation builds with warnings as errors, offline, as ./bin/docs builds it.

The CLI reference comes from the click command (sphinx-click) and the API reference from
the docstrings (autodoc), so a changed option or signature that breaks them fails here.
Skipped (outside CI) when Sphinx is not installed: pip install -e '.[docs]'.
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

from conftest import unavailable

ROOT = Path(__file__).resolve().parent.parent


def test_docs_build_without_warnings(tmp_path):
    missing = [m for m in ("sphinx", "sphinx_click", "pydata_sphinx_theme")
               if importlib.util.find_spec(m) is None]
    if missing:
        unavailable(f"{', '.join(missing)} not installed: pip install -e '.[docs]'")
    # the same command line as bin/docs
    command = (ROOT / "bin" / "docs").read_text().rsplit("exec ", 1)[1].split()
    assert command[:4] == ['"$python"', "-m", "sphinx", "-W"], command
    argv = [sys.executable, *command[1:command.index("docs")],
            str(ROOT / "docs"), str(tmp_path / "html"), "-d", str(tmp_path / "doctrees")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stdout}\n{proc.stderr}"
    cli = (tmp_path / "html" / "cli.html").read_text()
    for option in ("--layout", "--worker-processes", "--scheduler-file", "--jupyter"):
        assert option in cli, f"{option} missing from the generated CLI reference"
    api = (tmp_path / "html" / "api.html").read_text()
    for name in ("initialize", "send_close_signal", "connect"):
        assert f'id="dask_mpi_launch.{name}"' in api, f"{name} missing from the API reference"
