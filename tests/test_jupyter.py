"""``--jupyter``: JupyterLab on the client rank, with auth, a kernel whose ``Client()``
reaches the TLS cluster, the dashboard through jupyter-server-proxy (rendered by a real
headless Chromium), and a clean end of the job on ``POST /api/shutdown``."""
from __future__ import annotations

import base64
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
        env={"DASK_MPI_LAUNCH__DASHBOARD": "True", "TMPDIR": str(tmp)}, cwd=tmp)
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
        url = dashboard = None
        while time.monotonic() < deadline and proc.poll() is None:
            text = "".join(lines)
            url = re.search(r"JupyterLab at (http://\S+)", text)
            dashboard = re.search(r"dashboard +(http://\S+)", text)
            if url and dashboard:
                break
            time.sleep(0.1)
        assert url and dashboard, (f"no JupyterLab URL after 60 s:\n{''.join(lines)}\n"
                                   f"{''.join(errors)}")
        state["url"] = url.group(1)
        base, token = re.fullmatch(r"(http://[^/]+)/lab\?token=(\S+)", state["url"]).groups()
        state.update(base=base, token=token, dashboard_port=int(
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
            "content": {"code": KERNEL_CODE, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
        }))
        out, deadline = [], time.monotonic() + 60
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
    text = "".join(out)
    assert "RESULT 42" in text, text
    assert "ADDRESS tls://" in text, text
    assert f"LINK /proxy/{lab['dashboard_port']}/status" in text, text
    assert "LEAK False" in text, text


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


def test_browser_renders_proxied_dashboard(lab):
    """Headless Chromium (DevTools protocol) loads the proxied dashboard; Bokeh's plots
    are canvases in shadow roots: they exist only once its websocket, through the proxy,
    delivered the document."""
    import websocket

    chromium = _chromium()
    if chromium is None:
        unavailable("no chromium (apt-get install chromium)")
    url = f"{lab['base']}/proxy/{lab['dashboard_port']}/status?token={lab['token']}"
    profile = tempfile.mkdtemp(dir=lab["tmp"])
    browser = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "--window-size=1400,1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 40
    try:
        port_file = Path(profile, "DevToolsActivePort")
        while not (port_file.exists() and port_file.read_text().strip()):
            assert browser.poll() is None, f"chromium exited with {browser.returncode}"
            assert time.monotonic() < deadline, "chromium: no DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=15,
                                         suppress_origin=True)
        ids = iter(range(1, 1 << 30))

        def call(method, **params):
            i = next(ids)
            ws.send(json.dumps({"id": i, "method": method, "params": params}))
            while True:
                message = json.loads(ws.recv())
                if message.get("id") == i:
                    return message.get("result", {})

        call("Page.navigate", url=url)
        canvases = 0
        while time.monotonic() < deadline:
            result = call("Runtime.evaluate", expression=COUNT_CANVASES, returnByValue=True)
            canvases = result.get("result", {}).get("value") or 0
            if canvases >= 3:
                time.sleep(1)  # let the first data arrive, for the screenshot
                break
            time.sleep(0.3)
        ARTIFACTS.mkdir(exist_ok=True)
        shot = call("Page.captureScreenshot", format="png")["data"]
        (ARTIFACTS / "jupyter-proxied-dashboard.png").write_bytes(base64.b64decode(shot))
        title = call("Runtime.evaluate", expression="document.title",
                     returnByValue=True)["result"].get("value", "")
        ws.close()
    finally:
        kill_group(browser)
        browser.wait(10)
    assert canvases >= 3, f"Bokeh did not render through the proxy ({canvases} canvases)"
    assert "Dask" in title


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


def test_interrupt_stops_jupyterlab(mpich, tmp_path):
    """Ctrl-C on mpiexec: JupyterLab and its kernels stop promptly, nothing is left."""
    import signal

    if not _has(mpich, "jupyterlab"):
        unavailable(f"jupyterlab is not installed in {mpich.path} (the [jupyter] extra)")
    name = f"jt{uuid.uuid4().hex[:8]}"
    proc = mpich.start([mpich.mpiexec, "-n", "3", str(mpich.bin / "dask-mpi-launch"),
                        "--jupyter", "--name", name], env={"TMPDIR": str(tmp_path)},
                       cwd=tmp_path)
    lines: list[str] = []
    errors: list[str] = []
    for stream, sink in ((proc.stdout, lines), (proc.stderr, errors)):
        threading.Thread(target=lambda s=stream, o=sink: o.extend(s), daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while not any("JupyterLab at" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines + errors)
            time.sleep(0.1)
        base, token = re.search(r"JupyterLab at (http://[^/]+)/lab\?token=(\S+)",
                                "".join(lines)).groups()
        status, body = _get(f"{base}/api/kernels", token, "POST", {"name": "python3"})
        assert status == 201, body
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
        assert time.monotonic() - start < 10
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            kill_group(proc)
            proc.wait(10)
    assert wait_no_leftovers(name) == []
    assert wait_no_leftovers(str(tmp_path)) == []
    assert not list(tmp_path.glob("dask-mpi-launch-jupyter-*"))
