"""``dask-mpi-launch``: every rank is a thin MPI process; its options are parsed, and its
roles forked, by the zygote (``configure/command_line.py``, ``process/zygote.py``, ``process/node_zygote.py``).

The rank imports the standard library, mpi4py and the small modules of this package that
supervise: no ``click``, no ``dask``, no ``distributed``. On a node of 16 ranks the heavy
imports happen once, in the node's zygote, instead of 16 times. What the user sees is
unchanged: the same help, the same one-line errors printed once, the same exit statuses.
"""
from __future__ import annotations

import os
import sys

from dask_mpi_launch.base.errors import LaunchError


def __getattr__(name):
    if name == "command":  # the click command (docs, tests) lives where click is imported
        from dask_mpi_launch.configure import command_line

        command_line.run_in_process = _run_in_process
        return command_line.command
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _run_in_process(settings, check: bool = False) -> int:
    """The command invoked in-process (click's CliRunner) runs the job here: ``run`` is
    looked up at each call, so that a test may replace it."""
    return run(settings, check=check)


def run(settings, check: bool = False, launcher=None) -> int:
    """Run this rank's part of the job described by ``settings``; return the exit status.

    The rank forks its zygote first (role processes never hold MPI; ``distributed`` is
    imported there while MPI starts here), then joins the control plane. ``launcher``: the
    zygote that parsed the command line (``main``), else one is started here."""
    if check:
        from dask_mpi_launch.roles import diagnose

        if launcher is not None:
            launcher.close()
        control = _bootstrap(settings)
        return diagnose.run_check(getattr(control, "comm", control), settings)
    from dask_mpi_launch.process.supervisor import Supervisor

    if launcher is None:
        launcher = _zygote(settings)
    from dask_mpi_launch.process.children import set_title

    set_title("dml-rank")
    try:
        control = _bootstrap(settings)
    except BaseException:
        launcher.close()
        raise
    if settings.protocol == "mpi":  # workers in the ranks, their data over MPI
        from dask_mpi_launch.process.in_rank import InRankLauncher

        launcher = InRankLauncher(launcher, control.comm.Dup())
    return Supervisor(settings, control, launcher).run()


def _zygote(settings=None, argv=()):
    """The process that forks this rank's roles: the node's shared one where the launcher
    says which ranks share the host, else one of the rank's own. Before the settings are
    known (``main``), ``--no-share-imports`` on the command line already says which."""
    from dask_mpi_launch.hpc.launchers import local_rank
    from dask_mpi_launch.process import node_zygote, zygote

    share = settings.share_imports if settings is not None else (
        "--no-share-imports" not in argv)
    local = local_rank() if share else None
    if local is not None and local[1] > 1:
        launcher = node_zygote.start(local, parse=settings is None)
        if launcher is not None:
            return launcher
    return zygote.start(parse=settings is None)


def _bootstrap(settings):
    """The control plane between ranks: MPI, or files and Slurm's variables."""
    from dask_mpi_launch.hpc import load_mpi

    if settings.bootstrap == "slurm":
        from dask_mpi_launch.control.over_files import from_slurm

        return from_slurm(settings.bootstrap_dir)
    try:
        MPI = load_mpi.load()
        load_mpi.check_world(MPI.COMM_WORLD)
    except LaunchError:
        if settings.bootstrap != "auto" or "SLURM_PROCID" not in os.environ:
            raise
        _finalize_if_alone()
        from dask_mpi_launch.control.over_files import from_slurm

        return from_slurm(settings.bootstrap_dir)
    from dask_mpi_launch.control.over_mpi import Control

    return Control(MPI.COMM_WORLD)


def _parse(argv):
    """The zygote parses this rank's command line: (launcher or None, settings, check) to
    run, or (None, None, status) once it printed what the user must see."""
    launcher = _zygote(argv=argv)
    try:
        launcher.ask_parse(argv)
        _meanwhile(argv)
        parsed = launcher.parsed()
    except LaunchError as e:
        launcher.close(abandon=True)
        raise _usage_error_of(e) from None
    except BaseException:
        launcher.close(abandon=True)
        raise
    if parsed[0] == "status":
        launcher.close(abandon=True)
        return None, None, parsed[1]
    settings, check = parsed[1], parsed[2]
    from dask_mpi_launch.process.node_zygote import NodeLauncher

    if check or (isinstance(launcher, NodeLauncher) and not settings.share_imports):
        launcher.close(abandon=True)  # --check starts no roles; a config said one per rank
        launcher = None
    return launcher, settings, check


def _usage_error_of(e: LaunchError) -> LaunchError:
    """The zygote reports a failure to import the parser as text ("cannot import click
    and dask: ConfigFileError: ..."): a malformed dask config file is bad input (status 2,
    its own line), not a broken installation."""
    from dask_mpi_launch.base.errors import ConfigFileError

    marker = f"{ConfigFileError.__name__}: "
    if marker in e.message:
        return ConfigFileError(e.message.split(marker, 1)[1])
    if "A dask config file at " in e.message:  # refresh()ed in the parsing process
        text = e.message[e.message.index("A dask config file at "):]
        return ConfigFileError.from_dask(ValueError(text)) or e
    return e


def _meanwhile(argv) -> None:
    """While the zygote parses: import what the rank runs with, and load (not initialize)
    the MPI library. MPICH's MPI_Init busy-waits for the node's other ranks, so ranks should
    reach it together, right after their settings arrive (on 2 cores, 16 ranks arriving
    over 0.75 s burnt up to 0.34 s of CPU each). Not when the options may say that this job
    runs without MPI (--bootstrap), nor where mpi4py or its library is missing (the error
    is reported where MPI is needed)."""
    from dask_mpi_launch.process import supervisor  # noqa: F401

    if any(a == "--bootstrap" or a.startswith("--bootstrap=") for a in argv) or (
            "DASK_MPI_LAUNCH__BOOTSTRAP" in os.environ) or "mpi4py.MPI" in sys.modules:
        return
    try:
        import mpi4py

        mpi4py.rc.initialize = False  # load_mpi.load() initializes it
        mpi4py.rc.finalize = False
        from mpi4py import MPI  # noqa: F401
    except Exception:
        sys.modules.pop("mpi4py.MPI", None)


def main(argv=None) -> None:
    """Console entry point: one clear line per error, printed by one rank only."""
    from dask_mpi_launch.hpc import load_mpi

    argv = sys.argv[1:] if argv is None else list(argv)
    early = True  # an error now is said by rank 0 alone, before the ranks can talk
    try:
        launcher, settings, extra = _parse(argv)  # extra: --check, or the exit status
        early = settings is None
        status = extra if settings is None else run(settings, check=extra, launcher=launcher)
    except (KeyboardInterrupt, EOFError):  # as click's Abort did
        print(file=sys.stderr)
        status = 130
    except LaunchError as e:
        load_mpi.say_once(e.message)
        status = e.status
        early = True
        _finalize_if_alone()
    status = status if isinstance(status, int) else 0
    if early:
        load_mpi.linger(status)
    MPI = sys.modules.get("mpi4py.MPI")
    if MPI is not None and MPI.Is_finalized():
        from dask_mpi_launch.process.children import exit_rank

        exit_rank(status)
    sys.exit(status)


def _finalize_if_alone() -> None:
    """Finalize a one-rank MPI world, so the launcher keeps our exit status."""
    MPI = sys.modules.get("mpi4py.MPI")
    if MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized():
        if MPI.COMM_WORLD.Get_size() == 1:
            MPI.Finalize()
