"""Running real jobs from tests: mpiexec from a venv, a timeout that kills the whole
process group, and the outcome (status, output, duration) to assert on."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_DIR = Path(os.environ.get("DML_VENV_DIR", ROOT / ".venv"))
IMPLEMENTATIONS = ("mpich", "openmpi")

# Open MPI as root, more ranks than cores
OPENMPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
}
# never the machine's external address, never a fixed port
TEST_ENV = {
    "DASK_MPI_LAUNCH__INTERFACE": "lo",
    "DASK_MPI_LAUNCH__DASHBOARD_ADDRESS": "127.0.0.1:0",
    "DASK_MPI_LAUNCH__DASHBOARD": "False",
    "DASK_DISTRIBUTED__WORKER__MEMORY__TARGET": "False",
    "PYTHONUNBUFFERED": "1",
}


@dataclass(repr=False)
class Outcome:
    status: int
    out: str
    err: str
    seconds: float
    argv: list

    @property
    def output(self) -> str:
        return self.out + self.err

    def __repr__(self) -> str:  # shown by pytest when an assertion fails
        return (f"$ {' '.join(map(str, self.argv))}\nstatus {self.status} after "
                f"{self.seconds:.2f} s\n--- stdout\n{self.out}\n--- stderr\n{self.err}")


class Venv:
    def __init__(self, impl: str, path: Path | None = None):
        self.impl = impl
        self.path = Path(path or VENV_DIR / impl)

    @property
    def bin(self) -> Path:
        return self.path / "bin"

    @property
    def python(self) -> str:
        return str(self.bin / "python")

    @property
    def mpiexec(self) -> str:
        return str(self.bin / "mpiexec")

    def exists(self) -> bool:
        return (self.bin / "python").exists() and (self.bin / "mpiexec").exists()

    def env(self, extra=None) -> dict:
        env = dict(os.environ)
        env.update(TEST_ENV)
        if self.impl == "openmpi":
            env.update(OPENMPI_ENV)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env.update(extra or {})
        return env

    def launch(self, n: int, *args, timeout: float = 60, env=None, cwd=None,
               mpiexec_args=()) -> Outcome:
        """``mpiexec -n N dask-mpi-launch ARGS``."""
        argv = [self.mpiexec, *mpiexec_args, "-n", str(n), str(self.bin / "dask-mpi-launch"),
                *map(str, args)]
        return run(argv, timeout=timeout, env=self.env(env), cwd=cwd)

    def launch_python(self, n: int, *args, timeout: float = 60, env=None, cwd=None) -> Outcome:
        """``mpiexec -n N python ARGS``."""
        argv = [self.mpiexec, "-n", str(n), self.python, *map(str, args)]
        return run(argv, timeout=timeout, env=self.env(env), cwd=cwd)

    def start(self, argv, env=None, cwd=None) -> subprocess.Popen:
        """A job in the background, in its own process group (stop it with ``stop``)."""
        return subprocess.Popen(argv, env=self.env(env), cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)


def run(argv, timeout: float, env=None, cwd=None) -> Outcome:
    start = time.monotonic()
    proc = subprocess.Popen(list(map(str, argv)), env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(
            f"HUNG: killed after {timeout} s: {' '.join(map(str, argv))}\n"
            f"--- stdout\n{out}\n--- stderr\n{err}"
        ) from None
    return Outcome(proc.returncode, out, err, time.monotonic() - start, list(argv))


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def finish(proc: subprocess.Popen, timeout: float) -> Outcome:
    """Wait for a job started with ``Venv.start``; kill its group if it overruns."""
    start = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"HUNG: killed after {timeout} s\n{out}\n{err}") from None
    return Outcome(proc.returncode, out, err, time.monotonic() - start, proc.args)


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float) -> str | None:
    """The first line of the job's stdout containing ``text``, or None if the job ended or
    ``timeout`` passed first (a reader thread: a silent job cannot block the test)."""
    import queue
    import threading

    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
            if text in line:
                return
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None
        if line is None or text in line:
            return line


def leftover_processes(marker: str, environment: bool = False) -> list[str]:
    """Command lines of live processes containing ``marker`` (zombies excluded); with
    ``environment``, those whose environment holds it (a token the test set)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            if environment:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    where = f.read().decode(errors="replace")
            else:
                where = cmd
        except OSError:
            continue
        if marker in where:
            found.append(f"{pid}: {cmd}")
    return found


def wait_no_leftovers(marker: str, timeout: float = 10, environment: bool = False) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        left = leftover_processes(marker, environment)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


if __name__ == "__main__":  # pragma: no cover - manual use
    print(run(sys.argv[1:], timeout=60))
