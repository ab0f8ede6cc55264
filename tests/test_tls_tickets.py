"""The job's Security (dask_mpi_launch.security.tls.JobSecurity): its listeners send no TLS session
tickets (nobody resumes them; they cost the scheduler half of each handshake), and TLS stays
mutual: a client without the job's certificate is refused. Real OpenSSL handshakes over
memory BIOs, in-process."""
from __future__ import annotations

import ssl
import sys
from pathlib import Path

import pytest

pytest.importorskip("cryptography")
pytest.importorskip("distributed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from tls_handshake import contexts, handshake  # noqa: E402

from dask_mpi_launch.security.credentials import new_credentials, security_from  # noqa: E402


@pytest.fixture(scope="module")
def security():
    return security_from(new_credentials())


def test_listeners_send_no_session_ticket(security):
    from distributed.security import Security

    sctx, cctx = contexts(security)
    server_cpu, client_cpu, ticket = handshake(sctx, cctx)
    assert ticket is False and server_cpu > 0 and client_cpu > 0
    # distributed's own Security with the same files does send them (the test can fail)
    plain = Security(require_encryption=True, tls_ca_file=security.tls_ca_file,
                     tls_scheduler_cert=security.tls_scheduler_cert,
                     tls_scheduler_key=security.tls_scheduler_key,
                     tls_worker_cert=security.tls_worker_cert,
                     tls_worker_key=security.tls_worker_key)
    assert handshake(*contexts(plain))[2] is True


def test_tls_stays_mutual(security):
    sctx, _ = contexts(security)
    stranger = ssl.create_default_context(cadata=security.tls_ca_file)  # trusts, has no cert
    stranger.check_hostname = False
    with pytest.raises(ssl.SSLError):
        handshake(sctx, stranger)


def test_contexts_are_made_once_per_process_and_security_still_pickles(security):
    import pickle

    first = security.get_connection_args("worker")["ssl_context"]
    assert security.get_connection_args("worker")["ssl_context"] is first
    assert security.get_listen_args("worker")["ssl_context"] is not first  # other purpose
    again = pickle.loads(pickle.dumps(security))
    assert again.tls_worker_key == security.tls_worker_key
    assert again.get_connection_args("worker")["ssl_context"] is first
