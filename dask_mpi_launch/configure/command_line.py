"""The command line's options, parsed where ``click`` and ``dask.config`` are already
imported: in the zygote (the rank's own, or the node's), in a process forked for one rank
with that rank's arguments, environment, working directory, standard output and error.

The rank itself stays a thin MPI process (``cli.main``): it sends its argv and gets back
the resolved :class:`~dask_mpi_launch.configure.settings.Settings`, or the exit status of what was
already printed here (``--help``, ``--version``, a bad option: exactly the messages and
statuses the command always gave).
"""
from __future__ import annotations

import os

import click

from dask_mpi_launch import __version__
from dask_mpi_launch.configure import defaults
from dask_mpi_launch.base.errors import LaunchError
from dask_mpi_launch.base.layout import LAYOUTS


def _default(key: str) -> str:
    value = defaults.get(key)
    return "derived from the batch job" if value is None and key == "nthreads" else repr(value)


def _help(text: str, key: str) -> str:
    return f"{text} [default: {_default(key)}, config mpi-launch.{key}]"


def _looks_like_address(text: str) -> bool:
    """dask-mpi's positional SCHEDULER_ADDRESS (``tcp://host:8786``, ``host:8786``)."""
    if "://" in text:
        return True
    host, _, port = text.rpartition(":")
    return bool(host) and port.isdigit() and not os.path.exists(text)


CONTEXT = {
    "help_option_names": ["-h", "--help"],
    "ignore_unknown_options": False,
    "allow_interspersed_args": False,
    "max_content_width": 100,
}


@click.command(context_settings=CONTEXT)
@click.argument("script", required=False, metavar="[SCRIPT]")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[ARGS]...")
@click.option("-m", "module", metavar="MODULE",
              help="Run a module as the client script, like python -m (ARGS go to it).")
@click.option("--layout", type=click.Choice(LAYOUTS), default=None,
              help=_help("Which rank plays which role: dedicated (0 scheduler, 1 script, rest "
                         "workers), compact (0 scheduler+script), full (0 also a worker).", "layout"))
@click.option("--scheduler-rank", default=None, metavar="RANK",
              help="Rank of the scheduler [default: 0]; the client runs on rank 1 (rank 0 "
                   "when the scheduler is on 1) in the dedicated layout, on the scheduler's "
                   "rank in the others.")
@click.option("--exclusive-workers/--inclusive-workers", default=None,
              help="dask-mpi's spelling of the layouts: --inclusive-workers also runs a "
                   "worker on the scheduler's and the script's ranks (--layout full); "
                   "--exclusive-workers does not (dedicated or compact).")
@click.option("--interface", default=None, metavar="NAME",
              help=_help("Network interface of scheduler and workers, e.g. ib0 or lo.", "interface"))
@click.option("--protocol", default=None, metavar="NAME",
              help=_help("Comm protocol: tls, tcp, ucx..., or mpi (workers run in their "
                         "ranks and move data between them over MPI; the scheduler and "
                         "clients keep TLS).", "protocol"))
@click.option("--tls/--no-tls", default=None,
              help=_help("Secure the cluster with TLS credentials made for this job and passed "
                         "between ranks in memory; --no-tls (or --protocol tcp) opts out.",
                         "tls"))
@click.option("--scheduler-port", type=int, default=None,
              help=_help("Scheduler port; 0 picks a free one.", "scheduler-port"))
@click.option("--dashboard/--no-dashboard", default=None,
              help=_help("Serve the scheduler's dashboard (needs bokeh).", "dashboard"))
@click.option("--dashboard-address", default=None, metavar="[HOST]:PORT",
              help=_help("Where the dashboard listens.", "dashboard-address"))
@click.option("--nthreads", default=None, metavar="N",
              help=_help("Threads per worker.", "nthreads"))
@click.option("--memory-limit", default=None, metavar="SIZE",
              help=_help("Memory per worker: 4GiB, 0.5 (of the node), or auto.", "memory-limit"))
@click.option("--local-directory", default=None, metavar="PATH",
              help=_help("Directory for the workers' spill files.", "local-directory"))
@click.option("--worker-class", default=None, metavar="CLASS",
              help=_help("Worker class to start, e.g. distributed.Nanny.", "worker-class"))
@click.option("--nanny/--no-nanny", default=None,
              help="dask-mpi's spelling of the worker class: --nanny is --worker-class "
                   "distributed.Nanny, --no-nanny distributed.Worker.")
@click.option("--worker-options", default=None, metavar="JSON",
              help=_help("Extra keyword arguments for the worker class, as a JSON object.",
                         "worker-options"))
@click.option("--worker-processes", default=None, metavar="K",
              help=_help("Worker processes per rank, forked after the imports (threads and "
                         "memory split among them; names RANK-I).", "worker-processes"))
@click.option("--worker-restarts", default=None, metavar="N",
              help=_help("Times a worker process that dies is restarted before its death "
                         "ends the job.", "worker-restarts"))
@click.option("--share-imports/--no-share-imports", default=None,
              help=_help("The ranks of a node share one process that imports distributed and "
                         "starts every role of the node (one import per node); "
                         "--no-share-imports: one per rank.", "share-imports"))
@click.option("--scheduler/--no-scheduler", default=None,
              help="Run a scheduler on rank 0 [default: yes]; --no-scheduler makes every rank "
                   "add workers to the running cluster of --scheduler-file (join mode).")
@click.option("--name", default=None, metavar="PREFIX",
              help=_help("Prefix of the worker names (names are PREFIX-RANK; the rank alone "
                         "without it).", "name"))
@click.option("--scheduler-file", default=None, metavar="PATH",
              help=_help("Write the scheduler's address here (atomically, once all workers "
                         "are connected; removed at the end).", "scheduler-file"))
@click.option("--wait-for-workers/--no-wait-for-workers", default=None,
              help=_help("Start the script only once every worker is connected.",
                         "wait-for-workers"))
@click.option("--wait-timeout", default=None, metavar="SECONDS",
              help=_help("Bound on that wait; a missing worker is an error after it.",
                         "wait-timeout"))
@click.option("--connect-timeout", default=None, metavar="SECONDS",
              help=_help("Bound on a worker reaching the scheduler's address; after it, one "
                         "message says which host cannot reach which address.",
                         "connect-timeout"))
@click.option("--record", default=None, metavar="DIR",
              help=_help("Keep a record of the job in DIR (made 0700): a log per rank and "
                         "role, summary.json, report.html.", "record"))
@click.option("--record-report/--no-record-report", default=None,
              help=_help("Put Dask's performance report (report.html) in the --record "
                         "directory (it adds ~0.4 s to the job's end).", "record-report"))
@click.option("--check", is_flag=True, default=False,
              help="Start no cluster: every rank reports its host and interfaces, ranks try "
                   "to reach each other, and rank 0 prints which --interface connects all "
                   "hosts (exit 0 if one does).")
@click.option("--bootstrap", type=click.Choice(["mpi", "slurm", "auto"]), default=None,
              help=_help("How ranks find each other: mpi; slurm (no MPI at all: roles from "
                         "SLURM_PROCID, the address through files in --bootstrap-dir); auto "
                         "(mpi, else slurm).", "bootstrap"))
@click.option("--bootstrap-dir", default=None, metavar="PATH",
              help=_help("Directory on a file system all nodes see, for --bootstrap slurm.",
                         "bootstrap-dir"))
@click.option("--jupyter", is_flag=True, default=None,
              help="Run JupyterLab on the client rank instead of a script (needs the "
                   "[jupyter] extra); the job ends when JupyterLab is shut down.")
@click.option("--login-host", default=None, metavar="HOST",
              help=_help("Login host to name in the banner's SSH tunnel line.", "login-host"))
@click.option("--time-limit", default=None, metavar="D-HH:MM:SS",
              help=_help("The job's time limit (HH:MM:SS, MM:SS, minutes, D-HH:MM:SS), "
                         "counted from the start; the batch system's is found by itself.",
                         "time-limit"))
@click.option("--time-grace", default=None, metavar="SECONDS",
              help=_help("Warn the script this long before the time limit (default: "
                         "max(60 s, 2 x shutdown-timeout + 35 s + 70 ms a worker), at most a "
                         "quarter of a short job).", "time-grace"))
@click.option("--quiet", is_flag=True, default=None,
              help="Print no banner when the cluster is ready.")
@click.option("--log-level", default=None,
              type=click.Choice(["debug", "info", "warning", "error", "critical"],
                                case_sensitive=False),
              help=_help("Level of Dask's loggers on every rank.", "log-level"))
@click.version_option(__version__, "--version", prog_name="dask-mpi-launch")
def command(script, args, module, check, **options):
    """Run a Dask cluster on the ranks of an MPI job, and SCRIPT as its client.

    \b
        mpiexec -n 8 dask-mpi-launch [OPTIONS] script.py [ARGS]...
        mpiexec -n 8 dask-mpi-launch [OPTIONS] -m package.module [ARGS]...
        mpiexec -n 8 dask-mpi-launch --scheduler-file sched.json   (cluster only)
        mpiexec -n 4 dask-mpi-launch --no-scheduler --scheduler-file sched.json  (join)

    Rank 0 runs the scheduler, rank 1 runs SCRIPT as __main__ (distributed.Client()
    connects with no arguments), every other rank runs a worker. The job's exit status is
    the script's. Without SCRIPT the cluster runs until a client calls shutdown() or the
    job is signalled. Options after SCRIPT are passed to it.
    """
    if module and script:
        args = (script, *args)
        script = None
    if script and options.get("scheduler") is False and _looks_like_address(script):
        raise click.UsageError(
            f"dask-mpi-launch joins a cluster through its scheduler file, not an address "
            f"({script}): give --scheduler-file PATH with --no-scheduler")
    from dask_mpi_launch.configure.settings import resolve

    settings = resolve(script=script, module=module, args=args, **options)
    return _deliver(settings, check)


#: set in the process that parses for a rank: receives (settings, check) instead of running
_capture = None

#: runs the job in this process when the command is invoked in-process (click's CliRunner,
#: sphinx-click): set by ``dask_mpi_launch.cli`` when it hands the command out, so that this
#: lower room never imports the front door above it
run_in_process = None


def _deliver(settings, check: bool):
    """Run the job here (the command invoked in-process, e.g. by click's CliRunner), or hand
    the settings to the rank that asked (:func:`parse`)."""
    if _capture is not None:
        return _capture(settings, check)
    if run_in_process is None:
        raise LaunchError("the command was invoked without dask_mpi_launch.cli: "
                          "use dask_mpi_launch.cli.command or the dask-mpi-launch command")
    return run_in_process(settings, check=check)


class Parsed:
    """What :func:`parse` found: settings to run with (and --check)."""

    def __init__(self, settings, check: bool):
        self.settings = settings
        self.check = check


def parse(argv) -> tuple:
    """Parse and resolve one rank's command line, as the command always did before MPI
    starts: ``("settings", settings, check)``, or ``("status", n)`` once whatever the user
    must see was printed (help, version, one line per error, by rank 0 only for errors)."""
    from dask_mpi_launch.hpc import load_mpi

    global _capture
    _capture = Parsed
    try:
        result = command.main(args=list(argv), prog_name="dask-mpi-launch",
                              standalone_mode=False)
    except click.exceptions.Exit as e:
        result = e.exit_code
    except click.ClickException as e:
        if load_mpi.rank_from_environment() == 0:
            e.show()
        result = e.exit_code
    except click.Abort:
        result = 130
    except LaunchError as e:
        load_mpi.say_once(e.message)
        result = e.status
    finally:
        _capture = None
    if isinstance(result, Parsed):
        return ("settings", result.settings, result.check)
    return ("status", result if isinstance(result, int) else 0)
