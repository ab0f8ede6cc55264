"""Network diagnosis: why a worker cannot reach the scheduler, and ``--check``.

(Stub: filled in by the multi-host work.)
"""
from __future__ import annotations


def local_interfaces() -> dict:
    """{interface name: [IPv4 address, ...]} of this host."""
    import psutil
    import socket

    return {name: [a.address for a in addrs if a.family == socket.AF_INET]
            for name, addrs in psutil.net_if_addrs().items()}


def reachability_problem(address: str, timeout: float, scheduler_info: dict) -> str | None:
    """None if this host can open a connection to ``address`` within ``timeout``, else
    one line saying what fails and which --interface would work."""
    return None


def run_check(comm, settings) -> int:
    raise NotImplementedError
