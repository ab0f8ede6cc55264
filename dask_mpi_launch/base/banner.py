"""The block printed once when the cluster is ready. Pure: facts in, text out."""
from __future__ import annotations

import time
from urllib.parse import urlsplit

LOGIN_PLACEHOLDER = "LOGIN-HOST"


def render(facts: dict) -> str:
    """``facts``: address, dashboard (URL or None), workers (count), ranks ({rank: (host,
    roles)}), scheduler_file, login_host, mode ("script", "cluster", "join")."""
    workers = facts.get("workers", 0)
    noun = "worker" if workers == 1 else "workers"
    hosts = {host for host, _ in facts.get("ranks", {}).values()}
    if facts.get("mode") == "join":
        head = f"dask-mpi-launch: joined the cluster at {facts['address']} with {workers} {noun}"
    else:
        on = f" on {len(hosts)} host{'s' if len(hosts) != 1 else ''}" if hosts else ""
        head = f"dask-mpi-launch: cluster ready: {workers} {noun}{on}"
    lines = [head]
    if facts.get("mode") != "join":
        lines.append(f"  scheduler  {facts['address']}")
        dashboard = facts.get("dashboard")
        if dashboard:
            lines.append(f"  dashboard  {dashboard}")
            lines.append(f"  tunnel     {tunnel_command(dashboard, facts.get('login_host'))}")
        elif facts.get("dashboard_wanted"):
            lines.append("  dashboard  none (pip install bokeh)")
        if facts.get("scheduler_file"):
            lines.append(f"  file       {facts['scheduler_file']}")
            lines.append("  connect    " + connect_line(facts["scheduler_file"],
                                                     str(facts["address"]).startswith("tls://")))
    if facts.get("end"):
        lines.append("  " + end_line(facts["end"], facts.get("now"), facts.get("end_source")))
    ranks = facts.get("ranks") or {}
    if ranks:
        lines.append("  ranks      " + "; ".join(rank_summary(ranks)))
    return "\n".join(lines)


def connect_line(path: str, tls: bool) -> str:
    """The Python line that connects to the cluster of a scheduler file. With TLS, a plain
    ``Client(scheduler_file=...)`` (dask-mpi's habit) fails: say so where it is read."""
    line = f"from dask_mpi_launch import connect; client = connect({path!r})"
    return line + ("   (TLS: not Client(scheduler_file=...))" if tls else "")


def tunnel_command(url: str, login_host: str | None) -> str:
    """The SSH line to paste on a laptop so that http://localhost:PORT reaches ``url``."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or "localhost"
    if ":" in host:  # IPv6
        host = f"[{host}]"
    login = login_host or LOGIN_PLACEHOLDER
    query = f"?{parts.query}" if parts.query else ""
    return (f"ssh -N -L {port}:{host}:{port} {login}   "
            f"then open http://localhost:{port}{parts.path}{query}")


def jupyter_lines(url, login_host: str | None) -> str:
    """JupyterLab's URL, the dashboard through Lab's port, and the one tunnel for both.

    ``url``: Lab's URL, or ``{"lab": URL, "dashboard": proxied dashboard URL or None}``."""
    if isinstance(url, str):
        url = {"lab": url}
    lab, dashboard = url["lab"], url.get("dashboard")
    lines = [f"dask-mpi-launch: JupyterLab at {lab}"]
    if dashboard:
        lines.append(f"  dashboard  {dashboard}  (through JupyterLab's port)")
    lines.append(f"  tunnel     {tunnel_command(lab, login_host)}")
    if dashboard:
        parts = urlsplit(dashboard)
        query = f"?{parts.query}" if parts.query else ""
        lines.append(f"             and the dashboard at http://localhost:{parts.port or 80}"
                     f"{parts.path}{query}")
    return "\n".join(lines)


def rank_summary(ranks: dict) -> list[str]:
    """'0 n001 scheduler', '2-5 n001 worker', ...: consecutive ranks with the same host and
    roles folded into one range, so a job of a thousand ranks stays a few lines."""
    groups: list[list] = []
    for rank in sorted(ranks):
        host, roles = ranks[rank]
        role = "+".join(roles)
        if groups and groups[-1][2] == host and groups[-1][3] == role and groups[-1][1] == rank - 1:
            groups[-1][1] = rank
        else:
            groups.append([rank, rank, host, role])
    return [f"{a if a == b else f'{a}-{b}'} {host} {role}" for a, b, host, role in groups]


def end_line(end: float, now: float | None = None, source: str | None = None) -> str:
    """'ends       14:03:10, in 11:58:03 (Slurm)': when the allocation ends (local time;
    with the date when not today) and how long from ``now``."""
    now = time.time() if now is None else now
    when = time.localtime(end)
    fmt = "%H:%M:%S" if time.localtime(now)[:3] == when[:3] else "%Y-%m-%d %H:%M:%S"
    left = max(0, int(round(end - now)))
    text = (f"ends       {time.strftime(fmt, when)}, "
            f"in {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}")
    return text + (f" ({source})" if source else "")
