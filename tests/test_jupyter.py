"""``--jupyter``: JupyterLab on the client rank, with auth, a kernel whose ``Client()``
reaches the TLS cluster, the dashboard through jupyter-server-proxy (rendered by a real
headless Chromium), and a clean end of the job on ``POST /api/shutdown``."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import unavailable
from launch import ROOT, kill_group, wait_no_leftovers

pytestmark = pytest.mark.mpi

ARTIFACTS = ROOT / "test-artifacts"


def _has(venv, module: str) -> bool:
    return subprocess.run([venv.python, "-c", f"import {module}"], capture_output=True,
                          timeout=60).returncode == 0


@pytest.fixture(scope="module")
def lab(mpich, tmp_path_factory):
    """A running ``mpiexec -n 3 dask-mpi-launch --jupyter`` job, dashboard on."""
    for module in ("jupyterlab", "jupyter_server_proxy", "bokeh", "websocket"):
        if not _has(mpich, module):
            unavailable(f"{module} is not installed in {mpich.path} (the [jupyter] extra)")
    tmp = tmp_path_factory.mktemp("jupyter")
    name = f"jt{uuid.uuid4().hex[:8]}"
    proc = mpich.start(
        [mpich.mpiexec, "-n", "3", str(mpich.bin / "dask-mpi-launch"), "--jupyter",
         "--name", name],
        env={"DASK_MPI_LAUNCH__DASHBOARD": "True", "TMPDIR": str(tmp),
             "MPIEXEC_TIMEOUT": "900"},  # the module's job, not one test's: bound by its tests
        cwd=tmp)
    lines: list[str] = []
    errors: list[str] = []
    readers = [threading.Thread(target=lambda s=s, o=o: o.extend(s), daemon=True)
               for s, o in ((proc.stdout, lines), (proc.stderr, errors))]
    for reader in readers:
        reader.start()
    state = {"proc": proc, "lines": lines, "errors": errors, "tmp": tmp, "name": name,
             "readers": readers}
    try:
        deadline = time.monotonic() + 60
        url = dashboard = proxied = None
        while time.monotonic() < deadline and proc.poll() is None:
            text = "".join(lines)
            url = re.search(r"JupyterLab at (http://\S+)", text)
            dashboard = re.search(r"dashboard +(http://\S+)", text)
            proxied = re.search(r"dashboard +(http://\S+/proxy/\S+) +\(through", text)
            if url and dashboard and proxied:
                break
            time.sleep(0.1)
        assert url and dashboard and proxied, (
            f"no JupyterLab URL after 60 s:\n{''.join(lines)}\n{''.join(errors)}")
        state["url"] = url.group(1)
        base, token = re.fullmatch(r"(http://[^/]+)/lab\?token=(\S+)", state["url"]).groups()
        state.update(base=base, token=token, proxied=proxied.group(1), dashboard_port=int(
            re.search(r":(\d+)/", dashboard.group(1)).group(1)))
        yield state
    finally:
        if proc.poll() is None and not state.get("shut"):
            kill_group(proc)
            proc.wait(10)


class _Keep(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a redirect (to the login page) is an answer to check, not to follow


_NO_REDIRECT = urllib.request.build_opener(_Keep)


def _get(url: str, token: str | None = None, method: str = "GET", data=None, timeout=10):
    headers = {"Authorization": f"token {token}"} if token else {}
    if data is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(data).encode()
    request = urllib.request.Request(url, method=method, headers=headers, data=data)
    try:
        with _NO_REDIRECT.open(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def test_url_is_loopback_with_token(lab):
    assert lab["url"].startswith("http://127.0.0.1:")
    assert len(lab["token"]) >= 32
    text = "".join(lab["lines"])
    assert "tunnel     ssh -N -L" in text


def test_banner_prints_the_dashboard_through_labs_port(lab):
    """The one tunnel (to Lab's port) also reaches the dashboard: the banner says where."""
    port = lab["dashboard_port"]
    assert lab["proxied"] == f"{lab['base']}/proxy/{port}/status?token={lab['token']}"
    lab_port = lab["base"].rsplit(":", 1)[1]
    assert f"and the dashboard at http://localhost:{lab_port}/proxy/{port}/status" in \
        "".join(lab["lines"])
    status, body = _get(lab["proxied"])  # the printed URL itself, no header
    assert status == 200 and "bokeh" in body.lower(), body[:300]


def test_api_needs_the_token(lab):
    status, body = _get(f"{lab['base']}/api/status", lab["token"])
    assert status == 200 and "started" in json.loads(body)
    status, _ = _get(f"{lab['base']}/api/status")
    assert status in (401, 403)
    status, _ = _get(f"{lab['base']}/api/status?token=wrong")
    assert status in (401, 403)


def test_no_secret_on_command_lines(lab):
    """The token and the key are in no process's command line or environment."""
    key_marker = lab["token"]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        assert key_marker.encode() not in cmd + env, f"token visible in process {pid}"
        assert b"PRIVATE KEY" not in cmd + env, f"key visible in process {pid}"


def test_dashboard_is_proxied(lab):
    status, body = _get(f"{lab['base']}/proxy/{lab['dashboard_port']}/status", lab["token"])
    assert status == 200
    assert "Dask" in body and "bokeh" in body.lower()
    status, body = _get(f"{lab['base']}/proxy/{lab['dashboard_port']}/status")
    assert status in (302, 401, 403), body  # behind Jupyter's auth too (302: to /login)
    assert "bokeh" not in body.lower()


KERNEL_CODE = """
import os
from distributed import Client
client = Client(timeout=30)
print("RESULT", client.submit(lambda x: x + 1, 41).result(timeout=30))
print("ADDRESS", client.scheduler.address)
print("LINK", client.dashboard_link)
print("LEAK", any("PRIVATE KEY" in v for v in os.environ.values()))
client.close()
"""


def test_kernel_client_connects(lab):
    """A real kernel (REST + websocket, as JupyterLab does) runs ``Client()``."""
    text = _run_in_kernel(lab, KERNEL_CODE)
    assert "RESULT 42" in text, text
    assert "ADDRESS tls://" in text, text
    assert f"LINK /proxy/{lab['dashboard_port']}/status" in text, text
    assert "LEAK False" in text, text


def _run_in_kernel(lab, code: str, timeout: float = 60) -> str:
    """Run ``code`` in a new kernel of the Lab; its printed output."""
    import websocket  # websocket-client, a jupyter_server dependency

    status, body = _get(f"{lab['base']}/api/kernels", lab["token"], "POST", {"name": "python3"})
    assert status == 201, body
    kernel = json.loads(body)["id"]
    ws_url = lab["base"].replace("http://", "ws://")
    ws = websocket.create_connection(
        f"{ws_url}/api/kernels/{kernel}/channels?token={lab['token']}", timeout=60)
    try:
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({
            "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex,
                       "msg_type": "execute_request", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
        }))
        out, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(ws.recv())
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "stream":
                out.append(content["text"])
            elif kind == "error":
                pytest.fail("kernel error:\n" + "\n".join(content["traceback"]))
            elif kind == "status" and content["execution_state"] == "idle":
                break
    finally:
        ws.close()
    return "".join(out)


COUNT_CANVASES = """(() => { let n = 0; const walk = (root) => {
  for (const el of root.querySelectorAll('*')) {
    if (el.tagName === 'CANVAS') n++; if (el.shadowRoot) walk(el.shadowRoot); } };
  walk(document); return n; })()"""


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], capture_output=True, timeout=300, env=env)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                       capture_output=True, timeout=600, env=env)
        found = shutil.which("chromium")
    return found


class _Browser:
    """Headless Chromium driven over the DevTools protocol (no extra package)."""

    def __init__(self, ws):
        self.ws = ws
        self.ids = iter(range(1, 1 << 30))

    def call(self, method, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == i:
                return message.get("result", {})

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, deadline: float, pause: float = 0.3):
        """The expression's value once truthy, or its last value at the deadline."""
        while True:
            value = self.eval(expression)
            if value or time.monotonic() > deadline:
                return value
            time.sleep(pause)

    def click(self, element_js: str) -> bool:
        """A real mouse click (press and release) at the centre of the element."""
        where = self.eval(f"(() => {{ const e = {element_js}; if (!e) return null; "
                          "const r = e.getBoundingClientRect(); "
                          "if (!r.width || !r.height) return null; "  # hidden: nothing to click
                          "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        if not where:
            return False
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=where[0], y=where[1],
                      button="left", clickCount=1)
        return True

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot",
                                                     format="png")["data"]))
        return path


@contextlib.contextmanager
def _browser(lab, deadline: float):
    import websocket

    chromium = _chromium()
    if chromium is None:
        unavailable("no chromium (apt-get install chromium)")
    profile = tempfile.mkdtemp(dir=lab["tmp"])
    browser = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "--window-size=1400,1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = Path(profile, "DevToolsActivePort")
        while not (port_file.exists() and port_file.read_text().strip()):
            assert browser.poll() is None, f"chromium exited with {browser.returncode}"
            assert time.monotonic() < deadline, "chromium: no DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30,
                                         suppress_origin=True)
        try:
            yield _Browser(ws)
        finally:
            ws.close()
    finally:
        kill_group(browser)
        browser.wait(10)


def test_browser_renders_proxied_dashboard(lab):
    """Headless Chromium (DevTools protocol) loads the proxied dashboard; Bokeh's plots
    are canvases in shadow roots: they exist only once its websocket, through the proxy,
    delivered the document."""
    url = f"{lab['base']}/proxy/{lab['dashboard_port']}/status?token={lab['token']}"
    deadline = time.monotonic() + 40
    with _browser(lab, deadline) as browser:
        browser.call("Page.navigate", url=url)
        canvases = browser.wait_for(f"{COUNT_CANVASES} >= 3 && {COUNT_CANVASES}", deadline)
        if canvases:
            time.sleep(1)  # let the first data arrive, for the screenshot
        browser.screenshot("jupyter-proxied-dashboard.png")
        title = browser.eval("document.title") or ""
    assert canvases, "Bokeh did not render through the proxy"
    assert "Dask" in title


# Tasks for the task stream to show: the kernel computes while the browser watches.
TASKS_CODE = """
import time
from distributed import Client
client = Client(timeout=30)
futures = client.map(lambda x: time.sleep(0.05) or x, range(120), pure=False)
print("SUM", sum(client.gather(futures)))
client.close()
"""

# Bokeh's task-stream source in the pane's iframe: how many task rectangles it holds.
TASK_RECTANGLES = """(() => {
  const frame = document.querySelector('iframe[src*="individual-task-stream"]');
  const bokeh = frame && frame.contentWindow && frame.contentWindow.Bokeh;
  if (!bokeh || !bokeh.documents || !bokeh.documents.length) return 0;
  let n = 0;
  for (const model of bokeh.documents[0].all_models) {
    const data = model.data;
    if (data && data.duration && data.key) n = Math.max(n, data.duration.length);
  }
  return n; })()"""


# JupyterLab's splash screen is removed only once Lab has restored its layout
# (apputils-extension:splash awaits ``app.restored``): before that, a click on a side tab is
# undone by the restore, which makes the file browser current again.
LAB_RESTORED = ("(() => { const s = document.getElementById('jupyterlab-splash'); "
                "return !s || s.classList.contains('splash-fade'); })()")


def _open_task_stream(browser, lab_url: str, deadline: float):
    """A user's clicks in Lab at ``lab_url``: the Dask tab, then Task Stream. Returns
    whether the pane listed Task Stream, its URL field, and the Task Stream iframe's URL.

    The Dask tab is in the page (under the splash screen) before Lab has restored its
    layout; a click then was undone by the restore, the pane stayed hidden, and
    dask-labextension renders its list only while the pane is visible: "the Dask pane list
    stayed empty", 4 runs of 5 on a quiet machine (its URL check, from the browser with
    Lab's token, answered 200 every 4 s meanwhile). So: wait for the restore, then open
    the pane whenever it is not showing (as a user would), and only then read it."""
    browser.call("Page.navigate", url=lab_url)
    dask_tab = "document.querySelector('.lm-TabBar-tab[data-id=\"dask-dashboard-launcher\"]')"
    assert browser.wait_for(f"{dask_tab} !== null && {LAB_RESTORED}", deadline), \
        "no Dask tab in Lab, or Lab never restored its layout"
    pane = ("(() => { const p = document.querySelector('.dask-DaskDashboardLauncher'); "
            "if (!p) return false; const r = p.getBoundingClientRect(); "
            "return r.width > 0 && r.height > 0; })()")
    task_stream = ("Array.from(document.querySelectorAll('.dask-DaskDashboardLauncher "
                   "button')).find(b => b.textContent === 'Task Stream' && !b.disabled)")
    iframe = "(document.querySelector('iframe[src*=\"individual-task-stream\"]') || {}).src"
    src = found = None
    while not src and time.monotonic() < deadline:
        if not browser.eval(pane):  # not open yet, or closed again: open it
            browser.click(dask_tab)
            browser.wait_for(pane, min(deadline, time.monotonic() + 5))
            continue
        found = browser.wait_for(f"{task_stream} !== undefined",
                                 min(deadline, time.monotonic() + 5))
        if not found:
            continue  # the pane was closed meanwhile, or its check is still due
        # the list may still be laying itself out: a click that missed is clicked again
        browser.click(task_stream)
        src = browser.wait_for(iframe, min(deadline, time.monotonic() + 5))
    typed = browser.eval("document.querySelector('.dask-URLInput input').value")
    return found, typed, src


def test_lab_shows_a_dask_pane_through_the_proxy(lab):
    """The user's path, nothing typed: open the banner's Lab URL, click the Dask tab,
    click Task Stream. The pane loads the banner's dashboard through Lab's proxy, and the
    tasks a notebook kernel runs appear in it."""
    port = lab["dashboard_port"]
    deadline = time.monotonic() + 120
    with _browser(lab, deadline) as browser:
        found, typed, src = _open_task_stream(browser, lab["url"], deadline)  # as printed
        assert found, f"the Dask pane list stayed empty (URL field: {typed!r})"
        assert typed == f"proxy/{port}/status", typed  # filled in for the user (relative:
        # it works through any tunnel port), not a previous job's URL from the workspace
        if src != f"{lab['base']}/proxy/{port}/individual-task-stream":
            browser.screenshot("jupyterlab-dask-pane-failed.png")
            frames = browser.eval("Array.from(document.querySelectorAll('iframe'))"
                                  ".map(f => f.src).join(' ')")
            pytest.fail(f"no Task Stream iframe (iframes: {frames!r}); job {lab['proc'].poll()}"
                        f"\n{''.join(lab['lines'])}\n{''.join(lab['errors'])}")
        result = {}
        worker = threading.Thread(target=lambda: result.update(
            out=_run_in_kernel(lab, TASKS_CODE, timeout=90)), daemon=True)
        worker.start()
        rectangles = browser.wait_for(f"{TASK_RECTANGLES} >= 20 && {TASK_RECTANGLES}",
                                      deadline, pause=0.5)
        worker.join(max(1.0, deadline - time.monotonic()))
        time.sleep(1)  # the last rectangles, for the screenshot
        shot = browser.screenshot("jupyterlab-dask-task-stream.png")
        title = browser.eval("Array.from(document.querySelectorAll('.lm-DockPanel "
                             ".lm-TabBar-tab')).map(t => t.textContent).join('|')") or ""
    assert "SUM 7140" in result.get("out", ""), result
    assert rectangles, "no task reached the Task Stream pane"
    assert "Task Stream" in title, title
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


@contextlib.contextmanager
def _tunnel(target: str):
    """What ``ssh -N -L PORT:node:LABPORT`` gives a laptop: another port that carries raw
    TCP to Lab's. Yields the base URL through it."""
    import socket

    host, port = target.rsplit("//", 1)[1].rsplit(":", 1)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    done = threading.Event()

    def pump(source, sink):
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def serve():
        while not done.is_set():
            try:
                near, _ = server.accept()
            except (socket.timeout, OSError):
                continue
            far = socket.create_connection((host, int(port)), timeout=10)
            for ends in ((near, far), (far, near)):
                threading.Thread(target=pump, args=ends, daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        done.set()
        thread.join(5)
        server.close()


# Bokeh's document in the Task Stream iframe: it loaded, scripts and websocket included
IFRAME_BOKEH = """(() => {
  const frame = document.querySelector('iframe[src*="individual-task-stream"]');
  const bokeh = frame && frame.contentWindow && frame.contentWindow.Bokeh;
  return !!(bokeh && bokeh.documents && bokeh.documents.length); })()"""


def _saved_dashboard_url(lab, deadline: float) -> str | None:
    """The dashboard URL dask-labextension saved in Lab's workspace, once saved."""
    while time.monotonic() < deadline:
        status, body = _get(f"{lab['base']}/lab/api/workspaces/default", lab["token"])
        data = json.loads(body).get("data", {}) if status == 200 else {}
        urls = [v.get("url") for k, v in data.items()
                if k.startswith("dask-dashboard-launcher") and isinstance(v, dict)]
        if any(urls):
            return next(filter(None, urls))
        time.sleep(0.3)
    return None


def test_dask_pane_through_a_tunnel_on_another_port(lab):
    """A user opens Lab at the banner's address, then through an SSH tunnel whose local
    port is not Lab's (or the other way round). dask-labextension saved its URL absolute
    in the workspace; the second browser restores it, and, not under its own base URL,
    it was checked by Lab's server, without credentials: 302 from Lab's proxy, an empty
    Dask pane for good (on cde6b6b). Now it is answered under the browser's own address,
    and the plots load through the tunnel and Lab's proxy."""
    port = lab["dashboard_port"]
    deadline = time.monotonic() + 120
    with _tunnel(lab["base"]) as base, _browser(lab, deadline) as browser:
        found, _, _ = _open_task_stream(browser, lab["url"], deadline)
        assert found, "the Dask pane list stayed empty at Lab's own address"
        saved = _saved_dashboard_url(lab, deadline)
        assert saved == f"{lab['base']}/proxy/{port}/", saved
        found, typed, src = _open_task_stream(browser, lab["url"].replace(lab["base"], base),
                                              deadline)
        loaded = src and browser.wait_for(IFRAME_BOKEH, deadline)
        if not loaded:
            browser.screenshot("jupyterlab-dask-pane-tunnel-failed.png")
    assert found, f"the Dask pane list stayed empty (URL field: {typed!r})"
    assert src == f"{base}/proxy/{port}/individual-task-stream", src
    assert loaded, "the Task Stream plot did not load through the tunnel"


def test_shutdown_ends_the_job(lab):
    """Last: ``POST /api/shutdown`` ends every rank with 0, leaving nothing running."""
    proc = lab["proc"]
    status, _ = _get(f"{lab['base']}/api/shutdown", lab["token"], "POST")
    assert status == 200
    lab["shut"] = True
    start = time.monotonic()
    try:
        status = proc.wait(30)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.wait(10)
        status = None
    seconds = time.monotonic() - start
    for reader in lab["readers"]:
        reader.join(5)
    report = f"status {status} after {seconds:.1f} s\n{''.join(lab['lines'])}\n" \
             f"{''.join(lab['errors'])}"
    assert status == 0, report
    assert seconds < 20, report
    assert wait_no_leftovers(lab["name"]) == []
    assert wait_no_leftovers(str(lab["tmp"])) == []  # JupyterLab and kernels
    assert not list(Path(lab["tmp"]).glob("dask-mpi-launch-jupyter-*"))  # private dir gone


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_ends_the_session_with_0(mpich, tmp_path, signame):
    """``scancel``/walltime (SIGTERM) or Ctrl-C (SIGINT) on mpiexec: JupyterLab and its
    kernels stop promptly, nothing is left, and the job's status is 0, as for a
    cluster-only job and as ``jupyter lab`` itself exits on SIGTERM: a signal is how an
    interactive session ends (SIGTERM gave 143, against the README and docs). MPICH only:
    the [jupyter] extra is installed in the mpich venv alone."""
    import signal

    if not _has(mpich, "jupyterlab"):
        unavailable(f"jupyterlab is not installed in {mpich.path} (the [jupyter] extra)")
    name = f"jt{uuid.uuid4().hex[:8]}"
    proc = mpich.start([mpich.mpiexec, "-n", "3", str(mpich.bin / "dask-mpi-launch"),
                        "--jupyter", "--name", name], env={"TMPDIR": str(tmp_path)},
                       cwd=tmp_path)
    lines: list[str] = []
    errors: list[str] = []
    readers = [threading.Thread(target=lambda s=s, o=o: o.extend(s), daemon=True)
               for s, o in ((proc.stdout, lines), (proc.stderr, errors))]
    for reader in readers:
        reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any("JupyterLab at" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines + errors)
            time.sleep(0.1)
        base, token = re.search(r"JupyterLab at (http://[^/]+)/lab\?token=(\S+)",
                                "".join(lines)).groups()
        # a kernel that ran code (a kernel still importing when Lab shuts it down, with an
        # interrupt first, prints a KeyboardInterrupt traceback of its own)
        assert "up" in _run_in_kernel({"base": base, "token": token}, "print('up')")
        start = time.monotonic()
        proc.send_signal(getattr(signal, signame))
        proc.wait(30)
        seconds = time.monotonic() - start
    finally:
        if proc.poll() is None:
            kill_group(proc)
            proc.wait(10)
    for reader in readers:
        reader.join(5)
    report = f"status {proc.returncode} after {seconds:.1f} s\n{''.join(lines + errors)}"
    assert proc.returncode == 0, report
    assert seconds < 20, report
    assert "Traceback" not in "".join(errors), report
    assert wait_no_leftovers(name) == []
    assert wait_no_leftovers(str(tmp_path)) == []  # JupyterLab and kernels
    assert not list(tmp_path.glob("dask-mpi-launch-jupyter-*"))  # private dir gone
