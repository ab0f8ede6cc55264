"""A multi-host test bed made of Linux network namespaces.

Each "host" is a network namespace with:

* ``lo`` up;
* ``ib0`` on a shared "fabric" that connects all hosts (2 hosts: one veth pair;
  otherwise: a bridge living in an extra namespace), address from ``fabric_net``;
* ``eth0``, the "management network": a veth whose peer sits, unconnected, in a
  sink namespace, address from ``mgmt_net``.  It reaches nothing, and by default
  it carries the host's default route (to a gateway that does not exist), as on
  a cluster whose hostname/default route is not the fast fabric.  Anything that
  guesses "the external address" (e.g. ``distributed.utils.get_ip()``) therefore
  picks eth0, which cannot reach the other hosts.

Processes started through :meth:`NetnsHosts.run`, :meth:`NetnsHosts.popen` or the
Hydra launcher script also get their own UTS namespace whose hostname is the
host's short name ("a", "b", ...), and ``/etc/hosts`` inside the namespaces maps
the short names to their ib0 addresses (``a-eth0`` etc. to the eth0 addresses)
through ``ip netns exec``'s ``/etc/netns/NAME/`` overlay; the real /etc/hosts is
never touched.  ``resolv.conf`` inside is empty, so unknown names fail at once.

Typical use in a test::

    from netns_hosts import NetnsHosts, can_create_namespaces

    reason = can_create_namespaces()
    if reason:
        pytest.skip(reason)
    with NetnsHosts(2) as hosts:
        argv = hosts.mpiexec_argv(".venv/mpich/bin/mpiexec", n=4, ppn=2)
        # mpiexec must itself run on one of the hosts
        proc = hosts.run("a", argv + [python, "script.py"], timeout=60,
                         capture_output=True, text=True)

Everything (processes left in the namespaces, namespaces, /etc/netns entries,
temp files) is removed by ``close()``/``__exit__``, which is idempotent; stale
objects of dead processes (names ``dml<pid>-...``) are removed on the next setup.
Needs root, ``ip`` (iproute2) and ``unshare`` (util-linux).
"""

from __future__ import annotations

import atexit
import ipaddress
import itertools
import os
import re
import shutil
import signal
import string
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

__all__ = ["NetnsHosts", "can_create_namespaces", "remove_record", "run_with_timeout"]

PREFIX = "dml"
_STALE_RE = re.compile(rf"^{PREFIX}(\d+)-")
_MARKER = ".netns_hosts"
_ETC_NETNS = Path("/etc/netns")
_SSH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_counter = itertools.count()


# --------------------------------------------------------------------------- helpers
def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def run_with_timeout(argv, *, timeout: float, input=None, check: bool = False, **kwargs):
    """Like ``subprocess.run`` but ``timeout`` is required, the child gets its own
    session/process group, and on timeout the whole group is SIGKILLed before
    ``TimeoutExpired`` (carrying the output so far) is raised."""
    if timeout is None:
        raise TypeError("run_with_timeout: timeout is required")
    if kwargs.pop("capture_output", False):
        kwargs["stdout"] = subprocess.PIPE
        kwargs["stderr"] = subprocess.PIPE
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    kwargs.setdefault("start_new_session", True)
    proc = subprocess.Popen(argv, **kwargs)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            # grandchildren outside the group may still hold the pipes open
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            for f in (proc.stdout, proc.stderr, proc.stdin):
                if f:
                    f.close()
            proc.wait(timeout=5)
            out = err = None
        raise subprocess.TimeoutExpired(argv, timeout, output=out, stderr=err) from None
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    res = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check:
        res.check_returncode()
    return res


def _ip(*args: str, check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess:
    res = run_with_timeout(["ip", *args], timeout=timeout, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed (rc {res.returncode}): {res.stderr.strip()}")
    return res


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie (PID 1 here may not reap orphans, and a
    detached owner such as ``slurm_cluster.py up``'s keeper is an orphan once it dies)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _list_netns() -> list[str]:
    res = _ip("netns", "list", check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    res = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in res.stdout.split() if p.isdigit()]


def _kill_netns_processes(ns: str, rounds: int = 20) -> bool:
    """SIGKILL every process in namespace ``ns``; True when none is left."""
    for _ in range(rounds):
        pids = [p for p in _netns_pids(ns) if p != os.getpid()]
        if not pids:
            return True
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    return not _netns_pids(ns)


def _delete_netns(ns: str) -> None:
    _kill_netns_processes(ns)
    if ns in _list_netns():
        _ip("netns", "del", ns, check=False)
    shutil.rmtree(_ETC_NETNS / ns, ignore_errors=True)


def _rmdir_etc_netns_if_empty() -> None:
    try:
        _ETC_NETNS.rmdir()  # only succeeds when empty
    except OSError:
        pass


def cleanup_stale() -> list[str]:
    """Remove namespaces, /etc/netns entries and temp dirs left by dead processes."""
    removed = []
    for ns in _list_netns():
        m = _STALE_RE.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            _delete_netns(ns)
            removed.append(ns)
    if _ETC_NETNS.is_dir():
        for d in _ETC_NETNS.iterdir():
            m = _STALE_RE.match(d.name)
            if m and not _pid_alive(int(m.group(1))):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(str(d))
        if removed:
            _rmdir_etc_netns_if_empty()
    tmp = Path(tempfile.gettempdir())
    for d in tmp.glob(f"{PREFIX}*-*"):
        m = _STALE_RE.match(d.name)
        if m and d.is_dir() and (d / _MARKER).exists() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


def _ensure_ip() -> str | None:
    if shutil.which("ip"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "the 'ip' command (iproute2) is missing"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        run_with_timeout(["apt-get", "update"], timeout=300, env=env, capture_output=True)
        r = run_with_timeout(["apt-get", "install", "-y", "iproute2"], timeout=300, env=env,
                             capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return "the 'ip' command is missing and apt-get install iproute2 timed out"
    if r.returncode != 0 or not shutil.which("ip"):
        return "the 'ip' command is missing and apt-get install iproute2 failed: " + (
            r.stderr.strip().splitlines() or ["?"])[-1]
    return None


def can_create_namespaces() -> str | None:
    """None when network namespaces can be made here, else a one-line reason."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    reason = _ensure_ip()
    if reason:
        return reason
    if not shutil.which("unshare"):
        return "the 'unshare' command (util-linux) is missing"
    probe = f"{PREFIX}{os.getpid()}-probe{next(_counter)}"
    try:
        r = _ip("netns", "add", probe, check=False)
        if r.returncode != 0:
            return f"'ip netns add' failed: {r.stderr.strip()}"
        r = _ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1", check=False)
        if r.returncode != 0:
            return f"cannot create veth pairs in a namespace: {r.stderr.strip()}"
        r = run_with_timeout(["ip", "netns", "exec", probe, "unshare", "--uts", "hostname", "x"],
                             timeout=15, capture_output=True, text=True)
        if r.returncode != 0:
            return f"'ip netns exec NS unshare --uts hostname' failed: {r.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired, RuntimeError) as e:
        return f"namespace probe failed: {e}"
    finally:
        try:
            _delete_netns(probe)
        except Exception:
            pass
    return None


def remove_record(record: dict) -> list[str]:
    """Remove what :meth:`NetnsHosts.detach` recorded (processes in the namespaces,
    namespaces, /etc/netns entries, temp dir); returns what could not be removed."""
    for ns in reversed(record.get("namespaces", [])):
        _delete_netns(ns)
    for d in record.get("etc", []):
        shutil.rmtree(d, ignore_errors=True)
    if not record.get("etc_netns_existed", True):
        _rmdir_etc_netns_if_empty()
    if record.get("tmpdir"):
        shutil.rmtree(record["tmpdir"], ignore_errors=True)
    return sorted(set(record.get("namespaces", [])) & set(_list_netns()))


# --------------------------------------------------------------------------- launcher
_LAUNCHER = r"""#!/bin/bash
# ssh replacement for MPICH Hydra (-launcher ssh -launcher-exec THIS), written by
# netns_hosts.py: drops ssh options, maps the host name to its network namespace
# and runs the command there, like "ssh HOST CMD" would (CMD = "$*", given to a shell).
declare -A NS=(
@MAP@)
CLEAN_ENV=@CLEAN_ENV@
while (($#)); do
    case $1 in
        -[BbcDEeFIiJLlmOopQRSWw]) shift 2 ;;
        --) shift; break ;;
        -*) shift ;;
        *) break ;;
    esac
done
host=${1:-}
host=${host##*@}
shift
ns=${NS[$host]:-}
if [[ -z $ns ]]; then
    echo "netns launcher: unknown host '$host' (known: ${!NS[*]})" >&2
    exit 255
fi
printf '%s %s\n' "$host" "$*" >> "@LOG@" 2>/dev/null
if [[ $# -eq 0 ]]; then
    echo "netns launcher: no command for host '$host'" >&2
    exit 255
fi
if [[ $CLEAN_ENV == 1 ]]; then
    # what sshd gives a fresh session: not the caller's environment
    exec ip netns exec "$ns" unshare --uts /usr/bin/env -i \
        PATH="@SSH_PATH@" HOME="${HOME:-/root}" USER="${USER:-root}" \
        LOGNAME="${LOGNAME:-root}" SHELL=/bin/bash \
        /bin/bash -c 'hostname "$1" || exit 255; exec /bin/bash -c "$2"' netns-launcher "$host" "$*"
fi
exec ip netns exec "$ns" unshare --uts \
    /bin/bash -c 'hostname "$1" || exit 255; exec /bin/bash -c "$2"' netns-launcher "$host" "$*"
"""


# --------------------------------------------------------------------------- test bed
def _check_arguments(n_hosts, names, fabric_net, mgmt_net, fabric, default_route) -> None:
    """ValueError for arguments NetnsHosts cannot build."""
    if not 1 <= n_hosts <= 26:
        raise ValueError("n_hosts must be in 1..26")
    if names is not None and (len(names) != n_hosts or len(set(names)) != n_hosts
                              or not all(re.fullmatch(r"[a-z][a-z0-9]{0,7}", n)
                                         for n in names)):
        raise ValueError("names: n_hosts distinct short names ([a-z][a-z0-9]{0,7})")
    nets = ipaddress.ip_network(fabric_net), ipaddress.ip_network(mgmt_net)
    if nets[0].overlaps(nets[1]):
        raise ValueError("fabric_net and mgmt_net overlap")
    for net in nets:
        if not net.is_private or net.num_addresses < n_hosts + 3:
            raise ValueError(f"{net} must be private and large enough")
    fabric = fabric or ("veth" if n_hosts == 2 else "bridge")
    if fabric not in ("veth", "bridge") or (fabric == "veth" and n_hosts != 2):
        raise ValueError("fabric must be 'bridge', or 'veth' with exactly 2 hosts")
    if default_route not in (None, "eth0", "ib0"):
        raise ValueError("default_route must be None, 'eth0' or 'ib0'")


class NetnsHosts:
    """``n_hosts`` fake hosts ("a", "b", ...) made of network namespaces (see module doc).

    Parameters
    ----------
    n_hosts : number of hosts, 1..26.
    fabric_net, mgmt_net : private /24s for ib0 and eth0; host i gets ``.i+1``.
        Must not overlap anything configured on this machine (checked).
    fabric : "veth" (only for 2 hosts) or "bridge"; default veth for 2, else bridge.
    default_route : "eth0" (default: via a non-existent gateway on the dead
        management net), "ib0" (via a non-existent gateway on the fabric) or None.
    launcher_clean_env : the launcher starts remote commands with an ssh-like
        minimal environment (True, default) or passes the caller's through.
    names : the hosts' short names (default "a", "b", ...; ``n_hosts`` of them).
    owner : the pid whose death makes these objects stale (default: this process);
        a test bed that must outlive its creator (``slurm_cluster.py up``) passes the
        pid of a detached keeper process and hands over with :meth:`detach`.
    """

    def __init__(self, n_hosts: int = 2, *, fabric_net: str = "10.213.7.0/24",
                 mgmt_net: str = "10.213.8.0/24", fabric: str | None = None,
                 default_route: str | None = "eth0", launcher_clean_env: bool = True,
                 names: list[str] | None = None, owner: int | None = None):
        _check_arguments(n_hosts, names, fabric_net, mgmt_net, fabric, default_route)
        self.n_hosts = n_hosts
        self.fabric_net = ipaddress.ip_network(fabric_net)
        self.mgmt_net = ipaddress.ip_network(mgmt_net)
        self.fabric = fabric or ("veth" if n_hosts == 2 else "bridge")
        self.default_route = default_route
        self.launcher_clean_env = launcher_clean_env

        self.hosts: list[str] = list(names or string.ascii_lowercase[:n_hosts])
        self.tag = f"{PREFIX}{owner or os.getpid()}-{next(_counter)}"
        self._ns = {h: f"{self.tag}-{h}" for h in self.hosts}
        self.sink_namespace = f"{self.tag}-sink"
        self.fabric_namespace = f"{self.tag}-fabric" if self.fabric == "bridge" else None
        hosts_ip = lambda net: list(net.hosts())  # noqa: E731
        fab, mgmt = hosts_ip(self.fabric_net), hosts_ip(self.mgmt_net)
        self._addr = {(h, "ib0"): str(fab[i]) for i, h in enumerate(self.hosts)}
        self._addr.update({(h, "eth0"): str(mgmt[i]) for i, h in enumerate(self.hosts)})
        self._gateway = {"ib0": str(fab[-1]), "eth0": str(mgmt[-1])}

        self.tmpdir: Path | None = None
        self.launcher_script: str | None = None
        self.launcher_log: str | None = None  # one line "HOST COMMAND" per launch
        self._created_ns: list[str] = []
        self._created_etc: list[Path] = []
        self._etc_netns_existed = _ETC_NETNS.is_dir()
        self._popens: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._closed = False
        self._entered = False
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ accessors
    def namespace(self, host: str) -> str:
        return self._ns[host]

    def address(self, host: str, iface: str = "ib0") -> str:
        try:
            return self._addr[(host, iface)]
        except KeyError:
            raise KeyError(f"no address for host {host!r} interface {iface!r}") from None

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this test bed created (hosts, sink, fabric)."""
        return list(self._created_ns)

    def _wrap(self, host: str, argv) -> list[str]:
        if isinstance(argv, (str, bytes)):
            raise TypeError("argv must be a list of strings (no shell)")
        return ["ip", "netns", "exec", self.namespace(host), "unshare", "--uts",
                "/bin/sh", "-c", 'hostname "$0" && exec "$@"', host, *map(str, argv)]

    def run(self, host: str, argv, *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` on ``host`` (``ip netns exec NS ...``); ``timeout`` is required
        and the process group is killed when it expires.  Other keywords as for
        ``subprocess.run`` (capture_output, text, env, cwd, input, check, ...)."""
        self._check_open()
        return run_with_timeout(self._wrap(host, argv), timeout=timeout, **kwargs)

    def popen(self, host: str, argv, **kwargs) -> subprocess.Popen:
        """Start ``argv`` on ``host`` in the background (own process group); it is
        killed at teardown at the latest."""
        self._check_open()
        kwargs.setdefault("start_new_session", True)
        p = subprocess.Popen(self._wrap(host, argv), **kwargs)
        self._popens.append(p)
        return p

    def mpiexec_argv(self, mpiexec_path: str, n: int, ppn: int, iface: str | None = "ib0",
                     hosts: list[str] | None = None) -> list[str]:
        """Hydra arguments for one MPICH job over ``hosts`` (default: all).  Run it
        *on one of the hosts* (``self.run(host, argv + [prog, ...], timeout=...)``):
        the proxies must reach mpiexec's control port, which they cannot do on the
        machine's real loopback/hostname."""
        self._check_open()
        argv = [str(mpiexec_path), "-launcher", "ssh", "-launcher-exec", self.launcher_script]
        if iface:
            argv += ["-iface", iface]
        return argv + ["-hosts", ",".join(hosts or self.hosts), "-n", str(n), "-ppn", str(ppn)]

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "NetnsHosts":
        self.setup()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self.close()
        except Exception as e:
            if exc_type is None:
                raise
            warnings.warn(f"NetnsHosts teardown problem: {e}", RuntimeWarning, stacklevel=2)
        return False

    def _check_open(self) -> None:
        if not self._entered or self._closed:
            raise RuntimeError("NetnsHosts is not set up (use it as a context manager)")

    def _check_subnets_free(self) -> None:
        res = _ip("-4", "-o", "addr", "show", check=False)
        used = [ipaddress.ip_interface(tok) for line in res.stdout.splitlines()
                for i, tok in enumerate(line.split()) if i > 0 and line.split()[i - 1] == "inet"]
        routes = _ip("-4", "route", "show", "table", "all", check=False).stdout.split()
        for net in (self.fabric_net, self.mgmt_net):
            for itf in used:
                if itf.network.overlaps(net):
                    raise RuntimeError(f"{net} overlaps {itf} configured on this machine")
            for tok in routes:
                try:
                    r = ipaddress.ip_network(tok, strict=False)
                except ValueError:
                    continue
                if r.prefixlen > 0 and r.overlaps(net):
                    raise RuntimeError(f"{net} overlaps route {r} on this machine")

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._created_ns.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def setup(self) -> None:
        if self._entered:
            raise RuntimeError("NetnsHosts can be set up only once")
        self._entered = True
        t0 = time.monotonic()
        atexit.register(self.close)
        try:
            self._setup()
        except BaseException:
            try:
                self.close()
            except Exception:
                pass
            raise
        self.timings["setup"] = time.monotonic() - t0

    def _setup(self) -> None:
        cleanup_stale()
        self._check_subnets_free()
        self.tmpdir = Path(tempfile.mkdtemp(prefix=self.tag + "-"))
        (self.tmpdir / _MARKER).write_text(f"{os.getpid()}\n")

        for h in self.hosts:
            self._add_ns(self._ns[h])
        self._add_ns(self.sink_namespace)
        fab_plen = str(self.fabric_net.prefixlen)
        mgmt_plen = str(self.mgmt_net.prefixlen)

        # fabric: ib0
        if self.fabric == "veth":
            a, b = self.hosts
            _ip("-n", self._ns[a], "link", "add", "ib0", "type", "veth",
                "peer", "name", "ib0", "netns", self._ns[b])
        else:
            fns = self.fabric_namespace
            self._add_ns(fns)
            _ip("-n", fns, "link", "add", "br0", "type", "bridge")
            _ip("-n", fns, "link", "set", "br0", "up")
            for h in self.hosts:
                _ip("-n", self._ns[h], "link", "add", "ib0", "type", "veth",
                    "peer", "name", f"port-{h}", "netns", fns)
                _ip("-n", fns, "link", "set", f"port-{h}", "master", "br0")
                _ip("-n", fns, "link", "set", f"port-{h}", "up")
        # management: eth0, peer in the sink namespace, unconnected
        for h in self.hosts:
            ns = self._ns[h]
            _ip("-n", ns, "link", "add", "eth0", "type", "veth",
                "peer", "name", f"mgmt-{h}", "netns", self.sink_namespace)
            _ip("-n", self.sink_namespace, "link", "set", f"mgmt-{h}", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(h, 'ib0')}/{fab_plen}", "dev", "ib0")
            _ip("-n", ns, "addr", "add", f"{self.address(h, 'eth0')}/{mgmt_plen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "ib0", "up")
            _ip("-n", ns, "link", "set", "eth0", "up")
            if self.default_route:
                _ip("-n", ns, "route", "add", "default", "via",
                    self._gateway[self.default_route], "dev", self.default_route)

        # name resolution inside the namespaces (ip netns exec overlays /etc/netns/NS/*)
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        lines += [f"{self.address(h, 'ib0')} {h}" for h in self.hosts]
        lines += [f"{self.address(h, 'eth0')} {h}-eth0" for h in self.hosts]
        for h in self.hosts:
            d = _ETC_NETNS / self._ns[h]
            d.mkdir(parents=True, exist_ok=True)
            self._created_etc.append(d)
            (d / "hosts").write_text("\n".join(lines) + "\n")
            (d / "resolv.conf").write_text("# netns_hosts: no DNS inside the test hosts\n")

        # Hydra launcher
        mapping = "".join(f"    [{h}]={self._ns[h]}\n" for h in self.hosts)
        script = (_LAUNCHER.replace("@MAP@", mapping)
                  .replace("@CLEAN_ENV@", "1" if self.launcher_clean_env else "0")
                  .replace("@SSH_PATH@", _SSH_PATH)
                  .replace("@LOG@", str(self.tmpdir / "launcher.log")))
        path = self.tmpdir / "netns-ssh"
        path.write_text(script)
        path.chmod(0o755)
        self.launcher_script = str(path)
        self.launcher_log = str(self.tmpdir / "launcher.log")

    def detach(self) -> dict:
        """Hand the test bed over to another process: nothing is removed by this object
        any more (no close at exit); the returned record (JSON-able) lets
        :func:`remove_record` remove it all later, from any process."""
        with self._lock:
            self._closed = True
        try:
            atexit.unregister(self.close)
        except Exception:
            pass
        return {"namespaces": list(self._created_ns),
                "etc": [str(d) for d in self._created_etc],
                "tmpdir": str(self.tmpdir) if self.tmpdir else None,
                "etc_netns_existed": self._etc_netns_existed}

    def close(self) -> None:
        """Remove everything; idempotent, tries every step even if some fail."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        t0 = time.monotonic()
        try:
            atexit.unregister(self.close)
        except Exception:
            pass
        problems = []
        for p in self._popens:
            try:
                _kill_group(p)
                p.wait(timeout=5)
            except Exception as e:  # pragma: no cover
                problems.append(f"popen {p.pid}: {e}")
        for ns in reversed(self._created_ns):
            try:
                if not _kill_netns_processes(ns):
                    problems.append(f"processes survive in {ns}")
                _ip("netns", "del", ns, check=False)
            except Exception as e:
                problems.append(f"{ns}: {e}")
        for d in self._created_etc:
            shutil.rmtree(d, ignore_errors=True)
        if not self._etc_netns_existed:
            _rmdir_etc_netns_if_empty()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        try:
            left = set(self._created_ns) & set(_list_netns())
        except Exception as e:
            left, problems = set(), problems + [f"ip netns list: {e}"]
        for ns in left:  # one more try
            _ip("netns", "del", ns, check=False)
        left = set(self._created_ns) & set(_list_netns())
        if left:
            problems.append(f"namespaces left: {sorted(left)}")
        self.timings["teardown"] = time.monotonic() - t0
        if problems:
            raise RuntimeError("NetnsHosts teardown: " + "; ".join(problems))

    def __del__(self):  # last resort, e.g. setup() without a with-block
        try:
            if self._entered and not self._closed:
                self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<NetnsHosts {self.tag} hosts={self.hosts} fabric={self.fabric_net}>"
