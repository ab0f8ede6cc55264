"""Network diagnosis: why a worker cannot reach the scheduler, and ``--check``.

Two entry points:

* :func:`reachability_problem`, run by every worker process before it starts its Dask
  worker: a bounded TCP connect to the scheduler's address. On failure it returns one
  line saying which host cannot reach which address, what interfaces both hosts have,
  and which ``--interface`` would work (instead of a worker that retries silently until
  some timeout far away).
* :func:`run_check` (``dask-mpi-launch --check``): no cluster; every rank listens on each
  of its interfaces, every rank tries to reach every other host over each interface name,
  and rank 0 prints a table and the ``--interface`` that connects all hosts.

The formatting and the decisions are pure functions (:func:`unreachable_message`,
:func:`suggest_interfaces`, :func:`check_report`), tested with plain dicts.

Interfaces travel between ranks as ``{name: ["IP/PREFIXLEN", ...]}`` (IPv4 only), the
shape of :func:`local_interfaces`; entries without ``/PREFIXLEN`` are accepted too (then
"same /24" is the guess for "same network").
"""
from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket
import sys
import threading
import time

from dask_mpi_launch.base.status import PREFIX

# interface names of fast fabrics, preferred when several interfaces would work
_FABRIC_PREFIXES = ("ib", "hsn", "ipogif", "opa", "hfi")
_TCP_SCHEMES = ("tcp", "tls", "ws", "wss")
_TRY_SECONDS = 2.0  # one connect attempt of --check


# ---------------------------------------------------------------------------
# this host's interfaces


def _prefixlen(netmask: str | None) -> int | None:
    if not netmask:
        return None
    try:
        return ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen
    except ValueError:
        return None


def networks_from_addrs(if_addrs: dict) -> dict[str, list[tuple[str, int | None]]]:
    """{name: [(IPv4, prefixlen or None), ...]} from ``psutil.net_if_addrs()``-like data."""
    out = {}
    for name, addrs in if_addrs.items():
        found = [(a.address, _prefixlen(a.netmask)) for a in addrs
                 if a.family == socket.AF_INET]
        if found:
            out[name] = found
    return out


def local_networks() -> dict[str, list[tuple[str, int | None]]]:
    """{interface name: [(IPv4 address, prefix length), ...]} of this host."""
    import psutil

    return networks_from_addrs(psutil.net_if_addrs())


def local_interfaces() -> dict[str, list[str]]:
    """{interface name: ["IP/PREFIXLEN", ...]} of this host (IPv4; interfaces without an
    IPv4 address are left out). Sent by rank 0 with the scheduler's address."""
    return {name: [f"{ip}/{plen}" if plen is not None else ip for ip, plen in found]
            for name, found in local_networks().items()}


def _hostname() -> str:
    return socket.gethostname()


def network_identity() -> str | None:
    """This process's network stack: the kernel's boot id and the inode of its network
    namespace (two containers or namespaces on one machine differ, whatever their host
    names); None where /proc does not tell."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/net').st_ino}"
    except OSError:
        return None


def _own_addresses(interfaces: dict) -> set[str]:
    """The non-loopback IPv4 addresses of an interface table."""
    found = set()
    for name, entries in (interfaces or {}).items():
        for entry in entries:
            parsed = _interface(str(entry))
            if parsed is not None and not parsed[0].ip.is_loopback:
                found.add(str(parsed[0].ip))
    return found


def is_same_host(local: dict, remote: dict, *, local_id: str | None = None,
                 remote_id: str | None = None) -> bool | None:
    """Whether two interface tables come from one network stack (one host, as far as
    connections go). Never from the host names: containers and network namespaces often
    share one. The network identities (:func:`network_identity`) decide when both are
    known; else the tables: one host has the same non-loopback addresses (one address in
    common, such as docker0's 172.17.0.1, proves nothing). None: loopback only, unknown."""
    if local_id and remote_id:
        return local_id == remote_id
    mine, theirs = _own_addresses(local), _own_addresses(remote)
    if not mine and not theirs:
        return None
    return mine == theirs


@functools.lru_cache(maxsize=4096)
def _interface(entry: str):
    """(IPv4Interface, prefix known?) of "IP/LEN" or "IP"; None if not IPv4. Cached: the
    report of N hosts asks for each host's address N times (200 hosts: 80,000 parses, 1-2 s
    on a loaded core, became 400)."""
    try:
        if "/" in entry:
            return ipaddress.IPv4Interface(entry), True
        return ipaddress.IPv4Interface(f"{entry}/24"), False
    except ValueError:
        return None


def _ip_of(entry: str) -> str:
    return entry.split("/", 1)[0]


def _is_loopback(name: str, entries) -> bool:
    if name == "lo":
        return True
    parsed = [_interface(e) for e in entries]
    return bool(parsed) and all(p is not None and p[0].ip.is_loopback for p in parsed)


def _is_fabric(name: str) -> bool:
    return name.startswith(_FABRIC_PREFIXES)


def format_interfaces(interfaces: dict) -> str:
    """'eth0=10.0.0.1/24 ib0=10.1.0.1/24 lo=127.0.0.1/8' (sorted; several addresses
    joined by commas)."""
    if not interfaces:
        return "no IPv4 interfaces"
    return " ".join(f"{name}={','.join(map(str, entries))}"
                    for name, entries in sorted(interfaces.items()) if entries)


# ---------------------------------------------------------------------------
# addresses and connection attempts


def parse_address(address: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of 'tcp://1.2.3.4:8786', 'tls://[::1]:8786', '1.2.3.4:8786',
    'tcp://host' (port None)... Raises ValueError when there is no host."""
    text = str(address).strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "tcp", text
    scheme = scheme.lower()
    rest = rest.split("/", 1)[0]
    port = None
    if rest.startswith("["):  # [IPv6]:port
        host, _, tail = rest[1:].partition("]")
        if tail.startswith(":") and tail[1:]:
            port = int(tail[1:])
    elif rest.count(":") > 1:  # bare IPv6, no port
        host = rest
    else:
        host, _, p = rest.partition(":")
        if p:
            port = int(p)
    if not host:
        raise ValueError(f"no host in address {address!r}")
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"bad port in address {address!r}")
    return scheme, host, port


def _error_text(e: BaseException) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve the name ({e.strerror or e})"
    code = getattr(e, "errno", None)
    names = {errno.ECONNREFUSED: "connection refused", errno.EHOSTUNREACH: "no route to host",
             errno.ENETUNREACH: "network unreachable", errno.ETIMEDOUT: "timed out",
             errno.ECONNRESET: "connection reset", errno.EADDRNOTAVAIL: "address not available"}
    if code in names:
        return names[code]
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def try_connect(sockaddr, family: int, timeout: float, ssl_context=None) -> str | None:
    """None if a TCP connection to ``sockaddr`` opens within ``timeout``, else the error.

    With ``ssl_context`` a TLS handshake follows (a TLS listener warns about every
    connection closed before its handshake); its outcome does not matter: the address
    was reached, and TLS problems are Dask's to report.
    """
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.settimeout(max(timeout, 0.001))
        s.connect(sockaddr)
    except OSError as e:
        s.close()
        return _error_text(e)
    try:
        if ssl_context is not None:
            with ssl_context.wrap_socket(s, server_hostname=None) as tls:
                s = tls
    except (OSError, ValueError):
        pass
    finally:
        s.close()
    return None


def _tls_context(security=None):
    """The client-side SSL context a worker would use (``security`` or Dask's config)."""
    try:
        from distributed.security import Security

        return (security or Security()).get_connection_args("worker").get("ssl_context")
    except Exception:
        return None


def _answers(error: str | None) -> bool:
    """The host at that address answered (a refusal proves the route works)."""
    return error is None or error == "connection refused"


# ---------------------------------------------------------------------------
# a worker that cannot reach the scheduler


def _pair_candidate(le, re_, same_host: bool, answered: dict | None) -> tuple | None:
    """(answered, remote IP, "network" text) of a local and a remote address of one
    interface name that share a network; None if they do not, if they are one address on
    two hosts (docker0's 172.17.0.1... never connects two hosts), or if a probe of the
    remote address did not answer."""
    lp, rp = _interface(str(le)), _interface(str(re_))
    if lp is None or rp is None:
        return None
    (li, lknown), (ri, rknown) = lp, rp
    if li.ip == ri.ip and not same_host:
        return None
    if not (ri.ip in li.network or li.ip in ri.network):
        return None
    ok = None if answered is None else answered.get(str(ri.ip))
    if ok is False:
        return None
    net = li.network if lknown or not rknown else ri.network
    guess = "" if (lknown or rknown) else " (guessed /24)"
    return (ok is True, str(ri.ip), f"{net}{guess}")


def _best_pair(local_entries, remote_entries, same_host: bool,
               answered: dict | None) -> tuple | None:
    """The best :func:`_pair_candidate` over all address pairs of one interface name (an
    address that answered first), None if no pair shares a network."""
    match = None
    for le in local_entries:
        for re_ in remote_entries:
            cand = _pair_candidate(le, re_, same_host, answered)
            if cand is not None and (match is None or cand > match):
                match = cand
    return match


def suggest_interfaces(local: dict, remote: dict, *, exclude=(), same_host: bool = False,
                       answered: dict | None = None) -> list[tuple[str, str]]:
    """Interface names that both hosts have, whose addresses share a network, best first:
    [(name, why), ...].

    ``local``/``remote``: {name: ["IP/LEN" or "IP", ...]}; ``exclude``: names already
    known not to work; ``answered``: {remote IP: bool} from probes (a probed address that
    answered ranks first, one that did not is dropped). Loopback only counts on one host;
    an address that both hosts have (docker0's 172.17.0.1...) never connects two hosts.
    """
    found = []
    for name in sorted(set(local) & set(remote)):
        if name in exclude:
            continue
        loop = _is_loopback(name, local[name]) or _is_loopback(name, remote[name])
        if loop and not same_host:
            continue
        match = _best_pair(local[name], remote[name], same_host, answered)
        if match is None:
            continue
        answered_ok, rip, net = match
        why = f"{rip} answers from here" if answered_ok else f"both on {net}"
        rank = (not answered_ok, loop, not _is_fabric(name), name)
        found.append((rank, name, why))
    found.sort()
    return [(name, why) for _, name, why in found]


def unreachable_message(*, host: str, address: str, error: str, seconds: float,
                        local: dict, scheduler_host: str | None, scheduler_interfaces: dict,
                        target_ip: str | None = None, answered: dict | None = None,
                        same_host: bool | None = None) -> str:
    """One line: ``host`` cannot reach ``address``; both hosts' interfaces; what to use.

    ``same_host``: whether the scheduler's host is this one (:func:`is_same_host`); None:
    decided from the two interface tables (the host names only if those cannot tell)."""
    failed_names = _failed_interfaces(scheduler_interfaces, target_ip)
    on_scheduler_host = bool(failed_names and scheduler_host)
    where = _tried_where(address, target_ip, failed_names, scheduler_host)
    text = (f"host {host} cannot reach the scheduler at {address}{where}: {error} "
            f"(tried for {seconds:.1f} s); host {host} has {format_interfaces(local)}")
    if not scheduler_interfaces or not scheduler_host:
        return text + ("; the scheduler's host is unknown: run the job with --check to see "
                       "which --interface connects all hosts")
    if not on_scheduler_host and not _is_loopback_ip(target_ip):
        # e.g. joining a cluster: rank 0's host is not the scheduler's
        return text + (f"; rank 0's host {scheduler_host} (not the scheduler's) has "
                       f"{format_interfaces(scheduler_interfaces)}; check the route from "
                       f"{host} to that address, or run the job with --check")
    if same_host is None:
        same_host = is_same_host(local, scheduler_interfaces)
    if same_host is None:
        same_host = host == scheduler_host
    namesake = ""
    if host == scheduler_host and not same_host:
        namesake = " (another host of the same name: a container or network namespace?)"
    text += (f"; the scheduler's host {scheduler_host}{namesake} has "
             f"{format_interfaces(scheduler_interfaces)}")
    if same_host:
        return text + ("; the scheduler runs on this very host: a firewall or a closed "
                       "scheduler? run the job with --check to test the interfaces")
    options = suggest_interfaces(local, scheduler_interfaces, exclude=failed_names,
                                 answered=answered)
    return text + _interface_advice(options, host, scheduler_host, failed_names)


def _failed_interfaces(scheduler_interfaces: dict, target_ip: str | None) -> list[str]:
    """The names of the scheduler host's interfaces that have ``target_ip``, the address
    that was tried (sorted; none if that address is not one of them)."""
    return [name for name, entries in sorted((scheduler_interfaces or {}).items())
            if target_ip and any(_ip_of(str(e)) == target_ip for e in entries)]


def _tried_where(address: str, target_ip: str | None, failed_names: list,
                 scheduler_host: str | None) -> str:
    """What the address tried was, where ``address`` does not say it: the scheduler host's
    interface (" (eth0 of host a)"), else the IP a name resolved to (" (10.0.0.1)")."""
    if failed_names and scheduler_host:
        return f" ({'/'.join(failed_names)} of host {scheduler_host})"
    if target_ip and target_ip != _host_part(address):
        return f" ({target_ip})"
    return ""


def _interface_advice(options: list, host: str, scheduler_host: str,
                      failed_names: list) -> str:
    """The end of the message: the --interface to use (and up to three others), or that
    no interface shares a network and --check would tell more."""
    if not options:
        tried = f" other than {'/'.join(failed_names)}" if failed_names else ""
        return (f"; no interface of host {host}{tried} shares a network with host "
                f"{scheduler_host}: run the job with --check to see which --interface "
                "connects all hosts")
    name, why = options[0]
    also = ""
    if len(options) > 1:
        also = f"; also possible: {', '.join(n for n, _ in options[1:4])}"
    return f"; use --interface {name} ({why}{also})"


def _is_loopback_ip(ip: str | None) -> bool:
    try:
        return bool(ip) and ipaddress.ip_address(ip.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _host_part(address: str) -> str:
    try:
        return parse_address(address)[1]
    except ValueError:
        return ""


#: errors that prove a route does not work: reported by an early probe without waiting
#: out the connect timeout (a refusal may be a scheduler still starting, a timeout a
#: scheduler whose accept queue is full on a loaded machine: those wait)
DEFINITE_ERRORS = ("no route to host", "network unreachable", "address not available")


def reachability_problem(address: str, timeout: float, scheduler_info: dict,
                         security=None, definite_only: bool = False) -> str | None:
    """None if this host can open a connection to ``address`` within ``timeout``, else
    one line saying what fails and which --interface would work.

    ``definite_only``: stop at the first error of :data:`DEFINITE_ERRORS` and report only
    such an error (None otherwise): the early probe, safe on a loaded machine.

    ``scheduler_info``: {"host": the scheduler's host name, "interfaces": its
    :func:`local_interfaces`, optionally "network": its :func:`network_identity`};
    ``security``: the worker's ``distributed.Security`` for
    tls:// and wss:// (default: from Dask's config; without TLS settings those are not
    checked, Dask says what is missing).
    """
    target = _tcp_target(address, security)
    if target is None:
        return None
    host, port, ssl_context = target
    start = time.monotonic()
    deadline = start + max(float(timeout), 0.1)
    reached, error, target_ip = _connect_until(host, port, deadline, ssl_context,
                                               definite_only)
    if reached or (definite_only and error not in DEFINITE_ERRORS):
        return None
    info = scheduler_info or {}
    sched_host, sched_ifaces = info.get("host"), info.get("interfaces") or {}
    local = local_interfaces()
    me = _hostname()
    same_host = is_same_host(local, sched_ifaces, local_id=network_identity(),
                             remote_id=info.get("network"))
    if same_host is None:
        same_host = sched_host == me
    answered = None
    if sched_host and sched_ifaces and not same_host:
        answered = _answering_addresses(local, sched_ifaces, target_ip, port,
                                        min(1.0, float(timeout)), ssl_context)
    return unreachable_message(
        host=me, address=address, error=error or "failed", seconds=time.monotonic() - start,
        local=local, scheduler_host=sched_host, scheduler_interfaces=sched_ifaces,
        target_ip=target_ip, answered=answered, same_host=same_host)


def _tcp_target(address: str, security=None) -> tuple[str, int, object] | None:
    """(host, port, SSL context or None) of an address this check can judge; None for
    one it leaves to Dask (unparsable, not plain TCP, tls:// without TLS settings)."""
    try:
        scheme, host, port = parse_address(address)
    except ValueError:
        return None  # not ours to judge: Dask will say what is wrong with it
    if scheme not in _TCP_SCHEMES or port is None:
        return None  # inproc://, ucx://...: not a plain TCP connection
    ssl_context = None
    if scheme in ("tls", "wss"):
        ssl_context = _tls_context(security)
        if ssl_context is None:
            return None
    return host, port, ssl_context


def _connect_until(host: str, port: int, deadline: float, ssl_context=None,
                   stop_on_definite: bool = False) -> tuple[bool, str | None, str | None]:
    """(reached, the last error, the last IP tried): every address ``host`` resolves to,
    in rounds until one connects or ``deadline`` passes (or, with ``stop_on_definite``,
    one fails with an error of :data:`DEFINITE_ERRORS`)."""
    error = None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        infos, error = [], _error_text(e)
    target_ip = None
    while infos:
        for family, _, _, _, sockaddr in infos:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            target_ip = sockaddr[0]
            error = try_connect(sockaddr, family, min(remaining, 5.0), ssl_context)
            if error is None:
                return True, None, target_ip
            if stop_on_definite and error in DEFINITE_ERRORS:
                return False, error, target_ip
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(0.2, remaining))  # refused: the scheduler may be still starting
    return False, error, target_ip


def _answering_addresses(local: dict, sched_ifaces: dict, target_ip: str | None, port: int,
                         timeout: float, ssl_context=None) -> dict[str, bool]:
    """Which of the scheduler host's other addresses answer from here (a refusal is an
    answer: the route works), to recommend an interface that was seen to work."""
    exclude = _failed_interfaces(sched_ifaces, target_ip)
    candidates = suggest_interfaces(local, sched_ifaces, exclude=exclude)
    ips = {_ip_of(str(e)) for n, _ in candidates for e in sched_ifaces.get(n, [])}
    return _probe(sorted(ips), port, timeout, ssl_context)


def _probe(ips: list[str], port: int, timeout: float, ssl_context=None) -> dict[str, bool]:
    """{ip: answered} for IPv4 ``ips`` at ``port``, tried in parallel within ``timeout``."""
    result: dict[str, bool] = {}

    def one(ip):
        result[ip] = _answers(try_connect((ip, port), socket.AF_INET, timeout, ssl_context))

    threads = [threading.Thread(target=one, args=(ip,), daemon=True) for ip in ips[:16]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 0.5)
    return result


# ---------------------------------------------------------------------------
# --check: which interface connects all hosts


def _ranges(ranks) -> str:
    ranks = sorted(ranks)
    parts, i = [], 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ",".join(parts)


def _connected_group(hosts: list[str], bad_pairs: set) -> list[str]:
    """A largest-ish group of ``hosts`` in which no pair is in ``bad_pairs`` (greedy: drop
    the host with the most failures, the later one on ties, until none is left)."""
    partners: dict[str, list[str]] = {h: [] for h in hosts}
    for s, t in bad_pairs:
        if s in partners and t in partners and s != t:
            partners[s].append(t)
            partners[t].append(s)
    fails = {h: len(p) for h, p in partners.items()}
    order = {h: i for i, h in enumerate(hosts)}
    alive = set(hosts)
    while alive:
        worst = max(alive, key=lambda h: (fails[h], order[h]))
        if fails[worst] == 0:
            break
        alive.discard(worst)
        for other in partners[worst]:
            if other in alive:
                fails[other] -= 1
    return [h for h in hosts if h in alive]


def _attempts_by_pair(results: list) -> dict:
    """{(iface, source host, destination host): [error or None, ...]} from the results."""
    attempts: dict = {}
    for src, iface, dst, err in results:
        attempts.setdefault((iface, src, dst), []).append(err)
    return attempts


def _check_headline(hosts: dict) -> str:
    """The first line: how many ranks on how many hosts, the first four hosts named."""
    names = list(hosts)
    shown = ", ".join(f"{h} (ranks {_ranges(r)})" for h, r in list(hosts.items())[:4])
    if len(names) > 4:
        shown += f", ... ({len(names) - 4} more)"
    n_ranks = sum(len(r) for r in hosts.values())
    return (f"{PREFIX}: check of {n_ranks} rank{'s' * (n_ranks != 1)} on {len(names)} "
            f"host{'s' * (len(names) != 1)}: {shown}")


def _pair_error(iface: str, s: str, d: str, addrs: dict, attempts: dict) -> str | None:
    """Why host ``s`` did not reach host ``d`` over ``iface`` (None: it did): ``d`` has
    no such interface or could not listen on it, the pair was not tested, or the error of
    a failed attempt."""
    a = addrs.get(d)
    if a is None or not _interface(str(a)):
        return f"{d} has no {iface}" if a is None else f"{d}: {a}"
    errs = attempts.get((iface, s, d))
    if errs is None:
        return f"{s}->{d} not tested"
    failed = [e for e in errs if e is not None]
    return f"{s}->{d} {failed[0]}" if failed else None


def _interface_failures(iface: str, names: list, addrs: dict,
                        attempts: dict) -> tuple[list[str], int, set]:
    """(the first three distinct problems, how many distinct problems, the failing
    (source, destination) pairs) of one interface. Every host tests every other host; on
    a one-host job the host tests itself."""
    single = len(names) == 1
    problems, distinct, bad = [], set(), set()
    for s in names:
        for d in (names if single else [x for x in names if x != s]):
            err = _pair_error(iface, s, d, addrs, attempts)
            if err is None:
                continue
            bad.add((s, d))
            if err not in distinct:
                distinct.add(err)
                if len(problems) < 3:
                    problems.append(err)
    return problems, len(distinct), bad


def _interface_row(iface: str, names: list, listeners: dict, attempts: dict,
                   missing) -> tuple[tuple, tuple | None]:
    """One row of the table, (iface, hosts count, "ok" or "", addresses or problems), and
    the interface's rank among the working ones (None: it does not connect all hosts).
    Loopback is not tested between hosts: it reaches its own host only."""
    single = len(names) == 1
    addrs = {h: listeners.get(h, {}).get(iface) for h in names}
    entries = [a for a in addrs.values() if isinstance(a, str) and _interface(a)]
    loop = iface == "lo" or (entries and all(_interface(a)[0].ip.is_loopback for a in entries))
    if loop and not single:
        return (iface, "-", "", "loopback: reaches its own host only, not tested"), None
    problems, n_distinct, bad = _interface_failures(iface, names, addrs, attempts)
    group = _connected_group(names, bad)
    count = f"{len(group)}/{len(names)} host{'s' * (len(names) != 1)}"
    if not bad and not missing:
        detail = " ".join(f"{h}={addrs[h]}" for h in names[:4]) + (
            " ..." if len(names) > 4 else "")
        return (iface, count, "ok", detail), (loop, not _is_fabric(iface), iface)
    more = n_distinct - len(problems)
    detail = "; ".join(problems) + (f"; ... ({more} more)" if more > 0 else "")
    return (iface, count, "", detail), None


def _table_lines(rows: list) -> list[str]:
    """The table under the headline: a header, then one aligned line per row."""
    w = max([len("interface")] + [len(r[0]) for r in rows])
    lines = [f"  {'interface':<{w}}  {'hosts':<11}  {'':<2}  addresses / problems"]
    for iface, count, status, detail in rows:
        lines.append(f"  {iface:<{w}}  {count:<11}  {status:<2}  {detail}".rstrip())
    return lines


def _check_conclusion(rows: list, working: list, missing) -> tuple[str | None, str]:
    """(the interface to use or None, the last line): the best working interface (fabric
    first, loopback last, then by name), else what failed and why."""
    if working:
        working.sort()
        best = working[0][1]
        return best, f"{PREFIX}: use --interface {best}"
    tested = [r for r in rows if r[1] != "-"]
    summary = "; ".join(f"{r[0]}: {r[1]}" for r in tested[:4]) or "no interface with an IPv4 address"
    why = "ranks missing" if missing and tested else "check routes and firewalls between the hosts"
    return None, (f"{PREFIX}: error: no interface connects all hosts ({summary}): {why}")


def check_report(hosts: dict, listeners: dict, results: list, missing=()) -> tuple[list[str], str | None, str]:
    """What ``--check`` prints, from what the ranks found.

    ``hosts``: {host: [ranks]} in order of first rank; ``listeners``: {host: {iface: IP or
    an error text}}; ``results``: [(source host, iface, destination host, error or None)];
    ``missing``: ranks that did not report. Returns (table lines, the interface to use or
    None, the last line).
    """
    names = list(hosts)
    ifaces = sorted({i for per in listeners.values() for i in per})
    attempts = _attempts_by_pair(results)
    rows, working = [], []
    for iface in ifaces:
        row, works = _interface_row(iface, names, listeners, attempts, missing)
        rows.append(row)
        if works is not None:
            working.append((works, iface))
    rows.sort(key=lambda r: (r[2] != "ok", r[1] == "-", r[0]))
    lines = [_check_headline(hosts)] + _table_lines(rows)
    if missing:
        lines.append(f"  no report from rank{'s' * (len(missing) != 1)} {_ranges(missing)} "
                     "(they did not take part in time)")
    best, last = _check_conclusion(rows, working, missing)
    return lines, best, last


class _Listeners:
    """One listening socket per interface (first IPv4 address), accepted and closed by a
    background thread so backlogs never fill."""

    def __init__(self, networks: dict):
        import selectors

        self.sockets: list[socket.socket] = []
        self.table: dict[str, object] = {}  # iface -> (ip, port) or error text
        self._sel = selectors.DefaultSelector()
        for name, found in sorted(networks.items()):
            ip = found[0][0]
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((ip, 0))
                s.listen(512)
                s.setblocking(False)
            except OSError as e:
                s.close()
                self.table[name] = f"cannot listen on {ip}: {_error_text(e)}"
                continue
            self.sockets.append(s)
            self._sel.register(s, 1)
            self.table[name] = (ip, s.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.05):
                try:
                    conn, _ = key.fileobj.accept()
                    conn.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1.0)
        self._sel.close()
        for s in self.sockets:
            s.close()


def host_labels(hellos: dict) -> dict[int, tuple[str, dict]]:
    """{rank: (host label, listeners)} from {rank: (host name, listeners, network identity
    or None)}: ranks are on one host when their network stacks are one (the identity, else
    the non-loopback addresses they listen on), whatever their host names say; hosts that
    share a name (containers, network namespaces) are told apart as name#1, name#2..."""
    stacks: dict[str, list] = {}  # host name -> [stack key, ...] in order of first rank
    keys = {}
    for r in sorted(hellos):
        name, table, *rest = hellos[r]
        ident = rest[0] if rest else None
        key = ident or tuple(sorted(str(w[0]) for w in table.values() if isinstance(w, tuple)
                                    and not ipaddress.ip_address(w[0]).is_loopback))
        keys[r] = key
        if key not in stacks.setdefault(name, []):
            stacks[name].append(key)
    out = {}
    for r in sorted(hellos):
        name, table = hellos[r][0], hellos[r][1]
        found = stacks[name]
        out[r] = (name if len(found) == 1 else f"{name}#{found.index(keys[r]) + 1}", table)
    return out


def _targets(rank: int, me: str, hellos: dict) -> list[tuple[str, str, tuple]]:
    """[(iface, destination host, (ip, port))] this rank tests.

    One rank per host tests (its first): reachability is a matter of hosts, and every
    rank testing would make ranks x hosts x interfaces connections. It tries one listener
    per other host and interface (loopback skipped), spreading over that host's ranks; on
    a one-host job, the listeners of the next rank on the host (loopback included).
    """
    by_host: dict[str, list[int]] = {}
    for r in sorted(hellos):
        by_host.setdefault(hellos[r][0], []).append(r)
    mine = by_host.get(me, [rank])
    if rank != min(mine):
        return []
    out = []
    if len(by_host) <= 1:
        peer = mine[1] if len(mine) > 1 else rank
        for iface, where in sorted(hellos.get(peer, (me, {}))[1].items()):
            if isinstance(where, tuple):
                out.append((iface, me, where))
        return out
    index = list(by_host).index(me)
    for host, ranks in by_host.items():
        if host == me:
            continue
        peer = ranks[index % len(ranks)]  # spread the load over that host's ranks
        for iface, where in sorted(hellos[peer][1].items()):
            if isinstance(where, tuple) and not ipaddress.ip_address(where[0]).is_loopback:
                out.append((iface, host, where))
    return out


def _run_tests(targets, per_try: float, poll) -> list[tuple[str, str, str | None]]:
    """Connect to every target in parallel threads; [(iface, host, error or None)]."""
    from concurrent.futures import ThreadPoolExecutor

    if not targets:
        return []
    with ThreadPoolExecutor(max_workers=min(128, len(targets))) as pool:
        futures = [(iface, host, pool.submit(try_connect, tuple(where), socket.AF_INET, per_try))
                   for iface, host, where in targets]
        while not all(f.done() for _, _, f in futures):
            poll()
            time.sleep(0.005)
        return [(iface, host, f.result()) for iface, host, f in futures]


def run_check(comm, settings) -> int:
    """``--check``: test which interface connects all hosts of the job; print the answer
    on rank 0; return the same status on every rank (0: one interface works) after
    finalizing the control plane (MPI_Finalize, so the launcher keeps the status).

    ``comm``: an MPI communicator, or a control plane object itself (``Control``,
    ``FileControl``: ``rank``, ``size``, ``send``, ``broadcast``, ``poll``,
    ``allreduce_max``, ``finish``, ``finalize``, ``abort``).
    """
    if all(hasattr(comm, a) for a in ("poll", "broadcast", "allreduce_max", "finish")):
        control = comm
    else:
        from dask_mpi_launch.control.over_mpi import Control

        control = Control(comm)
    rank, size = control.rank, control.size
    me = _hostname()
    bound = float(settings.connect_timeout)
    per_try = min(_TRY_SECONDS, bound)
    inbox: dict[str, dict[int, tuple]] = {"check-hello": {}, "check-result": {}}

    def poll() -> None:
        for kind, r, *fields in control.poll():
            if kind in inbox:
                inbox[kind][r] = tuple(fields)

    listeners = _Listeners(local_networks())
    try:
        hello = (me, listeners.table, network_identity())
        inbox["check-hello"][rank] = hello
        control.broadcast("check-hello", rank, *hello)
        deadline = time.monotonic() + bound
        while len(inbox["check-hello"]) < size and time.monotonic() < deadline:
            poll()
            time.sleep(0.002)
        hellos = host_labels(inbox["check-hello"])
        me = hellos[rank][0]
        targets = _targets(rank, me, hellos)
        found = _run_tests(targets, per_try, poll)
        batches = -(-len(targets) // 128) if targets else 0
        test_bound = per_try * max(batches, 1) + 2.0
        mine = [(me, iface, host, err) for iface, host, err in found]
        status = 0
        if rank == 0:
            inbox["check-result"][0] = (me, mine)
            deadline = time.monotonic() + bound + test_bound
            while len(inbox["check-result"]) < size and time.monotonic() < deadline:
                poll()
                time.sleep(0.002)
            poll()
            status = _report(hellos, dict(inbox["check-result"]), size)
        else:
            control.send(0, "check-result", rank, me, mine)
        timeout = 2 * bound + test_bound + 10
        agreed = control.allreduce_max(status, timeout, poll)
        if agreed is None:
            print(f"{PREFIX}: rank {rank} (host {me}): other ranks did not finish the check "
                  f"within {timeout:g} s: aborting the job", file=sys.stderr, flush=True)
            control.abort(1)
            agreed = max(status, 1)  # if abort returns (a control plane without MPI)
        status = int(agreed)
    finally:
        listeners.close()
    control.finish()
    finalize = getattr(control, "finalize", None)
    if finalize is not None:
        finalize()
    else:
        control.MPI.Finalize()
    return status


def _report(hellos: dict, reports: dict, size: int) -> int:
    hosts: dict[str, list[int]] = {}
    listeners: dict[str, dict] = {}
    for r in sorted(hellos):
        host, table = hellos[r]
        hosts.setdefault(host, []).append(r)
        per = listeners.setdefault(host, {})
        for iface, where in table.items():
            if iface not in per or (isinstance(where, tuple) and not _interface(per[iface])):
                per[iface] = where[0] if isinstance(where, tuple) else where
    results = [row for r in sorted(reports) for row in reports[r][1]]
    missing = sorted(set(range(size)) - (set(hellos) & set(reports)))
    lines, best, last = check_report(hosts, listeners, results, missing)
    if best is None:
        print("\n".join(lines), flush=True)
        print(last, file=sys.stderr, flush=True)
        return 1
    print("\n".join(lines + [last]), flush=True)
    return 0
