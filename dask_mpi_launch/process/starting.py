"""What each role process is started with: its spec (a ``RoleSpec`` record of
``base/messages.py``, picklable: the zygote that forks it may be another process), from
the settings and what the rank knows of the cluster. The supervisor decides when; this
decides what."""
from __future__ import annotations

import os

from dask_mpi_launch.base.layout import CLIENT, SCHEDULER, WORKER
from dask_mpi_launch.base.messages import Address, ClientSpec, SchedulerSpec, WorkerSpec
from dask_mpi_launch.base.status import say
from dask_mpi_launch.process.children import BecomeClient
from dask_mpi_launch.hpc.launchers import local_size


def start_scheduler(sup) -> None:
    """The scheduler. With TLS it makes this job's credentials itself (where ``distributed``
    is imported: the rank never imports ``cryptography``) and reports them to this rank
    with its address, through its private pipe."""
    s = sup.settings
    if s.scheduler_file:  # never leave an ended job's file to be read (a live one's: refused)
        from dask_mpi_launch.security.scheduler_file import remove_stale

        remove_stale(s.scheduler_file)
    sup.children.start(SCHEDULER, "scheduler", SchedulerSpec(new_credentials=bool(s.tls)))


def announce(sup, address, identity, dashboard, name_prefix=None, network=None) -> None:
    """The scheduler's rank knows the address: tell every rank, with what helps them
    connect (or explain why they cannot). ``network``: this host's interfaces and
    network identity as the scheduler found them (it has psutil imported), else
    found here."""
    if network is None:
        from dask_mpi_launch.roles import diagnose

        network = (diagnose.local_interfaces(), diagnose.network_identity())
    info = {"address": address, "identity": identity, "dashboard": dashboard,
            "name_prefix": name_prefix or sup.settings.name,
            "host": sup.host, "interfaces": network[0],
            "network": network[1], "credentials": sup.credentials}
    if sup.settings.scheduler and not sup.settings.tls:
        say(f"warning: TLS is off: anyone who can reach {address} can run code as you "
            "on this cluster (drop --no-tls / --protocol tcp to secure it)")
    sup.cluster.update(info)
    sup.control.broadcast(*Address(info))


def start_workers(sup) -> None:
    """This rank's worker processes, named after the rank (RANK or RANK-I)."""
    s = sup.settings
    sup.started.add("workers")
    nthreads, memory_limit = worker_resources(s)
    for i in range(s.worker_processes):
        name = s.worker_name(sup.rank, i, sup.cluster.get("name_prefix"))
        sup.children.start(WORKER, f"worker {name}", WorkerSpec(
            address=sup.address, name=name, nthreads=nthreads, memory_limit=memory_limit,
            credentials=sup.cluster.get("credentials"),
            scheduler_info={k: v for k, v in sup.cluster.items()
                            if k in ("address", "host", "interfaces", "network")},
        ))


def worker_resources(settings):
    """Threads and memory per worker process: the options, else the batch job's share."""
    import resource
    import socket

    from dask_mpi_launch.hpc.resources import detect_resources

    s = settings
    pe_hostfile = None
    if os.environ.get("PE_HOSTFILE"):  # Grid Engine: this host's slots
        try:
            with open(os.environ["PE_HOSTFILE"]) as f:
                pe_hostfile = f.read()
        except OSError:
            pass
    found = detect_resources(os.environ, local_ranks=local_size(),
                             cpu_count=os.cpu_count() or 1,
                             total_memory=_total_memory(),
                             worker_processes=s.worker_processes,
                             pe_hostfile=pe_hostfile, hostname=socket.gethostname(),
                             # Grid Engine's h_vmem is the job's address-space limit
                             address_space_limit=max(resource.getrlimit(resource.RLIMIT_AS)[0],
                                                     0))
    nthreads = s.nthreads or found.nthreads
    memory_limit = s.memory_limit
    if memory_limit == "auto" and found.memory_limit:
        memory_limit = found.memory_limit
    return nthreads, memory_limit


def _total_memory() -> int:
    """The host's memory in bytes, as psutil.virtual_memory().total (without importing
    psutil in the rank)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        import psutil

        return psutil.virtual_memory().total


def start_client(sup) -> None:
    """The client: the script (or module), JupyterLab, or initialize()'s caller; its stdin
    is the job's, relayed from rank 0."""
    s = sup.settings
    sup.started.add("client")
    credentials = sup.cluster.get("credentials")
    stdin = sup.stdin_relay.take_read_end() if sup.stdin_relay else None
    if sup.client_in_process:
        if stdin is not None:  # the script is this process: the relay is its stdin
            os.dup2(stdin, 0)
            os.close(stdin)
        raise BecomeClient(sup.address, credentials)
    if s.in_process:
        sup.children.start(CLIENT, "script", ClientSpec(kind="initialize", address=sup.address,
                                                        credentials=credentials),
                           stdin=stdin, returns=True)
    elif s.jupyter:
        info = {k: v for k, v in sup.cluster.items() if k in ("address", "dashboard")}
        sup.children.start(CLIENT, "jupyter", ClientSpec(kind="jupyter", address=sup.address,
                                                         credentials=credentials,
                                                         scheduler_info=info))
    else:
        sup.children.start(CLIENT, "script", ClientSpec(kind="script", address=sup.address,
                                                        credentials=credentials), stdin=stdin)

