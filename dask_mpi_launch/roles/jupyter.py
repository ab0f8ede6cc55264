"""JupyterLab on the client rank (``--jupyter``).

The client rank's role process starts JupyterLab as a subprocess, bound to this host's
address on ``--interface`` (127.0.0.1 for ``lo``), on a free port, with a random token, and
reports the URL (rank 0 prints it with an SSH tunnel line). The job ends when JupyterLab
does (File > Shut Down): status 0 on every rank. A signal (``scancel``, the walltime,
Ctrl-C) is the other way such a session ends, not a failure: 0 too, as for a cluster-only
job, and as ``jupyter lab`` itself exits on SIGTERM (it was 143, against the docs).

Secrets stay out of command lines and environments: the token is in a JSON config file and
the job's TLS credentials in PEM files, all 0600 in a private 0700 directory removed at the
end. Kernels get only paths: ``DASK_SCHEDULER_ADDRESS`` and ``DASK_CONFIG`` (a directory
with a dask YAML pointing at the credential files), so ``Client()`` in a notebook needs no
arguments. With jupyter-server-proxy the dashboard is at ``/proxy/<port>/status`` (the
banner prints that URL), and dask-labextension's panes are pointed there through a
``labconfig`` directory of settings overrides on JUPYTER_CONFIG_PATH; this module is also a
small server extension that answers the labextension's check of that dashboard for any
address Lab is opened at (:func:`_load_jupyter_server_extension`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

LOOPBACK = ("127.0.0.1", "localhost", "::1")
READY_TIMEOUT = 120.0  # JupyterLab's first start can be slow (a cold file system)
_DROPPED_ENV = ("PMI_", "PMIX_")  # this rank's MPI wiring: a kernel's mpi4py must not use it


def run_jupyter(settings, channel, address, credentials, scheduler_info) -> int:
    if importlib.util.find_spec("jupyterlab") is None:
        channel.error("--jupyter needs JupyterLab: pip install 'dask-mpi-launch[jupyter]'")
        return 1
    stop: list[int] = []

    def on_signal(signum, frame):
        stop.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)

    private = tempfile.mkdtemp(prefix="dask-mpi-launch-jupyter-")  # 0700
    proc = None
    try:
        ip = bind_ip(settings, address)
        token = secrets.token_urlsafe(32)
        dashboard = (scheduler_info or {}).get("dashboard")
        proxy = importlib.util.find_spec("jupyter_server_proxy") is not None
        if dashboard and not proxy:
            print("dask-mpi-launch: warning: jupyter-server-proxy is not installed: the "
                  "dashboard is not proxied through JupyterLab", file=sys.stderr, flush=True)
        config_file = write_server_config(private, ip, token, dashboard if proxy else None)
        link = dashboard_path(dashboard) if dashboard and proxy else None
        env = kernel_environment(private, address, credentials, link)
        if link:
            env["JUPYTER_CONFIG_PATH"] = os.pathsep.join(
                p for p in (write_lab_overrides(private, link),
                            os.environ.get("JUPYTER_CONFIG_PATH")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", f"--config={config_file}"],
            env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )
        port = _wait_ready(proc, env["JUPYTER_RUNTIME_DIR"], ip, token, stop)
        if port is None:
            if stop:
                return 0  # told to end: how an interactive session ends
            channel.error(f"JupyterLab {_ended(proc)} before it answered on {ip} "
                          "(see its messages above)")
            return 1
        lab = f"http://{_url_host(ip)}:{port}"
        channel.send("jupyter", url={
            "lab": f"{lab}/lab?token={token}",
            "dashboard": f"{lab}{link}?token={token}" if link else None,
        })
        while proc.poll() is None and not stop:
            time.sleep(0.1)
        if stop:
            return 0
        return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    finally:
        if proc is not None:
            _stop(proc, grace=max(1.0, 0.6 * settings.shutdown_timeout))
        shutil.rmtree(private, ignore_errors=True)


def bind_ip(settings, address: str) -> str:
    """This host's address on ``--interface``, else the one it reaches the scheduler by."""
    from distributed.comm import get_address_host
    from distributed.utils import get_ip, get_ip_interface

    if settings.interface:
        return get_ip_interface(settings.interface)
    try:
        return get_ip(get_address_host(address))
    except Exception:
        return "127.0.0.1"


def dashboard_path(dashboard: str) -> str:
    """Where jupyter-server-proxy serves the dashboard: ``/proxy/<port>/status`` when it is
    on this host's loopback, else ``/proxy/<host>:<port>/status``."""
    parts = urlsplit(dashboard)
    port = parts.port or 80
    where = str(port) if parts.hostname in LOOPBACK else f"{_url_host(parts.hostname)}:{port}"
    return f"/proxy/{where}{parts.path or '/status'}"


def write_server_config(private: str, ip: str, token: str, dashboard: str | None) -> str:
    """JupyterLab's settings, token included, in a 0600 JSON file."""
    allowed = ["localhost", "127.0.0.1"]
    if dashboard:
        host = urlsplit(dashboard).hostname
        if host and host not in allowed:
            allowed.append(host)
    config = {
        "ServerApp": {
            "ip": ip, "port": 0, "port_retries": 0, "open_browser": False,
            "allow_root": True, "root_dir": os.getcwd(), "log_level": "WARN",
            "logging_config": {  # merged into traitlets' console handler
                "filters": {"dml": {"()": f"{__name__}.QuietLog"}},
                "handlers": {"console": {"filters": ["dml"]}}},
        },
        "IdentityProvider": {"token": token},
        "ServerProxy": {"host_allowlist": allowed},
        # compute nodes often have no internet access: no update checks, no news
        "LabApp": {"check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
                   "news_url": None, "log_level": "WARN",
                   "workspaces_dir": job_workspaces(private)},
    }
    if dashboard and importlib.util.find_spec("dask_labextension") is not None:
        config["ServerApp"].update(  # merged with the extensions enabled elsewhere
            jpserver_extensions={__name__: True},
            tornado_settings={_DASHBOARD_SETTING: {"link": dashboard_path(dashboard),
                                                   "direct": dashboard}})
    return _write_private(os.path.join(private, "jupyter_server_config.json"),
                          json.dumps(config, indent=1))


class QuietLog:
    """JupyterLab's log without warnings meant for extension authors, not for users
    (dask-labextension's deprecated ``_jupyter_server_extension_paths``)."""

    def filter(self, record) -> bool:
        return "_jupyter_server_extension_points" not in record.getMessage()


_STALE_STATE = "dask-dashboard-launcher"  # dask-labextension: last job's dashboard URL, panes


def job_workspaces(private: str) -> str:
    """This job's copy of the user's JupyterLab workspaces, without dask-labextension's
    saved state: it names the previous job's dashboard (a dead port), and would win over
    this job's. The user's own files are read, never changed."""
    target = os.path.join(private, "workspaces")
    os.makedirs(target, 0o700, exist_ok=True)
    try:
        from jupyter_core.paths import jupyter_config_dir

        source = os.path.join(jupyter_config_dir(), "lab", "workspaces")
        names = [n for n in os.listdir(source) if n.endswith(".jupyterlab-workspace")]
    except (ImportError, OSError):
        return target
    for name in names:
        try:
            with open(os.path.join(source, name)) as f:
                workspace = json.load(f)
            data = workspace.get("data", {})
            for key in [k for k in data if k.split(":", 1)[0] == _STALE_STATE]:
                del data[key]
            _write_private(os.path.join(target, name), json.dumps(workspace))
        except (OSError, ValueError, AttributeError):
            continue  # a workspace we cannot read: Lab starts without it
    return target


_DASHBOARD_SETTING = "dask_mpi_launch_dashboard"


def _jupyter_server_extension_points():
    return [{"module": __name__}]


def _load_jupyter_server_extension(serverapp) -> None:
    """dask-labextension's URL check, for this job's dashboard at whatever address.

    The labextension saves its URL absolute (``http://127.0.0.1:41733/proxy/8787/``) in
    the workspace, and a later browser restores it. Opened elsewhere (through the SSH
    tunnel as ``http://localhost:41733``, or through another local port), that URL is not
    under the browser's base URL, so the labextension asks Lab's server to check it; the
    server fetches it without credentials, Lab's own proxy answers 302 (login), and the
    Dask pane stays empty, for good. Here the check of this job's dashboard, at any
    address, answers with it under the asking browser's own address (its plots then
    load through the proxy, as with the relative default URL); other URLs are checked by
    dask-labextension as before. Our rule goes first: extensions load by name, and
    dask_labextension's rule for the same path would win."""
    from dask_labextension.dashboardhandler import DaskDashboardCheckHandler
    from jupyter_server.utils import url_path_join

    web_app = serverapp.web_app
    route = url_path_join(web_app.settings["base_url"], "dask/dashboard-check/(?P<url>.+)")
    rules = web_app.default_router.rules
    before = list(rules)
    web_app.add_handlers(".*$", [(route, _dashboard_check(DaskDashboardCheckHandler))])
    for rule in [r for r in rules if r not in before]:
        rules.remove(rule)
        rules.insert(0, rule)


def _dashboard_check(base):
    from tornado import httpclient, web
    from urllib.parse import unquote

    class DashboardCheck(base):
        @web.authenticated
        async def get(self, url) -> None:
            ours = self.settings.get(_DASHBOARD_SETTING)
            parts = urlsplit(unquote(url))
            path = parts.path.removesuffix("status").rstrip("/")
            mine = ours and (self.base_url.rstrip("/")
                             + ours["link"].removesuffix("status").rstrip("/"))
            if not (ours and parts.scheme and path == mine):
                return await super().get(url)
            here = f"{self.request.protocol}://{self.request.host}{mine}/"
            direct = ours["direct"].removesuffix("status").rstrip("/")
            try:
                response = await httpclient.AsyncHTTPClient().fetch(
                    f"{direct}/individual-plots.json", request_timeout=10)
                answer = {"url": here, "isActive": True, "effectiveUrl": None,
                          "plots": json.loads(response.body)}
            except Exception:
                answer = {"url": here, "isActive": False, "plots": {}}
            self.finish(json.dumps(answer))

    return DashboardCheck


def write_lab_overrides(private: str, dashboard_link: str) -> str:
    """A Jupyter config directory whose ``labconfig`` points dask-labextension's panes at
    this cluster's dashboard through the proxy (relative to Lab's base URL, so it works
    through any tunnel), with nothing typed; the cluster manager (which would start a
    LocalCluster beside this cluster) is hidden. Returns the directory, for
    JUPYTER_CONFIG_PATH: the user's own settings still apply."""
    labconfig = os.path.join(private, "config", "labconfig")
    os.makedirs(labconfig, 0o700)
    overrides = {
        "dask-labextension:plugin": {"defaultURL": dashboard_link.lstrip("/"),
                                     "hideClusterManager": True},
        # compute nodes often have no internet access: do not offer to fetch news
        "@jupyterlab/apputils-extension:notification": {"fetchNews": "false"},
    }
    _write_private(os.path.join(labconfig, "default_setting_overrides.json"),
                   json.dumps(overrides, indent=1))
    return os.path.dirname(labconfig)


def kernel_environment(private: str, address: str, credentials: dict | None,
                       dashboard_link: str | None = None) -> dict:
    """JupyterLab's environment, which its kernels inherit: paths only, never secrets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_ENV)}
    env["DASK_SCHEDULER_ADDRESS"] = address
    runtime = os.path.join(private, "runtime")
    os.mkdir(runtime, 0o700)
    env["JUPYTER_RUNTIME_DIR"] = runtime
    dask_dir = os.path.join(private, "dask")
    os.mkdir(dask_dir, 0o700)
    config: dict = {}
    if credentials:
        paths = {field: _write_private(os.path.join(dask_dir, f"{field}.pem"), credentials[field])
                 for field in ("ca", "cert", "key")}
        config["comm"] = {
            "require-encryption": True,
            "tls": {"ca-file": paths["ca"],
                    "client": {"cert": paths["cert"], "key": paths["key"]}},
        }
    if dashboard_link:
        config["dashboard"] = {"link": dashboard_link}
    _write_private(os.path.join(dask_dir, "dask-mpi-launch-jupyter.yaml"),
                   json.dumps({"scheduler-address": address, "distributed": config}, indent=1))
    env["DASK_CONFIG"] = dask_dir  # read after ~/.config/dask, which still applies
    return env


def _write_private(path: str, text: str) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def _wait_ready(proc, runtime: str, ip: str, token: str, stop: list) -> int | None:
    """JupyterLab's port once ``/api/status`` answers; None if it ended or we were told to
    stop first."""
    deadline = time.monotonic() + READY_TIMEOUT
    info = os.path.join(runtime, f"jpserver-{proc.pid}.json")
    port = None
    while time.monotonic() < deadline and proc.poll() is None and not stop:
        if port is None:
            try:
                with open(info) as f:
                    port = int(json.load(f)["port"])
            except (OSError, ValueError, KeyError):
                time.sleep(0.1)
                continue
        request = urllib.request.Request(f"http://{_url_host(ip)}:{port}/api/status",
                                         headers={"Authorization": f"token {token}"})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return port
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    if proc.poll() is None and not stop:
        proc.kill()  # never answered: _ended() says so
        proc.wait()
    return None


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM (JupyterLab then shuts its kernels down), SIGKILL for all after ``grace``."""
    if proc.poll() is not None:
        return
    try:
        import psutil

        family = psutil.Process(proc.pid).children(recursive=True)
    except Exception:
        family = []
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for child in family:  # kernels run in their own sessions: not in our process group
        try:
            if child.is_running():
                child.kill()
        except Exception:
            pass


def _ended(proc) -> str:
    from dask_mpi_launch.base.status import Ended

    status = proc.returncode
    return (Ended(signal=-status) if status < 0 else Ended(exited=status)).describe()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _die_with_parent() -> None:  # in the JupyterLab process, before exec
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass
