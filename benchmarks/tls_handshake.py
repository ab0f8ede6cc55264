#!/usr/bin/env python3
"""CPU of one TLS handshake with a job's credentials: distributed's ``Security`` against
ours (:class:`dask_mpi_launch.security.tls.JobSecurity`: the listener issues no session tickets).

Both ends run in this process over memory BIOs (no sockets, no event loop): only OpenSSL's
work and the ``ssl`` module's calls are timed, with ``time.thread_time`` per side, the two
variants interleaved in rounds; medians of the rounds. The server's side is what the
scheduler pays twice per registering worker (its registration stream and its heartbeats).

    python benchmarks/tls_handshake.py [--rounds 7] [--per-round 200]
"""
from __future__ import annotations

import argparse
import os
import ssl
import statistics
import sys


def handshake(server_ctx, client_ctx):
    """(server CPU s, client CPU s, whether the client got a session ticket)."""
    import time

    sin, sout, cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(sin, sout, server_side=True)
    client = client_ctx.wrap_bio(cin, cout, server_side=False)
    cpu = [0.0, 0.0]
    done = [False, False]
    for _ in range(20):
        for i, (side, out, peer_in) in enumerate(((client, cout, sin), (server, sout, cin))):
            if not done[i]:
                t = time.thread_time()
                try:
                    side.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
                cpu[i] += time.thread_time() - t
            data = out.read()
            if data:
                peer_in.write(data)
        if all(done):
            break
    else:
        raise RuntimeError("handshake did not finish")
    # what the server sent after the handshake (TLS 1.3 session tickets) reaches the client
    t = time.thread_time()
    try:
        client.read(1)
    except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
        pass
    cpu[0] += time.thread_time() - t
    return cpu[1], cpu[0], client.session is not None and client.session.has_ticket


def contexts(security):
    return (security.get_listen_args("scheduler")["ssl_context"],
            security.get_connection_args("worker")["ssl_context"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--per-round", type=int, default=200)
    args = ap.parse_args(argv)
    from distributed.security import Security

    # the launcher's own job credentials and its Security (JobSecurity: no session tickets),
    # against distributed's Security with the same files: what this benchmark compares
    from dask_mpi_launch.security.credentials import new_credentials, security_from
    from dask_mpi_launch.security.tls import JobSecurity

    cred = new_credentials()
    ours = security_from(cred)
    assert isinstance(ours, JobSecurity)
    theirs = Security(**{k: getattr(ours, k) for k in (
        "require_encryption", "tls_ca_file", "tls_client_cert", "tls_client_key",
        "tls_scheduler_cert", "tls_scheduler_key", "tls_worker_cert", "tls_worker_key")})
    variants = {"distributed.Security": contexts(theirs), "ours (no tickets)": contexts(ours)}
    per = {name: {"server": [], "client": [], "ticket": None} for name in variants}
    for _ in range(args.rounds):
        for name, (sctx, cctx) in variants.items():
            runs = [handshake(sctx, cctx) for _ in range(args.per_round)]
            per[name]["server"].append(statistics.median(r[0] for r in runs))
            per[name]["client"].append(statistics.median(r[1] for r in runs))
            per[name]["ticket"] = runs[-1][2]
    print(f"# TLS handshake CPU ({ssl.OPENSSL_VERSION}; load {os.getloadavg()[0]:.2f}; "
          f"{args.rounds} rounds x {args.per_round}, medians)")
    print("| variant | server ms | client ms | session ticket sent |")
    print("|---|---:|---:|---|")
    for name, r in per.items():
        print(f"| {name} | {statistics.median(r['server']) * 1e3:.3f} | "
              f"{statistics.median(r['client']) * 1e3:.3f} | {'yes' if r['ticket'] else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
