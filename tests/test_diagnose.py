"""dask_mpi_launch.roles.diagnose: the pure parts with plain dicts, and the connect attempt on
this machine's loopback (no MPI)."""
from __future__ import annotations

import os
import socket
import threading
import time
from collections import namedtuple

import pytest

from dask_mpi_launch.roles import diagnose as d

A = {"lo": ["127.0.0.1/8"], "eth0": ["10.213.8.1/24"], "ib0": ["10.213.7.1/24"],
     "docker0": ["172.17.0.1/16"]}
B = {"lo": ["127.0.0.1/8"], "eth0": ["10.213.8.2/24"], "ib0": ["10.213.7.2/24"],
     "docker0": ["172.17.0.1/16"]}


# ---------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("address, expected", [
    ("tcp://10.0.0.1:8786", ("tcp", "10.0.0.1", 8786)),
    ("tls://node7:8786", ("tls", "node7", 8786)),
    ("10.0.0.1:99", ("tcp", "10.0.0.1", 99)),
    ("tcp://[::1]:8786", ("tcp", "::1", 8786)),
    ("tcp://[fe80::1%eth0]:5", ("tcp", "fe80::1%eth0", 5)),
    ("tcp://::1", ("tcp", "::1", None)),
    ("tcp://10.0.0.1", ("tcp", "10.0.0.1", None)),
    ("ucx://10.0.0.1:13337", ("ucx", "10.0.0.1", 13337)),
])
def test_parse_address(address, expected):
    assert d.parse_address(address) == expected


@pytest.mark.parametrize("address", ["tcp://", "tcp://:80", "tcp://h:0", "tcp://h:70000"])
def test_parse_address_rejects(address):
    with pytest.raises(ValueError):
        d.parse_address(address)


def test_networks_from_psutil_like_data():
    snic = namedtuple("snic", "family address netmask broadcast ptp")
    data = {
        "lo": [snic(socket.AF_INET, "127.0.0.1", "255.0.0.0", None, None)],
        "ib0": [snic(socket.AF_INET, "10.1.2.3", "255.255.252.0", None, None),
                snic(socket.AF_INET6, "fe80::1", "ffff:ffff:ffff:ffff::", None, None)],
        "eth9": [snic(socket.AF_INET6, "fe80::2", None, None, None)],
        "tun0": [snic(socket.AF_INET, "10.9.9.9", None, None, None)],
    }
    assert d.networks_from_addrs(data) == {
        "lo": [("127.0.0.1", 8)], "ib0": [("10.1.2.3", 22)], "tun0": [("10.9.9.9", None)]}


def test_local_interfaces_have_prefix_lengths():
    found = d.local_interfaces()
    assert "127.0.0.1/8" in found["lo"]
    for entries in found.values():
        for e in entries:
            ip, _, plen = e.partition("/")
            socket.inet_aton(ip)
            assert not plen or 0 <= int(plen) <= 32


def test_format_interfaces():
    assert d.format_interfaces({"ib0": ["10.0.0.1/24", "10.0.1.1/24"], "eth0": ["1.2.3.4"]}) \
        == "eth0=1.2.3.4 ib0=10.0.0.1/24,10.0.1.1/24"
    assert d.format_interfaces({}) == "no IPv4 interfaces"


# ---------------------------------------------------------------------------- suggestions

def test_suggest_skips_the_failed_interface_loopback_and_shared_docker_address():
    assert d.suggest_interfaces(B, A, exclude=["eth0"]) == [("ib0", "both on 10.213.7.0/24")]
    # without exclusion eth0 shares a network too; ib* first
    assert [n for n, _ in d.suggest_interfaces(B, A)] == ["ib0", "eth0"]


def test_suggest_needs_the_same_name_on_both_hosts_and_the_same_network():
    assert d.suggest_interfaces({"ib1": ["10.213.7.2/24"]}, {"ib0": ["10.213.7.1/24"]}) == []
    assert d.suggest_interfaces({"ib0": ["10.99.0.2/24"]}, {"ib0": ["10.213.7.1/24"]}) == []
    # netmasks decide: a /16 joins what a /24 guess would not
    wide = d.suggest_interfaces({"ib0": ["10.5.1.2/16"]}, {"ib0": ["10.5.2.1/16"]})
    assert wide == [("ib0", "both on 10.5.0.0/16")]


def test_suggest_without_netmasks_guesses_slash_24():
    assert d.suggest_interfaces({"ib0": ["10.213.7.2"]}, {"ib0": ["10.213.7.1"]}) == [
        ("ib0", "both on 10.213.7.0/24 (guessed /24)")]
    assert d.suggest_interfaces({"ib0": ["10.213.6.2"]}, {"ib0": ["10.213.7.1"]}) == []


def test_suggest_prefers_what_answered_and_drops_what_did_not():
    local = {"ib0": ["10.1.0.2/24"], "hsn0": ["10.2.0.2/24"], "eth1": ["10.3.0.2/24"]}
    remote = {"ib0": ["10.1.0.1/24"], "hsn0": ["10.2.0.1/24"], "eth1": ["10.3.0.1/24"]}
    assert [n for n, _ in d.suggest_interfaces(local, remote)] == ["hsn0", "ib0", "eth1"]
    answered = {"10.1.0.1": False, "10.3.0.1": True}
    assert d.suggest_interfaces(local, remote, answered=answered) == [
        ("eth1", "10.3.0.1 answers from here"), ("hsn0", "both on 10.2.0.0/24")]


def test_suggest_loopback_only_on_one_host():
    assert d.suggest_interfaces({"lo": ["127.0.0.1/8"]}, {"lo": ["127.0.0.1/8"]}) == []
    assert d.suggest_interfaces({"lo": ["127.0.0.1/8"]}, {"lo": ["127.0.0.1/8"]},
                                same_host=True) == [("lo", "both on 127.0.0.0/8")]


# ---------------------------------------------------------------------------- the message

def _message(**kw):
    args = dict(host="b", address="tcp://10.213.8.1:4000", error="timed out", seconds=3.02,
                local=B, scheduler_host="a", scheduler_interfaces=A, target_ip="10.213.8.1")
    args.update(kw)
    return d.unreachable_message(**args)


def test_message_names_host_address_interfaces_and_the_fix():
    assert _message() == (
        "host b cannot reach the scheduler at tcp://10.213.8.1:4000 (eth0 of host a): timed out "
        "(tried for 3.0 s); host b has docker0=172.17.0.1/16 eth0=10.213.8.2/24 "
        "ib0=10.213.7.2/24 lo=127.0.0.1/8; the scheduler's host a has docker0=172.17.0.1/16 "
        "eth0=10.213.8.1/24 ib0=10.213.7.1/24 lo=127.0.0.1/8; use --interface ib0 "
        "(both on 10.213.7.0/24)")
    assert "\n" not in _message()


def test_message_with_probe_results_and_alternatives():
    local = dict(B, ib1=["10.5.0.2/24"])
    remote = dict(A, ib1=["10.5.0.1/24"])
    text = _message(local=local, scheduler_interfaces=remote,
                    answered={"10.213.7.1": True, "10.5.0.1": True})
    assert text.endswith("use --interface ib0 (10.213.7.1 answers from here; "
                         "also possible: ib1)"), text


def test_message_when_no_interface_fits_suggests_check():
    text = _message(local={"lo": ["127.0.0.1/8"], "eth0": ["10.213.8.2/24"]},
                    error="no route to host")
    assert ": no route to host (tried" in text
    assert text.endswith("no interface of host b other than eth0 shares a network with host a: "
                         "run the job with --check to see which --interface connects all hosts")


def test_message_without_scheduler_info():
    text = _message(scheduler_host=None, scheduler_interfaces={})
    assert "host b has" in text and text.endswith(
        "the scheduler's host is unknown: run the job with --check to see which --interface "
        "connects all hosts")


def test_message_when_the_address_is_not_on_rank_0s_host():
    # joining a cluster: the scheduler runs elsewhere, rank 0's interfaces prove nothing
    text = _message(address="tcp://10.50.0.9:8786", target_ip="10.50.0.9")
    assert "rank 0's host a (not the scheduler's)" in text and "--interface" not in text


def test_message_for_a_name_that_resolves():
    text = _message(address="tcp://sched-node:8786", target_ip="10.213.8.1")
    assert "at tcp://sched-node:8786 (eth0 of host a)" in text
    text = _message(address="tcp://elsewhere:8786", target_ip="10.77.0.1")
    assert "at tcp://elsewhere:8786 (10.77.0.1)" in text


def test_message_same_host():
    text = _message(host="a", local=A)
    assert text.endswith("the scheduler runs on this very host: a firewall or a closed "
                         "scheduler? run the job with --check to test the interfaces")


def test_same_host_is_decided_by_the_addresses_not_the_name():
    assert d.is_same_host(A, dict(A)) is True
    assert d.is_same_host(B, A) is False  # docker0's shared 172.17.0.1 proves nothing
    assert d.is_same_host({"lo": ["127.0.0.1/8"]}, {"lo": ["127.0.0.1/8"]}) is None
    # the network stacks' identities decide when both are known: two containers can have
    # the very same addresses on separate bridges
    assert d.is_same_host(A, A, local_id="boot/4026531840", remote_id="boot/4026532000") is False
    assert d.is_same_host(A, B, local_id="boot/1", remote_id="boot/1") is True


def test_message_two_hosts_of_the_same_name_still_names_the_interface():
    """Two containers or network namespaces called "node": not "this very host"."""
    text = _message(host="node", scheduler_host="node")
    assert "this very host" not in text, text
    assert "the scheduler's host node (another host of the same name: a container or network " \
           "namespace?) has docker0=172.17.0.1/16 eth0=10.213.8.1/24" in text, text
    assert text.endswith("use --interface ib0 (both on 10.213.7.0/24)"), text


def test_message_same_host_under_another_name():
    # one machine whose name changed (or that two names resolve to): the tables are equal
    text = _message(host="b", local=A, scheduler_host="a")
    assert text.endswith("the scheduler runs on this very host: a firewall or a closed "
                         "scheduler? run the job with --check to test the interfaces"), text


def test_network_identity_is_this_process_s_namespace():
    ident = d.network_identity()
    if ident is None:
        pytest.skip("no /proc/sys/kernel/random/boot_id or /proc/self/ns/net here")
    boot, _, inode = ident.rpartition("/")
    assert len(boot) == 36 and inode == str(os.stat("/proc/self/ns/net").st_ino)
    assert d.network_identity() == ident


def test_worker_with_the_scheduler_s_name_on_another_network_stack(monkeypatch):
    """reachability_problem against a namesake host (recorded tables, probes answered
    from a recording): the other addresses are probed and the one that answers named."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: the address that refuses
    port = closed.getsockname()[1]
    local = {"lo": ["127.0.0.1/8"], "eth0": ["10.213.8.2/24"], "ib0": ["10.213.7.2/24"]}
    remote = {"lo": ["127.0.0.1/8"], "eth0": ["127.0.0.1/8"], "ib0": ["10.213.7.1/24"]}
    monkeypatch.setattr(d, "local_interfaces", lambda: local)
    monkeypatch.setattr(d, "_hostname", lambda: "node")
    probed = []

    def probe(ips, p, timeout, ctx=None):
        probed.append((ips, p))
        return {"10.213.7.1": True}

    monkeypatch.setattr(d, "_probe", probe)
    try:
        text = d.reachability_problem(f"tcp://127.0.0.1:{port}", 0.5,
                                      {"host": "node", "interfaces": remote})
    finally:
        closed.close()
    assert probed == [(["10.213.7.1"], port)], probed
    assert f"host node cannot reach the scheduler at tcp://127.0.0.1:{port} (eth0/lo of host " \
           "node): connection refused" in text, text
    assert "this very host" not in text and "(another host of the same name" in text, text
    assert text.endswith("use --interface ib0 (10.213.7.1 answers from here)"), text


# ---------------------------------------------------------------------------- connecting

def _listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


def test_reachable_address_returns_none_at_once():
    s = _listener()
    try:
        t0 = time.monotonic()
        assert d.reachability_problem(f"tcp://127.0.0.1:{s.getsockname()[1]}", 30, {}) is None
        assert time.monotonic() - t0 < 0.5
    finally:
        s.close()


def test_waits_for_a_scheduler_that_is_still_starting():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    timer = threading.Timer(0.6, s.listen, args=(8,))
    timer.start()
    try:
        t0 = time.monotonic()
        assert d.reachability_problem(f"tcp://127.0.0.1:{port}", 10, {}) is None
        assert 0.5 < time.monotonic() - t0 < 3
    finally:
        timer.join()
        s.close()


def test_unreachable_address_is_reported_within_the_bound():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))  # bound, never listening: refused
    port = s.getsockname()[1]
    info = {"host": "sched-host", "interfaces": {"lo": ["127.0.0.1/8"]}}
    try:
        t0 = time.monotonic()
        text = d.reachability_problem(f"tcp://127.0.0.1:{port}", 1.0, info)
        elapsed = time.monotonic() - t0
    finally:
        s.close()
    assert 0.9 < elapsed < 3, elapsed
    assert text.startswith(f"host {socket.gethostname()} cannot reach the scheduler at "
                           f"tcp://127.0.0.1:{port}"), text
    assert "connection refused" in text and "\n" not in text


@pytest.mark.parametrize("address", ["inproc://10.0.0.1/123/1", "ucx://10.0.0.1:1", "nonsense"])
def test_other_protocols_are_not_judged(address):
    assert d.reachability_problem(address, 0.5, {}) is None


def test_unknown_name():
    text = d.reachability_problem("tcp://no-such-host.invalid:8786", 1, {})
    assert "cannot resolve the name" in text


def test_error_texts():
    import errno

    assert d._error_text(socket.timeout()) == "timed out"
    assert d._error_text(OSError(errno.ECONNREFUSED, "x")) == "connection refused"
    assert d._error_text(OSError(errno.EHOSTUNREACH, "x")) == "no route to host"
    assert d._error_text(OSError(errno.ENETUNREACH, "x")) == "network unreachable"


# ---------------------------------------------------------------------------- --check

TWO = {"a": [0, 1], "b": [2, 3]}
LISTENERS = {"a": {"lo": "127.0.0.1", "eth0": "10.213.8.1", "ib0": "10.213.7.1"},
             "b": {"lo": "127.0.0.1", "eth0": "10.213.8.2", "ib0": "10.213.7.2"}}


def _results(ok_ifaces, hosts=TWO, ifaces=("eth0", "ib0")):
    rows = []
    for src, ranks in hosts.items():
        for _ in ranks:
            for dst in hosts:
                if dst != src or len(hosts) == 1:
                    for i in ifaces:
                        rows.append((src, i, dst, None if i in ok_ifaces else "timed out"))
    return rows


def test_check_report_two_hosts_ib0_works():
    lines, best, last = d.check_report(TWO, LISTENERS, _results({"ib0"}))
    assert best == "ib0" and last == "dask-mpi-launch: use --interface ib0"
    assert lines[0] == "dask-mpi-launch: check of 4 ranks on 2 hosts: a (ranks 0-1), b (ranks 2-3)"
    table = [ln.split() for ln in lines[2:]]
    assert table[0] == ["ib0", "2/2", "hosts", "ok", "a=10.213.7.1", "b=10.213.7.2"]
    assert table[1][:3] == ["eth0", "1/2", "hosts"] and "ok" not in table[1]
    assert "a->b timed out; b->a timed out" in lines[3]
    assert table[2][:2] == ["lo", "-"]


def test_check_report_nothing_works():
    lines, best, last = d.check_report(TWO, LISTENERS, _results(set()))
    assert best is None
    assert last == ("dask-mpi-launch: error: no interface connects all hosts (eth0: 1/2 hosts; "
                    "ib0: 1/2 hosts): check routes and firewalls between the hosts")


def test_check_report_prefers_fabric_then_name():
    lines, best, _ = d.check_report(TWO, LISTENERS, _results({"eth0", "ib0"}))
    assert best == "ib0"
    assert [ln.split()[3] for ln in lines[2:4]] == ["ok", "ok"]


def test_check_report_one_host_tests_loopback():
    one = {"n1": [0, 1]}
    listeners = {"n1": {"lo": "127.0.0.1", "eth0": "192.0.2.2"}}
    lines, best, last = d.check_report(one, listeners, _results({"lo", "eth0"}, one, ("lo", "eth0")))
    assert best == "eth0"  # non-loopback first: the job may grow beyond one host
    assert lines[0].endswith("2 ranks on 1 host: n1 (ranks 0-1)")
    assert [ln.split()[:4] for ln in lines[2:]] == [["eth0", "1/1", "host", "ok"],
                                                    ["lo", "1/1", "host", "ok"]]
    _, best, _ = d.check_report(one, listeners, _results({"lo"}, one, ("lo", "eth0")))
    assert best == "lo"


def test_check_report_one_bad_host_among_many():
    hosts = {f"n{i}": [i] for i in range(10)}
    listeners = {h: {"ib0": f"10.0.0.{i}"} for i, h in enumerate(hosts)}
    listeners["n7"] = {}  # n7 has no ib0
    results = [(s, "ib0", t, None) for s in hosts for t in hosts if s != t and "n7" not in (s, t)]
    lines, best, last = d.check_report(hosts, listeners, results)
    assert best is None
    assert lines[2].split()[:3] == ["ib0", "9/10", "hosts"]
    assert "n7 has no ib0" in lines[2]
    assert "n0 (ranks 0), n1 (ranks 1), n2 (ranks 2), n3 (ranks 3), ... (6 more)" in lines[0]
    assert last.startswith("dask-mpi-launch: error: no interface connects all hosts (ib0: 9/10")


def test_check_report_listener_errors_and_missing_ranks():
    listeners = {"a": dict(LISTENERS["a"]), "b": dict(LISTENERS["b"])}
    listeners["b"]["ib0"] = "cannot listen on 10.213.7.2: address not available"
    lines, best, _ = d.check_report(TWO, listeners, _results({"ib0", "eth0"}))
    assert best == "eth0"
    assert "b: cannot listen on 10.213.7.2" in "\n".join(lines)
    lines, best, last = d.check_report(TWO, LISTENERS, _results({"ib0"}), missing=[3])
    assert best is None and "  no report from rank 3 (they did not take part in time)" in lines
    assert last.endswith("ranks missing")


def test_connected_group_is_greedy_and_keeps_earlier_hosts():
    hosts = ["a", "b", "c", "d"]
    assert d._connected_group(hosts, set()) == hosts
    assert d._connected_group(hosts, {("a", "b"), ("b", "a")}) == ["a", "c", "d"]
    assert d._connected_group(hosts, {("c", "a"), ("c", "b"), ("d", "c")}) == ["a", "b", "d"]


def test_ranges():
    assert d._ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert d._ranges([]) == ""


def test_targets_one_tester_per_host_one_listener_per_other_host_without_loopback():
    hellos = {0: ("a", {"lo": ("127.0.0.1", 1), "ib0": ("10.0.0.1", 2)}),
              1: ("a", {"lo": ("127.0.0.1", 3), "ib0": ("10.0.0.1", 4)}),
              2: ("b", {"lo": ("127.0.0.1", 5), "ib0": ("10.0.0.2", 6), "eth0": "cannot"}),
              3: ("b", {"lo": ("127.0.0.1", 7), "ib0": ("10.0.0.2", 8)}),
              4: ("c", {"ib0": ("10.0.0.3", 9)}),
              5: ("c", {"ib0": ("10.0.0.3", 10)})}
    assert d._targets(0, "a", hellos) == [("ib0", "b", ("10.0.0.2", 6)),
                                          ("ib0", "c", ("10.0.0.3", 9))]
    assert d._targets(1, "a", hellos) == []
    assert d._targets(3, "b", hellos) == []
    # host b (the second) tests the second rank of each other host
    assert d._targets(2, "b", hellos) == [("ib0", "a", ("10.0.0.1", 4)),
                                          ("ib0", "c", ("10.0.0.3", 10))]
    one = {0: ("a", {"lo": ("127.0.0.1", 1)}), 1: ("a", {"lo": ("127.0.0.1", 3)})}
    assert d._targets(0, "a", one) == [("lo", "a", ("127.0.0.1", 3))]
    assert d._targets(1, "a", one) == []
    assert d._targets(0, "a", {0: one[0]}) == [("lo", "a", ("127.0.0.1", 1))]


def test_tls_scheduler_gets_a_handshake_not_a_warning(caplog):
    pytest.importorskip("cryptography")
    import asyncio
    import logging

    from distributed import Scheduler
    from distributed.security import Security

    async def main():
        sec = Security.temporary()
        async with Scheduler(security=sec, protocol="tls", interface="lo", dashboard=False,
                                   dashboard_address="127.0.0.1:0") as s:
            loop = asyncio.get_running_loop()
            found = await loop.run_in_executor(
                None, lambda: d.reachability_problem(s.address, 5, {}, security=sec))
            await asyncio.sleep(0.2)  # let the listener log what it thinks of us
            return found

    with caplog.at_level(logging.WARNING, logger="distributed"):
        assert asyncio.run(main()) is None
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_tls_without_settings_is_left_to_dask():
    t0 = time.monotonic()
    assert d.reachability_problem("tls://127.0.0.1:1", 5, {}) is None
    assert time.monotonic() - t0 < 2


# ---------------------------------------------------------------------------- run_check
# ranks as threads over an in-memory control plane; "hosts" and interfaces per thread

class _Hub:
    def __init__(self, size):
        self.size = size
        self.boxes = [[] for _ in range(size)]
        self.cond = threading.Condition()
        self.values = {}


class _FakeControl:
    def __init__(self, hub, rank):
        self.hub, self.rank, self.size = hub, rank, hub.size
        self.finalized = False

    def send(self, dest, *message):
        with self.hub.cond:
            self.hub.boxes[dest].append(message)

    def broadcast(self, *message):
        for dest in range(self.size):
            if dest != self.rank:
                self.send(dest, *message)

    def poll(self):
        with self.hub.cond:
            out, self.hub.boxes[self.rank] = self.hub.boxes[self.rank], []
        return out

    def allreduce_max(self, value, timeout, poll=None):
        with self.hub.cond:
            self.hub.values[self.rank] = value
            self.hub.cond.notify_all()
            if not self.hub.cond.wait_for(lambda: len(self.hub.values) == self.size, timeout):
                return None
            return max(self.hub.values.values())

    def finish(self):
        pass

    def finalize(self):
        self.finalized = True

    def abort(self, status):
        raise AssertionError(f"abort({status})")


class _Settings:
    connect_timeout = 5.0


def _run_ranks(monkeypatch, hosts_of_rank, networks_of_host, make_controls=None):
    """run_check on len(hosts_of_rank) threads; {rank: status}, controls."""
    by_thread = {}
    monkeypatch.setattr(d, "_hostname", lambda: hosts_of_rank[by_thread[threading.get_ident()]])
    monkeypatch.setattr(d, "local_networks",
                        lambda: networks_of_host[hosts_of_rank[by_thread[threading.get_ident()]]])
    hub = _Hub(len(hosts_of_rank))
    if make_controls is None:
        controls = [_FakeControl(hub, r) for r in range(hub.size)]
    else:
        controls = make_controls(hub.size)
    statuses = {}

    def rank_main(r):
        by_thread[threading.get_ident()] = r
        statuses[r] = d.run_check(controls[r], _Settings())

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(hub.size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return statuses, controls


def _external_ip():
    for name, found in d.local_networks().items():
        for ip, _ in found:
            if not ip.startswith("127."):
                return ip
    pytest.skip("no non-loopback IPv4 address on this machine")


def test_run_check_two_hosts(monkeypatch, capsys):
    # two "hosts" share this machine's real address as "ib0"; their "eth0" addresses are
    # not on this machine (cannot listen); "lo" is not tested across hosts
    ip = _external_ip()
    nets = {"a": {"lo": [("127.0.0.1", 8)], "ib0": [(ip, 24)], "eth0": [("192.0.2.250", 24)]},
            "b": {"lo": [("127.0.0.1", 8)], "ib0": [(ip, 24)], "eth0": [("192.0.2.251", 24)]}}
    t0 = time.monotonic()
    statuses, controls = _run_ranks(monkeypatch, ["a", "a", "b", "b"], nets)
    out, err = capsys.readouterr()
    assert statuses == {0: 0, 1: 0, 2: 0, 3: 0}, out + err
    assert all(c.finalized for c in controls)
    assert out.splitlines()[-1] == "dask-mpi-launch: use --interface ib0", out
    assert f"ib0        2/2 hosts    ok  a={ip} b={ip}" in out, out
    assert "a: cannot listen on 192.0.2.250" in out, out
    assert "lo         -" in out, out
    assert err == ""
    assert time.monotonic() - t0 < 10


def test_run_check_same_failing_status_everywhere(monkeypatch, capsys):
    nets = {"a": {"ib0": [(_external_ip(), 24)]}, "b": {"ib0": [("192.0.2.251", 24)]}}
    statuses, controls = _run_ranks(monkeypatch, ["a", "b", "b"], nets)
    out, err = capsys.readouterr()
    assert statuses == {0: 1, 1: 1, 2: 1}, out + err
    assert all(c.finalized for c in controls)
    assert err.strip().splitlines() == [
        "dask-mpi-launch: error: no interface connects all hosts (ib0: 1/2 hosts): check routes "
        "and firewalls between the hosts"], err


def test_check_report_scales_to_hundreds_of_hosts():
    hosts = {f"n{i:03d}": [2 * i, 2 * i + 1] for i in range(200)}
    listeners = {h: {"ib0": f"10.0.{i // 250}.{i % 250}", "eth0": f"10.9.{i // 250}.{i % 250}"}
                 for i, h in enumerate(hosts)}
    results = [(s, i, t, None if i == "ib0" else "timed out")
               for s in hosts for t in hosts if s != t for i in ("ib0", "eth0")]
    d._interface.cache_clear()
    lines, best, last = d.check_report(hosts, listeners, results)
    # each address parsed once (not once per pair: 80,000 parses took 1-2 s, 10+ loaded)
    assert d._interface.cache_info().misses <= 2 * len(hosts)
    assert best == "ib0"
    assert lines[3].split()[:3] == ["eth0", "1/200", "hosts"]
    assert "; ... (" in lines[3] and len(lines[3]) < 300


def test_check_tells_apart_hosts_that_share_a_name():
    ib = {"lo": ("127.0.0.1", 1), "ib0": ("10.0.0.1", 2)}
    ib2 = {"lo": ("127.0.0.1", 1), "ib0": ("10.0.0.2", 2)}
    hellos = {0: ("node", ib, "boot/1"), 1: ("node", ib, "boot/1"), 2: ("node", ib2, "boot/2"),
              3: ("login", ib2, None)}
    assert d.host_labels(hellos) == {0: ("node#1", ib), 1: ("node#1", ib), 2: ("node#2", ib2),
                                     3: ("login", ib2)}
    # without identities: the addresses the ranks listen on
    hellos = {r: (h, t) for r, (h, t, _) in hellos.items()}
    assert [h for h, _ in d.host_labels(hellos).values()] == ["node#1", "node#1", "node#2",
                                                              "login"]
    same = {0: ("n1", ib, "x"), 1: ("n1", ib2, "x")}  # one stack: one host
    assert [h for h, _ in d.host_labels(same).values()] == ["n1", "n1"]


def test_run_check_over_the_file_control_plane(monkeypatch, capsys, tmp_path):
    # --bootstrap slurm's control plane (files in a shared directory) has the same API
    from dask_mpi_launch.control.over_files import FileControl

    ip = _external_ip()
    nets = {"n1": {"lo": [("127.0.0.1", 8)], "eth0": [(ip, 24)]}}
    statuses, _ = _run_ranks(monkeypatch, ["n1"] * 3, nets,
                             lambda n: [FileControl(str(tmp_path / "x"), r, n) for r in range(n)])
    out, err = capsys.readouterr()
    assert statuses == {0: 0, 1: 0, 2: 0}, out + err
    assert out.splitlines()[-1] == "dask-mpi-launch: use --interface eth0", out
    assert not (tmp_path / "x").exists()  # removed by rank 0's finalize
