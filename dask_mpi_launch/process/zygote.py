"""The zygote: a process forked from the rank before ``MPI_Init`` that forks its roles.

Forking a process that initialized MPI is a documented hazard on InfiniBand (verbs, UCX)
and Slingshot (CXI): pages pinned for RDMA and shared with the child after fork corrupt or
hang the parent's traffic. So the rank forks this small process first, before it loads MPI;
the zygote imports ``distributed`` (while the rank starts MPI, in parallel) and, on the
rank's request, forks the scheduler, the workers and the script. Those role processes never
hold an initialized MPI library, and the heavy import happens once per rank.

::

    rank (MPI, supervises) --socketpair--> zygote (imports distributed, never MPI)
                                               `-- fork --> intermediate --fork--> role
                                                                (exits)     reparented to
                                                                            the rank

The role is forked through a short-lived intermediate process, so that it is reparented to
the rank (a Linux child subreaper): the rank waits for it, reads its pipe and signals its
process group exactly as if it had forked it itself. Requests and replies are pickled
tuples over a private ``socketpair`` (nobody else can write to it); the role's pipe and
stdin travel as file descriptors (``SCM_RIGHTS``).

The command line is parsed here too (``configure/command_line.py``: ``click`` and ``dask.config`` are
imported here, never in the rank), in a process forked for the purpose with the rank's
arguments, environment, working directory, standard output and error; ``distributed`` is
imported only once the rank has its settings (and not at all after ``--help``).

Requests (rank -> zygote) and replies are typed messages (``base/messages.py``, the
zygote conversation; table in ``docs/messages.rst``)::

    ParseRequest(argv, env, cwd)  + fds [stdout, stderr]  ->  Parsed(result)  (may come first)
    StartRole(role, label, spec, returns, has_stdin)  + fds [pipe, stdin?]  ->  Started(pid)
                                                                          | Refused(message)
    CheckValue(what, value)                                  ->  Checked(error or None)
    Exit()
    first message from the zygote: RolesReady(import error or None)
"""
from __future__ import annotations

import os
import pickle
import signal

from dask_mpi_launch.hpc import time_limit  # SIGNALS: srun's USR1 reaches every process
import socket

from dask_mpi_launch.roles.record_output import tee
from dask_mpi_launch.process.children import (BecomeClient, Channel, Child, become_subreaper, enter_role, flush,
                       run_body, set_title)
from dask_mpi_launch.base.errors import LaunchError
from dask_mpi_launch.base.messages import (ZYGOTE, Checked, CheckValue, Exit, Parsed, ParseRequest,
                                           Refused, RolesReady, Started, StartRole, decode)

_MAX = 1 << 20  # one request: settings, credentials, names (a few KiB)


class ZygoteLauncher:
    """The rank's side. Use :func:`start` to make one."""

    def __init__(self, sock: socket.socket, pid: int):
        self.sock = sock
        self.pid = pid
        self._ready = False
        self._early_ready = None  # a "ready" that came before the reply to "parse"

    def _wait_ready(self) -> None:
        if self._ready:
            return
        reply = self._early_ready or self._receive()
        if not isinstance(reply, RolesReady):
            raise LaunchError(f"the role starter of this rank answered {reply.KIND!r}")
        if reply.error:
            raise LaunchError(reply.error)
        self._ready = True

    def _receive(self):
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, _MAX, 4)
        except OSError as e:
            data, fds = b"", []
            error = e
        else:
            error = None
        for fd in fds:
            os.close(fd)
        if not data:
            raise LaunchError("the process that starts this rank's roles ended unexpectedly"
                              + (f" ({error})" if error else ""))
        return decode(ZYGOTE, pickle.loads(data))

    def _request(self, message, fds=()):
        self._wait_ready()
        try:
            socket.send_fds(self.sock, [pickle.dumps(tuple(message))], list(fds))
        except OSError as e:
            raise LaunchError("the process that starts this rank's roles ended "
                              f"unexpectedly ({e})") from None
        return self._receive()

    #: descriptors sent with every start request after the role's pipe (and before stdin)
    shared_fds: tuple = ()

    def start(self, role, label, spec, *, stdin=None, returns=False):
        read_fd, write_fd = os.pipe()
        fds = [write_fd, *self.shared_fds] + ([stdin] if stdin is not None else [])
        try:
            reply = self._request(StartRole(role, label, spec, returns, stdin is not None), fds)
        finally:
            os.close(write_fd)
            if stdin is not None:
                os.close(stdin)
        if not isinstance(reply, Started):
            os.close(read_fd)
            raise LaunchError(f"cannot start the {label} process: "
                              f"{getattr(reply, 'message', reply.KIND)}")
        os.set_blocking(read_fd, False)
        return self._child(role, label, reply.pid, read_fd, spec)

    def _child(self, role, label, pid, fd, spec) -> Child:
        return Child(role, label, pid, fd, spec)

    def parse(self, argv) -> tuple:
        """This rank's command line, parsed by the zygote: ``("settings", settings,
        check)``, or ``("status", n)`` once the zygote printed what the user must see."""
        self.ask_parse(argv)
        return self.parsed()

    def ask_parse(self, argv) -> None:
        """Send the command line (the reply is :meth:`parsed`)."""
        message = ParseRequest(list(argv), dict(os.environ), os.getcwd())
        flush()
        try:
            socket.send_fds(self.sock, [pickle.dumps(tuple(message))], [1, 2])
        except OSError as e:
            raise LaunchError("the process that starts this rank's roles ended "
                              f"unexpectedly ({e})") from None

    def parsed(self) -> tuple:
        while True:
            reply = self._receive()
            if isinstance(reply, RolesReady) and self._early_ready is None:
                self._early_ready = reply
            elif isinstance(reply, Parsed):
                break
            else:
                raise LaunchError(f"the role starter of this rank answered {reply.KIND!r}")
        if reply.result[0] == "error":
            raise LaunchError(reply.result[1])
        return reply.result

    def check(self, what, value):
        reply = self._request(CheckValue(what, value))
        return reply.error if isinstance(reply, Checked) else reply.message

    #: how close() waits for the zygote: this rank's own zygote ends at once
    _close_wait = 0

    def close(self, abandon: bool = False) -> None:
        """Tell the zygote this rank is done (then reap it, if it is ours). ``abandon``:
        no role was started (the rank exits after --help, or runs without this zygote):
        this rank's own zygote is killed rather than waited for (it may be importing)."""
        if self.sock is None:
            return
        try:
            socket.send_fds(self.sock, [pickle.dumps(tuple(Exit()))], [])
        except OSError:
            pass
        self.sock.close()
        self.sock = None
        if self.pid is not None:
            if abandon:
                self._abandon()
            try:
                os.waitpid(self.pid, self._close_wait)
            except ChildProcessError:
                pass

    def _abandon(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass


# imported by every worker when it starts: in the zygote once, not in each worker (prometheus
# is optional for distributed)
WARM = ("distributed.http.worker.prometheus.core",)


def warm_up(preload) -> None:
    """Import ``preload`` (errors propagate) and, with ``distributed``, what every role
    would otherwise do again after the fork: the worker's metrics modules, and
    ``platform.uname()``'s processor, which distributed's version report asks for and
    Python finds by running ``uname -p`` (a process start per role)."""
    import importlib
    import platform

    for module in preload:
        importlib.import_module(module)
    if "distributed" in preload:
        for module in WARM:
            try:
                importlib.import_module(module)
            except ImportError:
                pass
        platform.uname().processor  # noqa: B018 - cached from now on


def load_roles(preload):
    """(error, run_check, run_role) once ``preload`` is imported and warm (:func:`warm_up`);
    the error is the one line the rank reports when an import failed (the functions None)."""
    try:
        warm_up(preload)
        from dask_mpi_launch.roles.run import run_check, run_role
    except BaseException as e:
        return f"cannot import {' and '.join(preload)}: {type(e).__name__}: {e}", None, None
    return None, run_check, run_role


def start(preload=("distributed",), parse: bool = False) -> ZygoteLauncher:
    """Fork the zygote (call before MPI is loaded). In the process that ``initialize()``'s
    client becomes, this raises :class:`BecomeClient` instead of returning. ``parse``: the
    rank's first request is "parse" (the command line), served before the imports."""
    become_subreaper()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    rank = os.getpid()
    flush()
    pid = os.fork()
    if pid:
        theirs.close()
        return ZygoteLauncher(ours, pid)
    ours.close()
    try:
        _serve(theirs, rank, preload, parse)  # returns only by raising BecomeClient
    except BecomeClient:
        theirs.close()
        raise
    except BaseException:
        pass
    os._exit(0)


def _serve(sock: socket.socket, rank: int, preload, parse: bool = False) -> None:
    # No parent-death signal: when the rank dies, its end of the socket closes, and the
    # zygote ends the roles it started (_guard) before it goes.
    if os.getppid() != rank:
        os._exit(0)
    try:  # a group of its own: a launcher that kills the rank's process group (Hydra, when
        os.setpgid(0, 0)  # a rank dies) must not take the zygote before it ends the roles
    except OSError:
        pass
    set_title("dml-zygote")
    for signum in (signal.SIGINT, signal.SIGTERM, *time_limit.SIGNALS):
        signal.signal(signum, signal.SIG_IGN)
    if parse:
        parser_error = import_parser()
        try:
            data, fds, _, _ = socket.recv_fds(sock, _MAX, 4)
        except OSError:
            return
        message = decode(ZYGOTE, pickle.loads(data)) if data else Exit()
        if not isinstance(message, ParseRequest):
            return
        reply = parse_for(message, fds, parser_error)
        _send(sock, Parsed(reply))
        if reply[0] != "settings":
            return  # the rank exits: nothing to import for
    error, run_check, run_role = load_roles(preload)
    _send(sock, RolesReady(error))
    if error:
        return
    started: dict[int, float] = {}  # role pid -> its shutdown grace
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, _MAX, 4)
        except OSError:
            data = b""
        if not data:  # the rank died (it says "exit" when it ends)
            _guard(started)
            return
        message = decode(ZYGOTE, pickle.loads(data))
        if isinstance(message, Exit):
            return
        if isinstance(message, CheckValue):
            try:
                _send(sock, Checked(run_check(message.what, message.value)))
            except BaseException as e:
                _send(sock, Checked(f"{type(e).__name__}: {e}"))
            continue
        spec = message.spec
        pipe = fds[0]
        stdin = fds[1] if message.has_stdin else None
        try:  # (in initialize()'s client, BecomeClient goes up from here to the script)
            reply = Started(_fork_role(sock, rank, message.role, spec, pipe, stdin,
                                       message.returns, run_role))
            started[reply.pid] = getattr(spec.settings, "shutdown_timeout", 10.0)
        except OSError as e:
            reply = Refused(str(e))
        for fd in fds:
            os.close(fd)
        _send(sock, reply)


def _guard(started: dict) -> None:
    """The rank died without ending its roles: they had SIGTERM (their parent-death
    signal), which a role stuck in C code never handles, so each role's process group is
    killed once its grace is over. Bounded: the longest grace."""
    import time

    groups = [pid for pid in started if _leads_group(pid)]
    deadline = time.monotonic() + max(started.values(), default=0)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid in groups:
            try:
                os.killpg(pid, signum)
            except OSError:
                pass
        while groups and time.monotonic() < deadline:
            time.sleep(0.05)
            groups = [pid for pid in groups if _leads_group(pid)]


def _leads_group(pid: int) -> bool:
    """``pid`` is alive (not a zombie) and leads its process group, as a role does."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0] != b"Z" and int(fields[2]) == pid
    except (OSError, IndexError, ValueError):
        return False


def _fork_role(sock, rank, role, spec, pipe, stdin, returns, run_role) -> int:
    """Fork the role through an intermediate process; return the role's pid (the caller
    only learns it once the intermediate ended, i.e. once the rank is its parent)."""
    report_r, report_w = os.pipe()
    flush()
    pid = os.fork()
    if pid == 0:  # the intermediate
        os.close(report_r)
        try:
            role_pid = os.fork()
        except OSError:
            os._exit(1)
        if role_pid == 0:  # the role
            os.close(report_w)
            sock.close()
            enter_role(rank, stdin, wait=5.0)
            channel = Channel(pipe)
            if returns:
                os.set_inheritable(pipe, False)
                time_limit.export(getattr(spec.settings, "end", None))  # time_left()
                tee(spec.log)  # --record: initialize()'s script, copied to its log too
                raise BecomeClient(spec.address, spec.credentials)
            run_body(lambda ch: run_role(role, spec, ch), channel, spec)
        os.write(report_w, str(role_pid).encode())
        os._exit(0)
    os.close(report_w)
    data = b""
    while True:
        chunk = os.read(report_r, 64)
        if not chunk:
            break
        data += chunk
    os.close(report_r)
    os.waitpid(pid, 0)
    if not data:
        raise OSError("fork failed")
    return int(data)


def import_parser() -> str | None:
    """Import what parsing the command line needs (click, dask.config); the error, if any."""
    try:
        from dask_mpi_launch.configure import command_line  # noqa: F401
    except BaseException as e:
        return f"cannot import click and dask: {type(e).__name__}: {e}"
    return None


def parse_for(message, fds, error=None) -> tuple:
    """Parse a rank's command line (``message``: a :class:`ParseRequest`; ``fds``: its
    stdout and stderr) in a process forked for it; the reply for the rank."""
    if error:
        for fd in fds:
            os.close(fd)
        return ("error", error)
    read_fd, write_fd = os.pipe()
    flush()
    pid = os.fork()
    if pid == 0:
        try:  # never returns: whatever happens, this process ends here
            os.close(read_fd)
            try:
                data = pickle.dumps(_parse_here(message, fds))
            except BaseException as e:
                data = pickle.dumps(("error", f"cannot parse the command line: "
                                              f"{type(e).__name__}: {e}"))
            flush()
            view = memoryview(data)
            while view:
                view = view[os.write(write_fd, view):]
        finally:
            os._exit(0)
    os.close(write_fd)
    for fd in fds:
        os.close(fd)
    chunks = []
    while True:
        chunk = os.read(read_fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    try:
        return pickle.loads(b"".join(chunks))
    except Exception:
        return ("error", "the process that parses the command line ended unexpectedly")


def _parse_here(message, fds) -> tuple:
    """In the forked process: become the rank (its stdout, stderr, environment, working
    directory and dask config) and parse as the command always did."""
    argv, env, cwd = message.argv, message.env, message.cwd
    set_title("dml-parse")
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in fds:
        os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    import dask.config

    if hasattr(dask.config, "_get_paths"):  # the rank's DASK_CONFIG and HOME
        dask.config.paths[:] = dask.config._get_paths()
    dask.config.refresh()
    from dask_mpi_launch.configure.command_line import parse

    return parse(argv)


def _send(sock, message) -> None:
    try:
        socket.send_fds(sock, [pickle.dumps(tuple(message))], [])
    except OSError:
        os._exit(0)
