"""Tiny tests for the pure parts of benchmarks/startup.py: python -m pytest benchmarks/test_render.py"""
import doctest
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import startup  # noqa: E402


def _run(variant, n, wall, status="ok", workers=None):
    return {"variant": variant, "n": n, "status": status, "wall": wall, "first": None,
            "client": None, "teardown": None, "workers": workers, "stderr_lines": 0}


def test_doctests():
    assert doctest.testmod(startup).failed == 0


def test_common_doctests():
    assert doctest.testmod(common).failed == 0


def test_pick_mpi_and_command_line():
    meta = {"mpi_library": "MPICH Version: 4.2.0"}
    assert common.pick_mpi(meta, "openmpi") == "openmpi" and meta["mpi_kind"] == "openmpi"
    assert common.pick_mpi(meta, "auto") == "mpich"
    assert common.command_line(["--ranks", "4"]).endswith(" --ranks 4")
    assert common.results_dir() == Path(startup.__file__).resolve().parent / "results"


def test_write_results_files(tmp_path):
    import argparse
    import json
    args = argparse.Namespace(out=tmp_path / "r", repeat=2)
    md_path, json_path = common.write_results(tmp_path / "r", "x", "# x\n",
                                              {"args": common.args_record(args)})
    assert md_path.read_text() == "# x\n"
    assert json_path.read_text() == json.dumps({"args": {"out": str(tmp_path / "r"),
                                                         "repeat": 2}}, indent=1) + "\n"


def test_interleave_skips_what_cannot_work():
    calls = []

    def run(v):
        calls.append(v)
        return {"skip": True, "note": "no tls"} if v == "tls" else {"payload": len(calls)}

    out = common.interleave(2, ["tcp", "tls"], run)
    assert calls == ["tcp", "tls", "tcp"]
    assert [r["payload"] for r in out["tcp"]] == [1, 3] and len(out["tls"]) == 1
    assert all(isinstance(r["load1"], float) for rs in out.values() for r in rs)


def test_summarize_ratios_and_failures():
    runs = [_run("floor", 4, 1.0), _run("floor", 4, 1.2), _run("dask-mpi", 4, 1.5, workers=2),
            _run("dask-mpi", 4, 1.7, workers=1), _run("ours", 4, 0.0, "error"),
            _run("hang", 4, 60.0, "timeout")]
    rows = {r["variant"]: r for r in startup.summarize(runs, timeout=60)}
    assert rows["floor"]["wall"] == {"median": 1.1, "min": 1.0, "max": 1.2}
    assert rows["dask-mpi"]["x_floor"] == round(1.6 / 1.1, 3)
    assert rows["dask-mpi"]["x_dask-mpi"] == 1.0
    assert rows["dask-mpi"]["workers"] == [1, 2]
    assert rows["ours"]["wall"] is None and rows["ours"]["x_floor"] is None
    md = startup.render_markdown({"packages": {"dask": "1"}}, list(rows.values()), "startup.py")
    assert "| ours | 4 | 0/1 | error |" in md
    assert "| hang | 4 | 0/1 | > 60 s |" in md
    assert "| dask-mpi | 4 | 2/2 | 1.60 (1.50–1.70) | 1.46× | 1.00× |" in md


def test_timeout_kills_process_group(tmp_path):
    import os
    import time
    # The child starts a grandchild that would outlive a plain kill of the child.
    argv = [sys.executable, "-c",
            "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(30)']); time.sleep(30)"]
    t = time.time()
    raw = startup.run_once(argv, dict(os.environ), str(tmp_path), timeout=0.5)
    assert raw["timed_out"] and time.time() - t < 5


if __name__ == "__main__":
    import pytest
    sys.exit(pytest.main([__file__, "-q"]))
