"""scale.py's statistics and rendering (pure): a row per trial, the tables, the summary paragraph
for the README, the plot, and re-rendering from an earlier scale.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_lines, write_results  # noqa: E402


def quantile(xs: list[float], q: float) -> float | None:
    """Nearest-rank quantile.

    >>> quantile([1, 2, 3, 4], 0.5), quantile([1, 2, 3, 4], 0.9), quantile([], 0.5)
    (2, 4, None)
    """
    if not xs:
        return None
    xs = sorted(xs)
    return xs[max(0, min(len(xs) - 1, int(-(-q * len(xs) // 1)) - 1))]


def peak_rate(arrivals: list[float], window: float = 1.0) -> float:
    """Most arrivals in any `window` seconds, per second.

    >>> peak_rate([0.0, 0.1, 0.2, 1.5, 1.6])
    3.0
    """
    best, j = 0, 0
    xs = sorted(arrivals)
    for i, x in enumerate(xs):
        while xs[j] < x - window:
            j += 1
        best = max(best, i - j + 1)
    return best / window


def summarize(trial: dict) -> dict:
    """One table row from one trial."""
    n, arr = trial["n"], sorted(trial.get("arrivals") or [])
    reports = [r for r in trial.get("workers") or [] if r]
    row = {
        "variant": trial["variant"], "n": n, "status": trial["status"],
        "connected": trial.get("connected"),
        **_arrival_times(arr, n), **_scheduler_cost(trial, arr), **_worker_side(trial, reports),
        "sched_rss": trial.get("maxrss_mb"), "load1": trial.get("load1"),
        "sched_fds": trial.get("fds"),
        "worker_rss": max((r.get("maxrss_mb") or 0 for r in reports), default=None),
        "config": trial.get("config") or {},
        "teardown_order": trial.get("teardown_order"),
        "teardown_status": trial.get("teardown_status"),
        "t_sched_gone": trial.get("t_sched_gone"), "t_all_gone": trial.get("t_all_gone"),
        "sched_teardown_cpu": trial.get("cpu_teardown"),
    }
    if trial["status"] != "ok":
        row["why"] = trial.get("why") or f"{trial.get('connected')} of {n} connected"
    return row


def _arrival_times(arr: list[float], n: int) -> dict:
    """Seconds from GO until shares of the n workers had registered, and the rates.

    >>> _arrival_times([1.0, 2.0, 3.0], 3)
    {'t50': 2.0, 't90': None, 't_first': 1.0, 't_all': 3.0, 'rate': 1.5, 'peak': 2.0}
    """
    t_all = arr[n - 1] if len(arr) >= n else None
    return {
        "t50": quantile(arr, 0.5) if len(arr) >= n // 2 else None,
        "t90": arr[int(0.9 * n) - 1] if len(arr) >= int(0.9 * n) and n >= 10 else None,
        "t_first": arr[0] if arr else None,
        "t_all": t_all,
        # registrations per second once they started: the time before the first one is the
        # simulated workers' own construction, serialised in a few processes here but
        # parallel on a cluster
        "rate": round(n / (t_all - arr[0]), 1) if t_all and t_all > arr[0] else None,
        "peak": peak_rate(arr) if arr else None,
    }


def _scheduler_cost(trial: dict, arr: list[float]) -> dict:
    """The scheduler's CPU during the registration and after, and its event-loop stalls."""
    slog = trial.get("log") or {}
    return {
        "sched_cpu": round(trial["cpu_reg"] / trial["wall_reg"], 2)
        if trial.get("wall_reg") else None,
        # scheduler CPU per registered worker, and the rate the scheduler alone could sustain
        "sched_ms": round(1e3 * trial["cpu_reg"] / max(1, len(arr)), 2)
        if trial.get("cpu_reg") is not None else None,
        "sched_cap": round(len(arr) / trial["cpu_reg"]) if trial.get("cpu_reg") else None,
        "settle_cpu": round(trial["cpu_settle"] / trial["wall_settle"], 2)
        if trial.get("wall_settle") else None,
        "unresponsive": slog.get("Event loop was unresponsive", 0),
        "unresponsive_max": slog.get("unresponsive_max"),
    }


def _worker_side(trial: dict, reports: list[dict]) -> dict:
    """What the worker processes reported: start latencies, retries, failures, CPU."""
    lat = [x for r in reports for x in r["lat"]]
    wlog: dict = {}
    for r in reports:
        for k, v in r["log"].items():
            wlog[k] = wlog.get(k, 0) + v
    return {
        "lat50": quantile(lat, 0.5), "lat99": quantile(lat, 0.99),
        "latmax": max(lat) if lat else None,
        "retries": wlog.get("Could not connect", 0) + wlog.get("Waiting to connect", 0),
        "failed": sum(sum(r["failed"].values()) for r in reports),
        "listen_drops": trial.get("listen_drops"),
        "worker_cpu": round(sum(r["cpu"] for r in reports), 1) if reports else None,
    }


def fit_model(model: dict) -> dict | None:
    """Least-squares line through the origin: seconds per version check vs connected workers.

    >>> fit_model({"1000": 0.001, "3000": 0.003})
    {'per_worker_us': 1.0}
    """
    pts = [(int(k), v) for k, v in (model or {}).items()]
    if not pts:
        return None
    slope = sum(x * y for x, y in pts) / sum(x * x for x, _ in pts)
    return {"per_worker_us": round(slope * 1e6, 3)}


def _f(x, digits: int = 2, unit: str = "") -> str:
    """
    >>> _f(None), _f(1.234), _f(3, 0, " s")
    ('–', '1.23', '3 s')
    """
    return "–" if x is None else f"{x:.{digits}f}{unit}"


def table(rows: list[dict], timeout: float) -> list[str]:
    out = ["| variant | workers | status | first s | all s | 50 % s | 90 % s | workers/s "
           "| peak /s "
           "| sched CPU | sched ms/worker | sched-bound /s | unresp. (max s) "
           "| lat p50/p99/max s | retries | SYN drops | failed "
           "| teardown s: scheduler / all (sched CPU s) | sched fds / MB | load |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:"
           "|---|---|---:|"]
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"**{r['status']}** ({r.get('why')})"
        t_all = _f(r["t_all"]) if r["t_all"] else f"> {timeout:g}"
        unresp = str(r["unresponsive"]) + (f" ({r['unresponsive_max']:.1f})"
                                           if r["unresponsive_max"] else "")
        out.append(
            f"| {r['variant']} | {r['n']} | {status} | {_f(r.get('t_first'))} | {t_all} "
            f"| {_f(r['t50'])} "
            f"| {_f(r['t90'])} | {_f(r['rate'], 0)} | {_f(r['peak'], 0)} "
            f"| {_f(r['sched_cpu'])} | {_f(r['sched_ms'])} | {_f(r['sched_cap'], 0)} "
            f"| {unresp} "
            f"| {_f(r['lat50'])} / {_f(r['lat99'])} / {_f(r['latmax'])} "
            f"| {r['retries']} | {'–' if r.get('listen_drops') is None else r['listen_drops']} "
            f"| {r['failed']} | {_teardown(r)} "
            f"| {r.get('sched_fds') or '–'} / {_f(r.get('sched_rss'), 0)} "
            f"| {_f(r['load1'], 1)} |")
    return out


def _teardown(r: dict) -> str:
    """The teardown cell: seconds until the scheduler and every process were gone, and the
    scheduler's CPU meanwhile.

    >>> _teardown({"teardown_order": "scheduler-first", "teardown_status": "ok",
    ...            "t_sched_gone": 0.5, "t_all_gone": 2.25, "sched_teardown_cpu": 0.4})
    '0.50 / 2.25 (0.40)'
    >>> _teardown({"teardown_order": None})
    '–'
    """
    if not r.get("teardown_order"):
        return "–"
    if r.get("teardown_status") != "ok":
        return f"**{r.get('teardown_status')}** ({_f(r.get('t_sched_gone'))} / –)"
    return (f"{_f(r.get('t_sched_gone'))} / {_f(r.get('t_all_gone'))} "
            f"({_f(r.get('sched_teardown_cpu'))})")


def render_markdown(meta: dict, curve: list[dict], knobs: list[dict], model: dict | None,
                    command: str, summary: str, timeout: float) -> str:
    lines = [
        "# Scaling by simulation: one scheduler, many workers",
        "",
        *machine_lines({**meta, "mpi_library": None}, None,
                       (" (1-min average: most of it is the benchmark's own previous "
                        "trial; nothing else should run: see the load column)")),
        f"- kernel: net.core.somaxconn {meta.get('somaxconn')}, "
        f"tcp_max_syn_backlog {meta.get('syn_backlog')}, open files {meta.get('nofile')}",
        f"- command: `{command}`",
        "",
        ("The launcher's scheduler role (`run.run_scheduler`, Dask's defaults otherwise; "
         "variant `ours`: our Scheduler subclass, `upstream`: `distributed.Scheduler`) "
         + ("with TLS (one job's throw-away credentials) " if meta.get("tls") else "")
         + f"and {meta.get('procs')} processes holding simulated workers built with the "
         "worker role's options (its worker class, interface lo, "
         f"{'TLS, ' if meta.get('tls') else ''}nthreads=1, memory_limit=0, no nanny)"
         + (f", plus {meta.get('real')} processes running the launcher's worker role "
            "unchanged (`run.run_worker`, forked after the imports as a rank forks them)"
            if meta.get("real") else "")
         if "tls" in meta else
         "One `distributed.Scheduler` process (Dask defaults) and "
         f"{meta.get('procs')} processes holding the `distributed.Worker` objects (nthreads=1, "
         "no nanny/dashboard, memory_limit=0, 127.0.0.1)")
        + ", all started at once after every "
        "process had imported. Times in seconds from that start. **first**: first "
        "registration (before it, the simulated workers are being constructed, serialised in "
        "a few processes here, parallel on a cluster); **all/50 %/90 %**: until the "
        "scheduler had registered that share of the workers; **workers/s** = workers / "
        "(all − first); **peak**: best 1-s window; **sched CPU**: scheduler CPU s per wall s during "
        "the registration (1.00 = one core busy); **sched ms/worker**: scheduler CPU during "
        "the registration per worker (heartbeats of the registered ones included); "
        "**sched-bound /s** = 1000 / that: the rate the scheduler alone could sustain if "
        "workers arrived as fast as it takes them; **unresp.**: the scheduler's \"Event "
        "loop was unresponsive\" warnings (longest stall); **lat**: each worker's own "
        "`await Worker()`; **retries**: worker-side connect retries (\"Could not connect\", "
        "\"Waiting to connect\"); **SYN drops**: the kernel's ListenDrops counter during the "
        "registration (connects dropped, mostly because an accept queue was full; "
        "machine-wide); **failed**: workers not started within the "
        f"{timeout:g}-s bound; **sched fds / MB**: the scheduler's open descriptors once "
        "all are registered and its peak memory; **teardown**: once all are registered "
        "the job ends "
        "(`scheduler-first`: the scheduler role gets SIGTERM, then the workers still "
        "running are closed, the launcher's order; `workers-first`: every worker closes "
        "as on its role's SIGTERM, then the scheduler): seconds until the scheduler "
        "process and until every process is gone, and the scheduler's CPU seconds "
        "meanwhile; **load**: 1-min load average at the trial's start. The "
        "worker processes run at nice 10 with per-worker background timers off (profiler, "
        "20-ms tick, system monitor, GIL monitor) and a local directory each, so hundreds "
        "fit in one process; still, workers and scheduler share 2 cores, so wall times are "
        "pessimistic for a real cluster, while the scheduler's CPU per worker carries over."
        + (" Every process of the curve has the launcher's defaults for the job's size "
           "(`scale.for_job(N)`: socket backlog, connect timeouts; the kernel caps the "
           "backlog at somaxconn)." if meta.get("scaled") else "")
        + (" Each process of simulated workers listens on a loopback address of its own "
           "(127.0.1.K), like a host, so their listening ports leave 127.0.0.1's "
           "ephemeral ports to the connections to the scheduler." if meta.get("spread")
           else ""),
        "",
        "## Summary",
        "",
        summary,
        "",
        "## Registration vs number of workers",
        "",
        *table(curve, timeout),
        "",
    ]
    if knobs:
        lines += [f"## Settings at {knobs[0]['n']} workers", "",
                  "Each variant applied in every process (scheduler and workers); "
                  "`ramp=S`: the workers' starts spread uniformly over S s (a launcher-side "
                  "stagger, not a Dask setting).", "", *table(knobs, timeout), ""]
    upstream, ours = model_parts(model)
    if upstream:
        fit = fit_model(upstream)
        lines += ["## Scheduler-side cost model", "",
                  "`Scheduler.add_worker` compares the new worker's package versions with "
                  "those of every connected worker (`distributed.versions.error_message` "
                  "over `{w: ws.versions for w, ws in self.workers.items()}`, each worker's "
                  "versions a separate dict as the scheduler holds them); ours "
                  "(`dask_mpi_launch/scheduler.py`) passes one representative per "
                  "distinct version set. Timed alone (CPU time), per registration:", "",
                  "| connected workers | upstream ms | ours ms |", "|---:|---:|---:|"]
        lines += [f"| {int(k):,} | {v * 1e3:.2f} | "
                  f"{_f(ours[k] * 1e3, 3) if k in ours else '–'} |" for k, v in upstream.items()]
        if fit:
            lines += ["", f"Fit: {fit['per_worker_us']:.2f} µs per connected worker, "
                      "so a burst of N workers spends "
                      f"≈ {fit['per_worker_us'] / 2:.2f} µs × N² of scheduler CPU in this "
                      "check alone: " + ", ".join(
                          f"{n:,} workers {version_cost(fit, n):.1f} s"
                          for n in (1300, 3000, 10000, 30000)) + "."]
        lines.append("")
    return "\n".join(lines)


def version_cost(fit: dict, n: int) -> float:
    """Scheduler seconds spent in version checks while n workers register (sum over k < n).

    >>> version_cost({"per_worker_us": 1.0}, 1000)
    0.5
    """
    return fit["per_worker_us"] * 1e-6 * n * n / 2


def representatives(rows: list[dict]) -> list[dict]:
    """One row per worker count, the one with the median time (repeats), sorted by count.

    >>> rs = [{"n": 2, "t_all": 3.0}, {"n": 1, "t_all": 1.0}, {"n": 2, "t_all": 1.0},
    ...       {"n": 2, "t_all": 2.0}]
    >>> [(r["n"], r["t_all"]) for r in representatives(rs)]
    [(1, 1.0), (2, 2.0)]
    """
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["n"], []).append(r)
    return [sorted(g, key=lambda r: r["t_all"])[(len(g) - 1) // 2]
            for _, g in sorted(groups.items())]


def by_variant(rows: list[dict]) -> dict[str, dict]:
    """Median over the repeats of each variant (worst status, most failures).

    >>> r = {"variant": "a", "n": 9, "status": "ok", "t_all": 1.0, "retries": 0, "failed": 0,
    ...      "lat50": 1.0, "lat99": 1.0, "load1": 2.0, "sched_ms": 1.0}
    >>> by_variant([r, dict(r, t_all=3.0, retries=10)])["a"]["t_all"]
    2.0
    """
    import statistics
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["variant"], []).append(r)
    out = {}
    for name, rs in groups.items():
        def med(key):
            xs = [r[key] for r in rs if r.get(key) is not None]
            return statistics.median(xs) if xs else None
        ok = all(r["status"] == "ok" for r in rs)
        out[name] = {"variant": name, "n": rs[0]["n"], "runs": len(rs),
                     "status": "ok" if ok else "timeout",
                     "why": next((r.get("why") for r in rs if r["status"] != "ok"), None),
                     "t_all": med("t_all") if ok else None,
                     "t_min": min((r["t_all"] for r in rs if r.get("t_all")), default=None),
                     "t_max": max((r["t_all"] for r in rs if r.get("t_all")), default=None),
                     "retries": med("retries"), "failed": max(r["failed"] for r in rs),
                     "listen_drops": med("listen_drops"),
                     "lat50": med("lat50"), "lat99": med("lat99"), "load1": med("load1"),
                     "sched_ms": med("sched_ms")}
    return out


def _changed(v: dict, base: dict) -> list[str]:
    """What a settings variant changed against the defaults, beyond the noise.

    Wall time counts only outside 30 % and outside the defaults' own min-max; retries only
    when they differ by more than 10 and 20 %.
    >>> b = {"t_all": 10.0, "t_min": 9.0, "t_max": 12.0, "retries": 0, "failed": 0,
    ...      "lat50": 5.0, "status": "ok"}
    >>> _changed(dict(b, t_all=11.0), b)
    []
    >>> _changed(dict(b, t_all=15.0, retries=900), b)
    ['all 15.0 s vs 10.0 s', '900 connect retries vs 0']
    """
    if v["status"] != "ok":
        return [f"{v['status']} ({v.get('why')})"]
    out = []
    t, tb = v["t_all"], base["t_all"]
    lo, hi = min(tb * 0.7, base.get("t_min") or tb), max(tb * 1.3, base.get("t_max") or tb)
    if t is not None and tb and not lo <= t <= hi:
        out.append(f"all {t:.1f} s vs {tb:.1f} s")
    if abs(v["retries"] - base["retries"]) > max(10, 0.2 * base["retries"]):
        out.append(f"{v['retries']:.0f} connect retries vs {base['retries']:.0f}")
    d, db = v.get("listen_drops") or 0, base.get("listen_drops") or 0
    if d > max(10, 2 * db):
        out.append(f"{d:.0f} connects dropped by the kernel vs {db:.0f}")
    if v["failed"] > base["failed"]:
        out.append(f"{v['failed']} failed workers")
    if v.get("lat50") and base.get("lat50") and v["lat50"] < 0.5 * base["lat50"]:
        out.append(f"median worker start {v['lat50']:.1f} s vs {base['lat50']:.1f} s")
    return out


def model_parts(model: dict | None) -> tuple[dict, dict]:
    """(upstream, ours) seconds per version check by connected workers; older results
    held upstream's only.

    >>> model_parts({"1000": 0.5})
    ({'1000': 0.5}, {})
    >>> model_parts({"upstream": {"1000": 0.5}, "ours": {"1000": 0.1}})
    ({'1000': 0.5}, {'1000': 0.1})
    """
    if not model:
        return {}, {}
    if "upstream" in model:
        return model.get("upstream") or {}, model.get("ours") or {}
    return model, {}


def bend(rows: list[dict], factor: float = 2.0) -> dict | None:
    """The first row whose scheduler CPU per registration exceeds ``factor`` × the
    smallest size's: where the per-registration cost stops being flat.

    >>> bend([{"n": 1000, "sched_ms": 2.0}, {"n": 3000, "sched_ms": 3.0},
    ...       {"n": 10000, "sched_ms": 4.5}])["n"]
    10000
    >>> bend([{"n": 1000, "sched_ms": 2.0}, {"n": 3000, "sched_ms": 3.0}]) is None
    True
    """
    pts = [r for r in rows if r.get("sched_ms")]
    if len(pts) < 2:
        return None
    return next((r for r in pts[1:] if r["sched_ms"] > factor * pts[0]["sched_ms"]), None)


def _variant_sentences(ok: list[dict], curve: list[dict], label: str) -> list[str]:
    out = []
    best = max(r["rate"] for r in ok)
    falls = next((r for r in ok if r["rate"] < 0.6 * best), None)
    retried = next((r for r in ok if r["retries"]), None)
    failed = sum(r["failed"] for r in curve)
    worst = min(r["rate"] for r in ok)
    s2 = (f"{label}once registrations start, throughput falls from {best:.0f} to "
          f"{ok[-1]['rate']:.0f} workers/s" if falls else
          f"{label}once registrations start, throughput stays at {worst:.0f}–{best:.0f} "
          "workers/s")
    if retried:
        s2 += f"; connect retries appear at {retried['n']:,} workers ({retried['retries']:,}"
        drops = retried.get("listen_drops")
        s2 += (f", with {drops:,} connects dropped by the kernel: the scheduler's accept queue "
               "overflowed)" if drops else ")")
    else:
        s2 += "; no worker needed a connect retry"
    s2 += (f", and {failed} workers failed." if failed else
           (", yet no worker failed: none of them hit a timeout." if retried else
            " and none failed."))
    out.append(s2[0].upper() + s2[1:])
    ms = [r for r in ok if r.get("sched_ms")]
    if len(ms) >= 2:
        b = bend(ms)
        ratio = ms[-1]["sched_ms"] / ms[0]["sched_ms"]
        sent = (f"The scheduler's CPU per registration is {ms[0]['sched_ms']:.1f} ms at "
                f"{ms[0]['n']:,} workers and {ms[-1]['sched_ms']:.1f} ms at {ms[-1]['n']:,} "
                f"({ratio:.1f}×: " + ("flat within 2×" if b is None else
                                      f"beyond 2× from {b['n']:,} workers") + ")")
        out.append(f"{label}{sent[0].lower()}{sent[1:]}." if label else sent + ".")
    return out


def write_summary(curve: list[dict], knobs: list[dict], model: dict | None,
                  meta: dict) -> str:
    """The README-style paragraph ("Scaling"), from the numbers."""
    groups: dict[str, list[dict]] = {}
    for r in curve:
        groups.setdefault(r["variant"], []).append(r)
    where = _where(curve + knobs, meta)
    dist = meta.get("packages", {}).get("distributed", "?")
    out: list[str] = []
    for variant, rows in groups.items():
        label = f"`{variant}`: " if len(groups) > 1 else ""
        out += _curve_sentences(rows, label, dist, where if not out else ".")
    out += _model_sentence(model)
    if knobs:
        out += _knob_sentence(curve, knobs)
    return " ".join(out)


def _where(rows: list[dict], meta: dict) -> str:
    """The end of the first sentence: the machine and its load."""
    loads = [r["load1"] for r in rows if r.get("load1") is not None]
    return (f" on a {meta.get('cores')}-core machine that also ran every simulated worker"
            + (f" and other jobs (load average {min(loads):.0f}–{max(loads):.0f})." if loads
               else "."))


def _curve_sentences(rows: list[dict], label: str, dist: str, end: str) -> list[str]:
    """What one scheduler variant of the curve registered, and how its throughput went."""
    ok = representatives([r for r in rows if r["status"] == "ok" and r["t_all"]])
    bad = [r for r in rows if r["status"] != "ok"]
    if not ok:
        return [f"{label}no trial completed ({bad[0].get('why') if bad else '?'})."]
    first = (f"{label}one scheduler registered a simultaneous start of " if label else
             f"With Dask's defaults (distributed {dist}) one scheduler registered a "
             "simultaneous start of ")
    sentence = (first + ", ".join(f"{r['n']:,} workers in {r['t_all']:.1f} s" for r in ok)
                + (f"; {', '.join(str(r['n']) for r in bad)} workers did not all register "
                   "within the bound" if bad else "") + end)
    return [sentence] + _variant_sentences(ok, rows, label)


def _model_sentence(model: dict | None) -> list[str]:
    """The version-check cost, upstream's and ours."""
    upstream, ours = model_parts(model)
    fit = fit_model(upstream)
    if not fit:
        return []
    sent = ("Upstream, each registration compares package versions with every connected "
            f"worker ({fit['per_worker_us']:.1f} µs each): quadratic, "
            f"≈{version_cost(fit, 10000):.0f} s of scheduler CPU for a burst of 10,000 "
            f"workers and ≈{version_cost(fit, 30000) / 60:.0f} min for 30,000")
    if ours:
        n = max(ours, key=int)
        sent += (f"; our scheduler role compares each distinct set of versions once: "
                 f"{ours[n] * 1e3:.3f} ms per registration at {int(n):,} connected "
                 f"workers instead of {upstream.get(n, 0) * 1e3:.1f} ms")
    return [sent + "."]


def _knob_sentence(curve: list[dict], knobs: list[dict]) -> list[str]:
    """What each settings variant changed against the defaults at the same size."""
    agg = by_variant(knobs)
    base = agg.get("default")
    if base is None:
        base = next(iter(by_variant([r for r in curve if r["n"] == knobs[0]["n"]])
                         .values()), None)
    if not (base and base.get("t_all")):
        return []
    effects, none = [], []
    for name, v in agg.items():
        if name == "default":
            continue
        ch = _changed(v, base)
        (effects.append(f"`{name}` {', '.join(ch)}") if ch else none.append(f"`{name}`"))
    sent = f"At {knobs[0]['n']:,} workers (defaults: {base['t_all']:.1f} s"
    sent += (f", {base['retries']:.0f} retries)" if base["retries"] else
             ", no retries)")
    if effects:
        sent += ": " + "; ".join(effects)
    if none:
        sent += ("; " if effects else ": ") + ", ".join(none) + \
            " changed nothing beyond the machine's noise"
    return [sent + "."]


def plot(curve_trials: list[dict], knob_trials: list[dict], rows: list[dict],
         path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib does not import"
    fig, axes = plt.subplots(1, 3 if knob_trials else 2, figsize=(15 if knob_trials else 10, 4.3))
    _plot_arrivals(axes[0], curve_trials, lambda t: f"{t['n']} workers", "defaults")
    _plot_throughput(axes[1], rows)
    if knob_trials:
        _plot_arrivals(axes[2], knob_trials, lambda t: t["variant"],
                       f"settings at {knob_trials[0]['n']} workers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written: {path}"


def _plot_arrivals(ax, trials: list[dict], label, title: str) -> None:
    """Workers registered over time, one line per trial."""
    for t in trials:
        arr = sorted(t.get("arrivals") or [])
        if arr:
            ax.plot(arr, range(1, len(arr) + 1), label=label(t))
    ax.set_xlabel("s since start")
    ax.set_ylabel("workers registered")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plot_throughput(ax, rows: list[dict]) -> None:
    """Measured and scheduler-bound registrations/s, and scheduler ms per worker, by size."""
    pts = sorted((r["n"], r["rate"], r["sched_cap"], r["sched_ms"]) for r in rows
                 if r["rate"] and r["sched_cap"])
    if not pts:
        return
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="measured workers/s")
    ax.plot([p[0] for p in pts], [p[2] for p in pts], "^-",
            label="scheduler-bound /s (1 / CPU per worker)")
    ax.set_xlabel("workers")
    ax.set_ylabel("registrations / s")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot([p[0] for p in pts], [p[3] for p in pts], "s--", color="gray",
             label="scheduler ms / worker")
    ax2.set_ylabel("scheduler CPU ms per worker")
    ax2.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title("throughput vs size (defaults)")
    ax.legend(loc="upper right", fontsize=7)
    ax2.legend(loc="center right", fontsize=7)


def rerender(path: Path, out: Path) -> int:
    """Summary, markdown and plot again from a scale.json (after changing the rendering)."""
    d = json.loads(path.read_text())
    trials = d["trials"]
    curve_trials, knob_trials = trials[:len(d["curve"])], trials[len(d["curve"]):]
    curve = [summarize(t) for t in curve_trials]
    knobs = [summarize(t) for t in knob_trials]
    summary = write_summary(curve, knobs, d.get("model"), d["meta"])
    md = render_markdown(d["meta"], curve, knobs, d.get("model"), d["command"], summary,
                         float(d["args"]["timeout"]))
    d.update(curve=curve, knobs=knobs, summary=summary)
    write_results(out, "scale", md, d)
    print(md)
    print(plot(curve_trials, knob_trials, curve, out / "scale.png"))
    return 0
