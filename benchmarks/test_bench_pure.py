"""Doctests of the pure parts of benchmarks/dataplane.py and benchmarks/scale*.py:
python -m pytest benchmarks/test_bench_pure.py (needs no MPI; importing needs only the stdlib)."""
import doctest
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataplane  # noqa: E402
import scale  # noqa: E402
import scale_report  # noqa: E402
import scale_trial  # noqa: E402


def test_dataplane_doctests():
    assert doctest.testmod(dataplane).failed == 0


def test_scale_doctests():
    for module in (scale, scale_report, scale_trial):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_scale_child_commands_and_entry_point():
    assert scale_trial.SCALE_PY == str(Path(scale.__file__).resolve())
    assert scale.run_child(["--workers", "250"]) is None  # the parent's command line


def test_scale_summary_and_tables():
    row = {"variant": "default", "n": 1000, "status": "ok", "connected": 1000, "t50": 1.0,
           "t90": 2.0, "t_all": 2.5, "rate": 400.0, "peak": 500.0, "sched_cpu": 0.5,
           "sched_ms": 1.2, "sched_cap": 833, "settle_cpu": 0.1, "unresponsive": 0,
           "unresponsive_max": None, "lat50": 1.0, "lat99": 2.0, "latmax": 2.1, "retries": 0,
           "failed": 0, "worker_cpu": 5.0, "sched_rss": 100.0, "load1": 1.0}
    big = dict(row, n=3000, t_all=30.0, rate=100.0, sched_ms=5.0, retries=300)
    meta = {"cores": 2, "packages": {"distributed": "x"}}
    text = scale.write_summary([row, big], [dict(big, variant="connect=5s", retries=3000)],
                               {"1000": 0.001}, meta)
    assert "throughput falls from 400 to 100 workers/s" in text
    assert "`connect=5s` 3000 connect retries vs 300" in text
    md = scale.render_markdown(meta, [row, big], [], {"1000": 0.001}, "scale.py", text, 60)
    assert "| default | 1000 | ok | – | 2.50 |" in md and "Fit: 1.00 µs" in md


def test_dataplane_render_with_failed_tls():
    payload = {"protocol": "tcp", "sizes": {"8388608": {"bytes": 8388608, "task": [0.01],
                                                        "transfer": [0.005]}}}
    results = {"tcp": {"payload": payload},
               "tls": {"payload": None, "note": dataplane.TLS_UNSUPPORTED}}
    md = dataplane.render_markdown({"packages": {}}, results, "dataplane.py")
    assert dataplane.TLS_UNSUPPORTED in md
    assert "| 8 MiB | 0.84 | 1.68 |" in md
