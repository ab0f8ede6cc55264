"""One zygote per node: the ranks of a host share the process that imported ``distributed``.

At scale every process importing Python packages from a parallel file system is the
"import storm" (thousands of ranks x ~1,500 look-ups each on one metadata server), and on a
node the imports of its ranks compete for its cores. So the node's first rank (local rank
0, as the launcher tells it: ``MPI_LOCALRANKID``, ``OMPI_COMM_WORLD_LOCAL_RANK``,
``SLURM_LOCALID``) forks the zygote and listens on a Unix socket for the other ranks of the
node; they connect instead of forking their own. Every role process of the node is forked
by that one zygote, on its owning rank's request, and keeps the owning rank's environment,
working directory, CPU affinity, standard output and error: nothing changes for the user.

The zygote is then the roles' parent: it reaps them and tells each owning rank how its
roles ended (the exact wait status); the ranks still read their roles' pipes and signal
their process groups themselves. A rank whose connection closes (it died) has its roles
killed; the zygote ends when every rank of the node has closed its connection.

The socket is in the abstract namespace (per network namespace, so per host even in
containers), named after the user, the launcher's node process and the job; both ends check
the other's user id (``SO_PEERCRED``): nobody else can ask this zygote for anything, and
no rank talks to another user's zygote. A rank that cannot reach its node's zygote within
``wait`` seconds forks its own (the per-rank zygote), as ``--no-share-imports`` does.
"""
from __future__ import annotations

import os
import pickle
import select
import signal

from dask_mpi_launch.hpc import time_limit  # SIGNALS: srun's USR1 reaches every process
import socket
import struct
import time

from dask_mpi_launch.process.children import (Child, become_subreaper, end_descendants, enter_role, flush,
                       run_body, set_title)
from dask_mpi_launch.base.errors import LaunchError
from dask_mpi_launch.base.record import replace
from dask_mpi_launch.base.messages import (ZYGOTE, Checked, CheckValue, Exit, Exited, Parsed,
                                           ParseRequest, Refused, RolesReady, Started, StartRole,
                                           decode)
from dask_mpi_launch.hpc.launchers import PER_RANK, launch_id
from dask_mpi_launch.base.status import Ended
from dask_mpi_launch.process.zygote import _MAX, ZygoteLauncher, _send, import_parser, load_roles, parse_for



#: the launchers' processes on a node, whose children are the ranks (``comm``, 15 chars)
LAUNCHERS = frozenset({
    "hydra_pmi_proxy", "mpiexec.hydra", "mpiexec", "mpirun", "prted", "prterun", "orted",
    "orterun", "slurmstepd", "palsd", "pmi_proxy", "pbs_mom", "sge_shepherd", "res",
})


def _stat(pid: int) -> tuple[str, int, str]:
    """(command name, parent pid, start time) of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        head, tail = f.read().rsplit(")", 1)
    fields = tail.split()
    return head.split("(", 1)[1], int(fields[1]), fields[19]


def launcher_process() -> tuple[int, str]:
    """The launcher's process on this node that started this rank, and its start time.

    Usually the rank's parent. Sites that load modules per rank start it through a wrapper
    (``mpiexec -n 8 ./wrap.sh dask-mpi-launch ...``, bash without ``exec``), and then
    each rank's parent is its own shell: the ranks never met at the node's zygote and
    each waited 10 s before forking its own (13.8 s vs 2.2 s to start, issue 21). So the
    ancestors are walked up to the first known launcher process (:data:`LAUNCHERS`); where
    none is found, the parent, as before."""
    parent = os.getppid()
    pid = parent
    for _ in range(16):
        try:
            name, ppid, started = _stat(pid)
        except (OSError, IndexError, ValueError):
            break
        if name in LAUNCHERS:
            return pid, started
        if ppid <= 1:
            break
        pid = ppid
    try:
        return parent, _stat(parent)[2]
    except (OSError, IndexError, ValueError):
        return parent, "0"


def socket_name(env=os.environ) -> str:
    """The same for every rank of this job on this node, different for any other job: the
    user, the launcher's process on the node (:func:`launcher_process`) and its start
    time."""
    parent, started = launcher_process()
    job = launch_id(env)
    return f"dask-mpi-launch-{os.getuid()}-{parent}-{started}-{job}"


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class RemoteChild(Child):
    """A role forked by the node's zygote: its end is told by the zygote."""

    def __init__(self, role, label, pid, fd, spec, launcher: "NodeLauncher"):
        super().__init__(role, label, pid, fd, spec)
        self.launcher = launcher

    def reap(self) -> bool:
        if self.ended is not None:
            return False
        self.launcher.pump()
        raw = self.launcher.exits.pop(self.pid, None)
        if raw is not None:
            self.ended = Ended.from_wait(raw)
            return True
        if self.launcher.lost:  # the node's zygote died: the role went with it
            self.ended = Ended(signal=signal.SIGKILL)
            self.cause = ("was ended with the node's zygote, which started it and died "
                          "(was it killed, or out of memory?)")
            return True
        return False


class NodeLauncher(ZygoteLauncher):
    """A rank's side of the node's shared zygote."""

    def __init__(self, sock: socket.socket, pid: int | None, wait: float = 10.0):
        super().__init__(sock, pid)
        self.exits: dict[int, int] = {}  # pid -> raw wait status, told by the zygote
        self.lost = False
        self.wait = wait

    def _receive(self):
        while True:
            reply = super()._receive()
            if not isinstance(reply, Exited):
                return reply
            self.exits[reply.pid] = reply.status

    def pump(self) -> None:
        """Read the zygote's news without waiting."""
        while self.sock is not None and not self.lost:
            if not select.select([self.sock], [], [], 0)[0]:
                return
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, _MAX, 4)
            except OSError:
                data, fds = b"", []
            for fd in fds:
                os.close(fd)
            if not data:
                self.lost = True
                return
            message = decode(ZYGOTE, pickle.loads(data))
            if isinstance(message, Exited):
                self.exits[message.pid] = message.status

    shared_fds = (1, 2)  # the role writes to its own rank's stdout and stderr

    def start(self, role, label, spec, *, stdin=None, returns=False):
        if returns:
            raise LaunchError("initialize()'s client cannot come from a shared zygote")
        spec = replace(spec, env=dict(os.environ), cwd=os.getcwd(),
                       affinity=sorted(os.sched_getaffinity(0)))
        return super().start(role, label, spec, stdin=stdin)

    def _child(self, role, label, pid, fd, spec) -> Child:
        return RemoteChild(role, label, pid, fd, spec, self)

    # never wait for the other ranks of the node (the first rank's zygote ends with it)
    _close_wait = os.WNOHANG

    @property
    def spare(self) -> tuple:
        """Not for this rank to end: the node's zygote it forked serves the others."""
        return (self.pid,) if self.pid else ()

    def _abandon(self) -> None:
        """The node's first rank started nothing (it exits after --help, say): the other
        ranks of the node may still need the zygote to parse their command line, so it is
        left to end by itself once they are done (bounded), then killed."""
        deadline = time.monotonic() + 2 * self.wait + 5
        while time.monotonic() < deadline:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            time.sleep(0.01)
        try:
            os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass


def start(local: tuple[int, int], wait: float = 10.0, preload=("distributed",),
          parse: bool = False):
    """The node's zygote for this rank: fork it (local rank 0) or connect to it; None where
    neither worked (the caller forks a zygote of its own). ``parse``: the ranks send their
    command lines first; ``preload`` is imported once they all got their settings (or none
    came for ``idle`` seconds), not at all when none of them will start a role."""
    name = "\0" + socket_name()
    if local[0] == 0:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.bind(name)
            listener.listen(max(16, local[1]))
        except OSError:
            listener.close()
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        flush()
        pid = os.fork()
        if pid:
            listener.close()
            theirs.close()
            return NodeLauncher(ours, pid, wait)
        ours.close()
        try:
            _serve(theirs, listener, os.getppid(), preload, parse, local[1], wait)
        finally:
            os._exit(0)
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(name)
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)
            continue
        if _peer_uid(sock) != os.getuid():
            sock.close()
            return None
        return NodeLauncher(sock, None, wait)


IDLE = 1.0  # seconds without a new command line after which the zygote imports anyway


def _serve(first: socket.socket, listener: socket.socket, leader: int, preload,
           parse: bool = False, size: int = 1, wait: float = 10.0) -> None:
    # No parent-death signal: the zygote outlives the node's first rank until every rank
    # of the node has closed its connection (a rank that dies closes it too), so each
    # rank's roles are ended by the zygote when their rank goes (_drop), and the roles'
    # orphans, reparented to the zygote (a subreaper), when it ends.
    if os.getppid() != leader:
        return
    NodeZygote(first, listener, preload, parse, size, wait).serve()


class NodeZygote:
    """The node's zygote at work: accepts the node's ranks, parses their command lines
    (once for all the ranks whose command lines are the same), imports ``distributed``
    once, and forks their roles, until every rank of the node came and went."""

    def __init__(self, first, listener, preload, parse: bool, size: int, wait: float):
        self.listener, self.preload, self.parse, self.size, self.wait = (
            listener, preload, parse, size, wait)
        self._enter()
        self.born = self.last = time.monotonic()
        self.parser_error = import_parser() if parse else None
        self.imported = False
        self.error = self.run_check = self.run_role = None
        self.seen, self.parsed, self.wanted = 1, 0, not parse  # ranks connected, parsed
        self.conns = [first]
        self.owners: dict[int, socket.socket] = {}  # role pid -> its rank's connection
        self.parsed_for: dict[tuple, tuple] = {}  # the ranks' command lines: usually the same

    def _enter(self) -> None:
        """A subreaper in a group of its own (a launcher that kills the rank's process
        group, Hydra when a rank dies, must not take the zygote before it ends the
        roles), deaf to SIGINT/SIGTERM, woken by SIGCHLD through a pipe."""
        become_subreaper()
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
        set_title("dml-zygote")
        for signum in (signal.SIGINT, signal.SIGTERM, *time_limit.SIGNALS):
            signal.signal(signum, signal.SIG_IGN)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)

    # -- the loop ----------------------------------------------------------
    def serve(self) -> None:
        # until every rank of the node came and went (or the ranks' own connect wait is over)
        while self.conns or (self.parse and self.seen < self.size
                             and time.monotonic() - self.born < self.wait):
            self._import_when_due()
            readable = select.select([self.listener, self.wake_r, *self.conns], [], [],
                                     self._timeout())[0]
            if self.wake_r in readable:
                os.read(self.wake_r, 4096)
            if self.listener in readable:
                self.on_accept()
            for conn in [c for c in self.conns if c in readable]:
                self.on_request(conn)
            _reap(self.owners)
        self.listener.close()
        self._end_leftovers()

    def _import_when_due(self) -> None:
        """Import the roles' modules once a role will start here, after every rank parsed
        (or none came for ``IDLE`` seconds): the ranks' parsing first, then the import."""
        if self.imported or not self.wanted:
            return
        if self.parse and self.parsed < self.size and time.monotonic() - self.last < IDLE:
            return
        self.imported = True
        self.error, self.run_check, self.run_role = load_roles(self.preload)
        for conn in self.conns:
            _send(conn, RolesReady(self.error))

    def _timeout(self) -> float:
        if self.imported or not self.wanted:
            return 1.0
        return max(0.0, IDLE - (time.monotonic() - self.last))

    # -- what the ranks ask ------------------------------------------------
    def on_accept(self) -> None:
        conn, _ = self.listener.accept()
        if _peer_uid(conn) != os.getuid():
            conn.close()
            return
        self.conns.append(conn)
        self.seen += 1
        if self.imported:
            _send(conn, RolesReady(self.error))

    def on_request(self, conn) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(conn, _MAX, 8)
        except OSError:
            data, fds = b"", []
        message = decode(ZYGOTE, pickle.loads(data)) if data else Exit()
        if isinstance(message, Exit):
            _drop(conn, self.conns, self.owners)
        elif isinstance(message, ParseRequest):
            fds = self.on_parse(conn, message, fds)
        elif self.error:
            _send(conn, Refused(self.error) if isinstance(message, StartRole)
                  else Checked(self.error))
        elif isinstance(message, CheckValue):
            _send(conn, Checked(self.run_check(message.what, message.value)))
        elif isinstance(message, StartRole):
            self.on_start(conn, message, fds)
        for fd in fds:
            os.close(fd)

    def on_parse(self, conn, message, fds) -> list:
        """A rank's command line: parsed once for every rank that gives the same one
        (what printed something is never reused). Returns the fds left to close."""
        key = _same_for_every_rank(message)
        reply = self.parsed_for.get(key)
        if reply is None:
            reply = parse_for(message, fds, self.parser_error)
            fds = []  # closed by parse_for
            if reply[0] == "settings":
                self.parsed_for[key] = reply
        self.parsed += 1
        self.last = time.monotonic()
        # roles will start here (not after --check, nor for ranks that go per-rank)
        self.wanted = self.wanted or (reply[0] == "settings" and not reply[2]
                                      and reply[1].share_imports)
        _send(conn, Parsed(reply))
        return fds

    def on_start(self, conn, message, fds) -> None:
        try:
            pid = _fork(message.role, message.spec, fds, message.has_stdin, self.run_role,
                        [self.listener, *self.conns], (self.wake_r, self.wake_w))
        except OSError as e:
            reply = Refused(str(e))
        else:
            self.owners[pid] = conn
            reply = Started(pid)
        _send(conn, reply)

    def _end_leftovers(self) -> None:
        from dask_mpi_launch.process.job_record import drain

        drain()  # --record: the copies of the roles' output end by themselves
        ended = end_descendants(2.0)  # what the node's roles left running (daemons, helpers)
        if ended:
            from dask_mpi_launch.base.status import say

            shown = ", ".join(ended[:3]) + (" ..." if len(ended) > 3 else "")
            say(f"host {socket.gethostname()}: ended {len(ended)} process"
                f"{'es' if len(ended) > 1 else ''} the job left running: {shown}")


# What tells the ranks of a node apart in their environment: ``launchers.PER_RANK``, nothing
# that the settings depend on, so ranks that differ only in these get the same settings.


def _same_for_every_rank(message) -> tuple:
    """A rank's parse request without what only names the rank."""
    return (tuple(message.argv), message.cwd,
            tuple(sorted((k, v) for k, v in message.env.items() if k not in PER_RANK)))


def _drop(conn, conns, owners) -> None:
    """A rank is done (or died): what it started and left running goes too."""
    conns.remove(conn)
    for pid, owner in list(owners.items()):
        if owner is conn:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
    conn.close()


def _reap(owners) -> None:
    while True:
        try:
            pid, raw = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = owners.pop(pid, None)
        if conn is not None and conn.fileno() >= 0:
            try:
                socket.send_fds(conn, [pickle.dumps(tuple(Exited(pid, raw)))], [])
            except OSError:
                pass


def _fork(role, spec, fds, has_stdin, run_role, sockets, wake) -> int:
    pipe, out, err = fds[:3]
    stdin = fds[3] if has_stdin else None
    zygote = os.getpid()
    flush()
    pid = os.fork()
    if pid:
        return pid
    for sock in sockets:
        sock.close()
    signal.set_wakeup_fd(-1)
    for fd in wake:
        os.close(fd)
    os.dup2(out, 1)
    os.dup2(err, 2)
    if stdin is not None:
        stdin = os.dup(stdin)
    for fd in fds[1:]:
        os.close(fd)
    enter_role(zygote, stdin)
    os.environ.clear()
    os.environ.update(spec.env)
    os.chdir(spec.cwd)
    os.sched_setaffinity(0, spec.affinity)
    spec = replace(spec, env=None, cwd=None, affinity=None)  # the rank's: now this process's
    from dask_mpi_launch.process.children import Channel

    run_body(lambda ch: run_role(role, spec, ch), Channel(pipe), spec)
