"""The job's ``distributed.Security``: distributed's, with the servers' TLS session tickets
off and each TLS context made once per process.

- A TLS 1.3 server sends two session tickets after every handshake, for a client that would
  resume the session later. distributed never resumes one (each connection makes a full
  handshake), so the tickets are pure cost, and a large one on the scheduler: every worker
  that registers makes two handshakes with it (its registration stream, its heartbeats).
  Measured with this job's credentials (P-256, OpenSSL 3.0): the server's side of a
  handshake takes 0.93 ms of CPU with the tickets, 0.51 ms without
  (``benchmarks/tls_handshake.py``).
- distributed builds a new ``ssl.SSLContext`` at every ``get_connection_args`` /
  ``get_listen_args`` call, writing the in-memory certificate and key to a temporary
  directory to load them: about 4 ms each. The contexts are the same for the same
  credentials, so they are kept (per process) and reused.

Imported by the roles only (it imports distributed); :func:`security.security_from` builds it.
"""
from __future__ import annotations

import ssl

from distributed.security import Security

_contexts: dict[tuple, ssl.SSLContext] = {}


class JobSecurity(Security):
    """``Security`` whose listeners (scheduler, workers) issue no session tickets, and whose
    TLS contexts are made once per process."""

    def _get_tls_context(self, tls, purpose):
        key = (purpose, tls.get("ca_file"), tls.get("cert"), tls.get("key"),
               tls.get("ciphers"), self.tls_min_version, self.tls_max_version)
        ctx = _contexts.get(key)
        if ctx is None:
            ctx = super()._get_tls_context(tls, purpose)
            if ctx is None:
                return None
            if purpose == ssl.Purpose.CLIENT_AUTH:  # a listener's context
                ctx.num_tickets = 0
            _contexts[key] = ctx
        return ctx
