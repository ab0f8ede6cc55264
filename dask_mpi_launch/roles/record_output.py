"""The role processes' part of the job record (``--record DIR``; the rank's part, which
gathers and writes ``summary.json``, is ``process/job_record.py``).

* :func:`tee`: the role's stdout and stderr still go where they went (the terminal, the
  batch system's output file) and are copied to its log, ``DIR/rank-R.ROLE.log``. The
  copy is made by a small process forked from the role at its start, reading two pipes
  that are the role's fds 1 and 2. A process, not a thread: a worker killed with SIGKILL
  or a script's ``os._exit`` loses nothing already written (the pipe holds it, the copier
  drains it to end of file); it sits in a process group of its own and ignores SIGTERM
  and SIGINT, so the rank's stop of the role's group does not cut the tail, and it ends
  by itself once every writer is gone (the role and what it started). A log that cannot
  be written (full, read-only) only stops the copy: the output still passes.
* :class:`Report`: Dask's ``performance_report`` of the script's run, made by the
  scheduler when it closes (``Scheduler.performance_report``, the handler the client's
  context manager calls), from the first client's connection on; bounded by a timeout,
  and never a reason for the scheduler to fail.
* :func:`worker_stats`: what a worker says before it leaves: the bytes it sent to its
  peers (and clients), and its peak memory.
"""
from __future__ import annotations

import errno
import os
import select
import signal

#: the copier's title (ps, and the rank's wait for the copies to end: process/job_record.py)
TITLE = "dml-record"
_LOG = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 65536


def tee(path: str | None) -> None:
    """Copy this process's fds 1 and 2 to ``path`` from now on (see the module's
    docstring); nothing if ``path`` is None or cannot be opened."""
    if not path:
        return
    try:
        os.fstat(1), os.fstat(2)  # a role without them: nothing to copy (nor to copy to)
        log = os.open(path, _LOG, 0o600)
    except OSError:
        return
    pipes = [os.pipe(), os.pipe()]
    try:
        pid = os.fork()
    except OSError:
        pid = -1
    if pid == 0:
        _copier(log, [(pipes[0][0], 1), (pipes[1][0], 2)])  # never returns
    if pid > 0:
        terminal = os.isatty(1)
        for (_, write), fd in zip(pipes, (1, 2)):
            os.dup2(write, fd)
        if terminal:  # a pipe now: keep the terminal's line buffering (python -u aside)
            _line_buffered()
    for read, write in pipes:
        os.close(read)
        os.close(write)
    os.close(log)


def _line_buffered() -> None:
    import sys

    try:
        sys.stdout.reconfigure(line_buffering=True)
    except (AttributeError, ValueError):
        pass


def _copier(log: int, streams: list) -> None:
    """In the forked copier: pipe -> original fd and the log, until every pipe ends."""
    try:
        os.setpgid(0, 0)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(signum, signal.SIG_IGN)
        keep = {log, 1, 2, *(r for r, _ in streams)}
        # originals: fds 1 and 2 now, before they are the pipes in the role
        outs = {read: os.dup(fd) for read, fd in streams}
        _close_others(keep | set(outs.values()))
        _set_title()
        _copy(log, outs)
    finally:
        os._exit(0)


def _close_others(keep: set) -> None:
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _set_title() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, TITLE.encode(), 0, 0, 0)
    except Exception:
        pass


def _copy(log: int, outs: dict) -> None:
    """The copy loop: ``outs`` maps a pipe's read end to where its bytes go."""
    open_ = dict(outs)
    while open_:
        ready, _, _ = select.select(list(open_), [], [])
        for fd in ready:
            data = os.read(fd, _CHUNK)
            if not data:
                del open_[fd]
                continue
            if open_[fd] >= 0 and not _write_all(open_[fd], data):
                open_[fd] = -1  # the terminal is gone: the log still gets it
            if log >= 0 and not _write_all(log, data):
                log = -1  # full or read-only: the output still passes


def _write_all(fd: int, data: bytes) -> bool:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
        except InterruptedError:
            continue
        except OSError as e:
            return e.errno == errno.EINTR
    return True


def log_name(rank: int, label: str, processes: int = 1) -> str:
    """``rank-0.scheduler.log``, ``rank-2.worker.log``, ``rank-2.worker-1.log`` (the second
    of ``processes`` worker processes of rank 2), ``rank-1.script.log``: from the rank and
    the child's label ("worker 2-1")."""
    role, _, name = label.partition(" ")
    if role == "worker" and processes > 1:
        role = f"worker-{name.rsplit('-', 1)[-1]}"
    return f"rank-{rank}.{role}.log"


# ---------------------------------------------------------------------------
# the scheduler's performance report


class Report:
    """Dask's performance report of the script's run, from its client's connection to its
    close. It is made as soon as that client leaves (a scheduler plugin's
    ``remove_client``): while the script's process ends and the ranks begin to stop, so
    that little of its cost (~0.7 s of the scheduler's CPU on a small job) is added to the
    job's end; the scheduler role waits for it (bounded) before it closes, when the
    workers are still connected (their profiles are in it). Where a client's
    ``shutdown()`` closes the scheduler, the plugin's ``before_close`` makes it."""

    def __init__(self, scheduler, path: str, timeout: float):
        from distributed.diagnostics.plugin import SchedulerPlugin

        report = self

        class Plugin(SchedulerPlugin):
            name = "dask-mpi-launch-record"

            def add_client(self, scheduler, client):
                report.client_connected(client)

            def remove_client(self, scheduler, client):
                if client == report.client:
                    report.begin()

            async def before_close(self):
                await report.write()

        self.scheduler = scheduler
        self.path = path
        self.timeout = timeout
        self.client: str | None = None  # the first client's id (the script's)
        self.start = 0.0
        self.last_count = 0
        self.task = None
        if _has_bokeh():  # which draws it (the summary says when there is none)
            scheduler._task_stream_plugin()  # the task stream is kept from now on
            scheduler.add_plugin(Plugin())

    def client_connected(self, client: str) -> None:
        if self.client is None and not client.startswith("fire-and-forget"):
            from time import time

            self.client, self.start = client, time()
            self.last_count = self.scheduler.monitor.count

    def begin(self) -> None:
        """Start making the report (once); nothing if no client ever connected."""
        import asyncio

        if self.task is None and self.client is not None:
            self.task = asyncio.ensure_future(self._make())

    async def write(self) -> None:
        """The report, made now or finished now (bounded); never raises."""
        self.begin()
        if self.task is not None:
            await self.task

    async def _make(self) -> None:
        import asyncio

        try:
            html = await asyncio.wait_for(self.scheduler.performance_report(
                start=self.start, last_count=self.last_count, code="(the job's script)",
                mode="inline"), self.timeout)
            _write_private(self.path, html.encode())
        except Exception:  # a record never fails the job (the summary says what is missing)
            pass


def _has_bokeh() -> bool:
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None


def _write_private(path: str, data: bytes) -> None:
    """Write ``path`` anew (0600), through a temporary name beside it."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.urandom(8).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


def worker_stats(worker) -> dict:
    """What a worker tells its rank as it leaves (the ``stats`` event)."""
    import resource

    return {"bytes_sent": int(getattr(worker, "transfer_outgoing_bytes_total", 0) or 0),
            "peak_memory": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
