"""TLS by default: throw-away credentials for one job, passed between ranks in memory.

The scheduler's process makes a key and a self-signed certificate for this job only
(distributed's ``Security.temporary()``, with ``cryptography``: imported there, never in
the thin ranks) and tells them to its rank with its address, through its private pipe;
the rank sends them to the other ranks over MPI: they never touch the file system, the
command line or the environment. Scheduler, workers and the client script use them;
``Client()`` in the script needs no arguments.

Clients outside the job (a notebook on the login node, a join job) find them beside the
scheduler file, in a directory only the owner can read, removed when the cluster ends
(``security/scheduler_file.py`` writes and reads them; files another user could have written are
refused)::

    from dask_mpi_launch import connect
    client = connect("~/scheduler.json")
"""
from __future__ import annotations

import os
import time


def new_credentials(days: int = 30) -> dict:
    """``{"ca", "cert", "key"}`` PEM texts for one job: an elliptic-curve key (P-256, made
    in well under a millisecond, where RSA takes ~50 ms on the scheduler's critical path) and a
    self-signed certificate that is its own CA, named like ``Security.temporary()``'s."""
    import datetime

    from dask_mpi_launch.base.errors import LaunchError

    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise LaunchError("TLS needs the cryptography package: pip install cryptography "
                          "(or run with --no-tls)") from None
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dask-internal")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("dask-internal")]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return {"ca": cert_pem, "cert": cert_pem, "key": key_pem}


def security_from(credentials: dict | None):
    """A ``distributed.Security`` for every role (None: plain TCP)."""
    if not credentials:
        return None
    from dask_mpi_launch.security.tls import JobSecurity

    ca, cert, key = credentials["ca"], credentials["cert"], credentials["key"]
    return JobSecurity(
        require_encryption=True, tls_ca_file=ca,
        tls_client_cert=cert, tls_client_key=key,
        tls_scheduler_cert=cert, tls_scheduler_key=key,
        tls_worker_cert=cert, tls_worker_key=key,
    )


def client_config(credentials: dict | None) -> dict:
    """dask.config values that make ``Client()`` (and ``Security()``) use the credentials."""
    if not credentials:
        return {}
    return {
        "distributed.comm.require-encryption": True,
        "distributed.comm.tls.ca-file": credentials["ca"],
        "distributed.comm.tls.client.cert": credentials["cert"],
        "distributed.comm.tls.client.key": credentials["key"],
    }


# ---------------------------------------------------------------------------
# beside the scheduler file, for clients outside the job (written and read in security/scheduler_file.py)


def directory_for(scheduler_file: str) -> str:
    return f"{scheduler_file}.credentials"


def connect(scheduler_file: str, timeout: float = 60, **kwargs):
    """A ``distributed.Client`` for the cluster of ``scheduler_file``, with its credentials.

    Waits up to ``timeout`` seconds for the file (the job may still be starting) and says
    clearly when it never appears, unlike ``Client(scheduler_file=...)``. A file or
    credentials directory that is not the user's own (another user's, a symbolic link,
    writable by others) raises ``PermissionError`` at once, saying whose it is: it could
    name another user's cluster, which would then run the caller's code.
    """
    from distributed import Client

    from dask_mpi_launch.security.scheduler_file import read, read_credentials

    path = os.path.expanduser(scheduler_file)
    deadline = time.monotonic() + timeout
    while True:
        identity = read(path, option="scheduler file path")
        if identity is not None:
            address = identity["address"]
            break
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no scheduler file {path} after {timeout:g} s: is the cluster's job "
                "running, and is the path on a file system shared with this machine?"
            )
        time.sleep(0.1)
    credentials = (read_credentials(path, option="scheduler file path")
                   if address.startswith("tls://") else None)
    if address.startswith("tls://") and credentials is None:
        raise PermissionError(
            f"the cluster at {address} uses TLS and its credentials are not readable in "
            f"{directory_for(path)} (only the user who started the job can connect)"
        )
    kwargs.setdefault("security", security_from(credentials))
    kwargs.setdefault("timeout", max(1.0, deadline - time.monotonic()))
    return Client(address, **kwargs)
