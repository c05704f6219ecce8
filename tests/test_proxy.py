"""deploy/nginx.conf in front of the real Cog server: the prediction API passes, what coglet 0.23.1 would
trust is refused at the proxy, SSE passes unbuffered, cancel works. nginx is the distribution's (on
PATH, or fetched once with `apt-get download nginx` into ~/.cache/llama_pkg/nginx)."""

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import ROOT, CogServer, free_port, sse_events

pytestmark = pytest.mark.slow  # a Cog server and nginx
CACHE = Path.home() / ".cache" / "llama_pkg" / "nginx"


def nginx_binary():
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if found:
        return found
    binary = CACHE / "usr" / "sbin" / "nginx"
    if not binary.exists():
        with tempfile.TemporaryDirectory() as tmp:
            if subprocess.run(["apt-get", "download", "nginx"], cwd=tmp, capture_output=True, timeout=300).returncode:
                subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, timeout=300)
                subprocess.run(["apt-get", "download", "nginx"], cwd=tmp, check=True, capture_output=True, timeout=300)
            (deb,) = Path(tmp).glob("nginx_*.deb")
            unpacked = Path(tmp) / "root"  # unpacked beside, moved into place whole: never half a cache
            subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], check=True, timeout=120)
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(CACHE, ignore_errors=True)
            shutil.move(str(unpacked), str(CACHE))
    return str(binary)


class Proxy:
    def __init__(self, upstream_port, prefix):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = (ROOT / "deploy" / "nginx.conf").read_text()
        conf = conf.replace("server 127.0.0.1:5000;", f"server 127.0.0.1:{upstream_port};")
        conf = conf.replace("listen 0.0.0.0:8080;", f"listen 127.0.0.1:{self.port};")
        assert f"127.0.0.1:{upstream_port}" in conf and f"127.0.0.1:{self.port}" in conf
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        (prefix / "nginx.conf").write_text(conf)
        self.log = open(prefix / "nginx.log", "w")
        self.proc = subprocess.Popen([nginx_binary(), "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e",
                                      "stderr", "-g", "daemon off;"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while True:
            try:
                requests.get(f"{self.url}/health-check", timeout=2)
                return
            except requests.ConnectionError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"nginx did not start: {(prefix / 'nginx.log').read_text()}")
                time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def proxied(test_model, tmp_path_factory):
    server = CogServer(test_model, free_port(), env={"LLAMA_PKG_MAX_BATCH": "2"})
    try:
        server.wait_ready()
        proxy = Proxy(server.url.rsplit(":", 1)[1], tmp_path_factory.mktemp("nginx"))
        try:
            yield server, proxy
        finally:
            proxy.stop()
    finally:
        server.stop()


def test_the_prediction_api_passes(proxied):
    server, proxy = proxied
    assert requests.get(f"{proxy.url}/health-check", timeout=10).json()["status"] == "READY"
    assert "paths" in requests.get(f"{proxy.url}/openapi.json", timeout=10).json()
    body = requests.post(f"{proxy.url}/predictions", json={"input": {"prompt": "Hi", "max_new_tokens": 3}},
                         timeout=60).json()
    assert body["status"] == "succeeded" and re.fullmatch(r"[0-9a-f]{32}", body["id"])  # the proxy's id
    assert body["metrics"]["output_token_count"] == 3
    body = requests.put(f"{proxy.url}/predictions/my-id_1", json={"input": {"prompt": "Hi", "max_new_tokens": 3}},
                        timeout=60).json()
    assert body["status"] == "succeeded" and body["id"] == "my-id_1"


ATTACKS = [  # (what, method, path, json body, the proxy's or Cog's answer)
    ("a 256-character id", "PUT", "/predictions/" + "a" * 256, {"input": {"prompt": "Hi"}}, 404),
    ("a 65-character id", "PUT", "/predictions/" + "a" * 65, {"input": {"prompt": "Hi"}}, 404),
    ("an id that climbs out", "PUT", "/predictions/..%2F..%2Fsomewhere", {"input": {"prompt": "Hi"}}, 400),
    ("an id with a slash", "PUT", "/predictions/a%2Fb", {"input": {"prompt": "Hi"}}, 404),
    ("an id naming a file", "PUT", "/predictions/openapi_schema.json", {"input": {"prompt": "Hi"}}, 404),
    ("a long id in a POST body", "POST", "/predictions", {"id": "x" * 300, "input": {"prompt": "Hi"}}, 422),
    ("a climbing id in a POST body", "POST", "/predictions", {"id": "../../x", "input": {"prompt": "Hi"}}, 422),
    ("shutdown", "POST", "/shutdown", None, 404),
    ("reading a prediction", "GET", "/predictions/abc", None, 403),
    ("deleting a prediction", "DELETE", "/predictions/abc", None, 403),
    ("trainings", "POST", "/trainings", {"input": {}}, 404),
    ("a 2 MiB body", "POST", "/predictions", {"input": {"prompt": "x" * (2 << 20)}}, 413),
]


@pytest.mark.parametrize("what,method,path,body,status", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_what_coglet_would_trust_is_refused_and_the_server_stays_ready(proxied, what, method, path, body, status):
    server, proxy = proxied
    r = requests.request(method, f"{proxy.url}{path}", json=body, timeout=30)
    assert r.status_code == status, (what, r.status_code, r.text[:200])
    assert server.health()["status"] == "READY"


def test_after_every_attack_predictions_still_run(proxied):
    server, proxy = proxied
    for _, method, path, body, _ in ATTACKS:
        requests.request(method, f"{proxy.url}{path}", json=body, timeout=30)
    assert server.health()["status"] == "READY"
    body = requests.post(f"{proxy.url}/predictions", json={"input": {"prompt": "Hi", "max_new_tokens": 2}},
                         timeout=60).json()
    assert body["status"] == "succeeded"


def test_sse_passes_unbuffered(proxied):
    """Events arrive through the proxy as Cog sends them: the text's chunks and the token counts as they
    are generated, not all at the end."""
    _, proxy = proxied
    start = time.time()
    r = requests.post(f"{proxy.url}/predictions", json={"input": {"prompt": "Hi", "max_new_tokens": 400,
                                                                  "min_new_tokens": 400}},
                      headers={"Accept": "text/event-stream"}, stream=True, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    arrivals = [(event, time.time() - start) for event, _ in sse_events(r)]
    end = max(t for e, t in arrivals if e == "completed")
    assert end > 0.5, end  # long enough to tell "as generated" from "at the end"
    for kind in ("output", "metric"):
        times = [t for e, t in arrivals if e == kind]
        assert len(times) > 10 and sum(t < end / 2 for t in times) > len(times) / 5, (kind, times[:5], end)


def test_cancel_through_the_proxy(proxied):
    server, proxy = proxied
    out = {}
    t = threading.Thread(target=lambda: out.update(r=requests.put(
        f"{proxy.url}/predictions/cancel-me", json={"input": {"prompt": "Hi", "max_new_tokens": 4000,
                                                              "min_new_tokens": 4000}}, timeout=120)))
    t.start()
    time.sleep(0.3)  # let it generate a little: a cancel may also land before the first token
    deadline = time.time() + 20
    while time.time() < deadline:
        r = requests.post(f"{proxy.url}/predictions/cancel-me/cancel", timeout=10)
        if r.status_code == 200:
            break
        time.sleep(0.05)
    t.join(60)
    assert r.status_code == 200
    body = out["r"].json()
    assert body["status"] == "canceled" and body["metrics"]["output_token_count"] < 4000  # stopped early
    assert server.health()["status"] == "READY"
