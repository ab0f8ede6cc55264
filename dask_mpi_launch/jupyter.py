"""JupyterLab on the client rank (``--jupyter``). (Stub: filled in by the Jupyter work.)"""
from __future__ import annotations


def run_jupyter(settings, channel, address, credentials, scheduler_info) -> int:
    channel.error("--jupyter is not available yet")
    return 1
