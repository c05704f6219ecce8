"""The CPU image's checks, run by scripts/check_image.sh once it has built the image: the container started
with the demo model mounted and its port on 127.0.0.1 only, then its health, a JSON prediction, an SSE
stream, a cancel, 10 predictions at once (8 served, the rest 409), `docker stop` during a long answer
(drained, then cancelled within the grace, billed what streamed, exit 0) and a restart of the same
container. One JSON (image size, build seconds, cold start, each check) to --out; exit 1 on any failure.
"""

import argparse
import json
import subprocess
import threading
import time

import requests

from bench_http import lines  # scripts/ is on sys.path when run

GRACE_S = 3  # LLAMA_PKG_STOP_GRACE_S in the container: docker stop's answer is cancelled after it
SLOTS = 8  # the CPU engine's default batch, which serve gives Cog as its slots


def docker(*args, check=True):
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check)


def wait_ready(url, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            health = requests.get(f"{url}/health-check", timeout=2).json()
        except (requests.RequestException, ValueError):
            health = {}
        if health.get("status") == "READY":
            return time.time()
        if health.get("status") == "SETUP_FAILED":
            raise RuntimeError(f"setup failed: {str((health.get('setup') or {}).get('logs'))[-600:]}")
        time.sleep(0.25)
    raise TimeoutError(f"not READY within {timeout} s")


def sse(url, inputs, on_chunk=None, pid=None):
    """(chunks, the completed event) of one SSE prediction; on_chunk(n) after each chunk."""
    r = requests.request("PUT" if pid else "POST", f"{url}/predictions" + (f"/{pid}" if pid else ""),
                         json={"input": inputs}, headers={"Accept": "text/event-stream"}, stream=True, timeout=120)
    r.raise_for_status()
    chunks, done, event = [], None, None
    for line in lines(r):
        if line.startswith(b"event: "):
            event = line[7:].decode().strip()
        elif line.startswith(b"data: "):
            body = json.loads(line[6:])
            if event == "output":
                chunks.append(body["chunk"])
                if on_chunk:
                    on_chunk(len(chunks))
            elif event == "completed":
                done = body
    return chunks, done


def check_json(url):
    body = requests.post(f"{url}/predictions", json={"input": {"prompt": "What is the capital of France?",
                                                               "max_tokens": 16, "min_tokens": 16, "seed": 1}},
                         timeout=120).json()
    ok = body.get("status") == "succeeded" and body["metrics"]["output_token_count"] == 16
    return {"ok": ok, "status": body.get("status"), "text": "".join(body.get("output") or [])[:80]}


def check_sse(url):
    chunks, done = sse(url, {"prompt": "Tell me about llamas", "max_tokens": 24, "min_tokens": 24, "seed": 2})
    ok = bool(done) and done["status"] == "succeeded" and done["output"] == chunks and \
        done["metrics"]["output_token_count"] == 24
    return {"ok": ok, "chunks": len(chunks)}


def check_cancel(url):
    started = threading.Event()
    out = {}

    def run():
        out["chunks"], out["done"] = sse(url, {"prompt": "Hi", "max_tokens": 3000, "min_tokens": 3000},
                                         on_chunk=lambda n: n == 5 and started.set(), pid="check-cancel")

    t = threading.Thread(target=run)
    t.start()
    started.wait(60)
    cancelled = requests.post(f"{url}/predictions/check-cancel/cancel", timeout=10).status_code
    t.join(60)
    done = out.get("done") or {}
    billed = (done.get("metrics") or {}).get("output_token_count", -1)
    ok = cancelled == 200 and done.get("status") == "canceled" and len(out["chunks"]) <= billed < 3000
    return {"ok": ok, "status": done.get("status"), "chunks": len(out.get("chunks", [])), "billed": billed}


def check_ten_at_once(url):
    codes = [None] * 10

    def one(k):
        r = requests.post(f"{url}/predictions", json={"input": {"prompt": f"({k}) Hi", "max_tokens": 300,
                                                                "min_tokens": 300, "seed": k}}, timeout=300)
        codes[k] = r.status_code if r.status_code != 200 else r.json().get("status")

    threads = [threading.Thread(target=one, args=(k,)) for k in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    served, refused = codes.count("succeeded"), codes.count(409)
    return {"ok": served == SLOTS and refused == 10 - SLOTS, "served": served, "refused_409": refused}


def check_docker_stop(url, name):
    """docker stop mid-answer: new requests refused, the answer cancelled after the grace, billed what it
    streamed, the container's exit status 0, well within docker stop's own timeout."""
    streaming = threading.Event()
    out = {}

    def run():
        out["chunks"], out["done"] = sse(url, {"prompt": "Hi", "max_tokens": 3000, "min_tokens": 3000},
                                         on_chunk=lambda n: n == 5 and streaming.set())

    t = threading.Thread(target=run)
    t.start()
    streaming.wait(60)
    t0 = time.time()
    docker("stop", "-t", "60", name)
    stop_s = time.time() - t0
    t.join(60)
    done = out.get("done") or {}
    exit_code = int(docker("inspect", name, "--format", "{{.State.ExitCode}}").stdout)
    billed = (done.get("metrics") or {}).get("output_token_count", -1)
    ok = (done.get("status") == "canceled" and done.get("output") == out.get("chunks") and exit_code == 0
          and len(out["chunks"]) <= billed < 3000 and GRACE_S <= stop_s < GRACE_S + 15)
    return {"ok": ok, "stop_s": round(stop_s, 2), "status": done.get("status"), "billed": billed,
            "chunks": len(out.get("chunks", [])), "exit_code": exit_code}


def check_container(name):
    """Runs as a non-root user; the log of a clean run has no error line."""
    uid = docker("exec", name, "id", "-u").stdout.strip()
    logs = docker("logs", name).stdout + docker("logs", name).stderr
    errors = [line for line in logs.splitlines() if '"level":"ERROR"' in line or "Traceback" in line]
    return {"ok": uid != "0" and not errors, "uid": uid, "error_lines": errors[:5]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--demo", required=True, help="the demo model's folder, mounted read-only")
    ap.add_argument("--build-seconds", type=float)
    ap.add_argument("--build-cache", help="whether the build reused cached layers (used) or not (none)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    url = f"http://127.0.0.1:{a.port}"
    inspect = json.loads(docker("image", "inspect", a.image).stdout)[0]
    result = {"date": time.strftime("%Y-%m-%d"), "image": a.image, "base": inspect.get("Config", {}).get("Image"),
              "image_mb": round(inspect["Size"] / 1e6, 1), "build_s": a.build_seconds, "build_cache": a.build_cache,
              "checks": {}}
    t0 = time.time()
    docker("run", "-d", "--name", a.name, "-p", f"127.0.0.1:{a.port}:5000", "-v", f"{a.demo}:/weights/demo:ro",
           "-e", "COG_WEIGHTS=/weights/demo", "-e", f"LLAMA_PKG_STOP_GRACE_S={GRACE_S}", a.image)
    checks = result["checks"]
    try:
        result["cold_start_to_ready_s"] = round(wait_ready(url, 300) - t0, 1)
        checks["health"] = {"ok": True}
        for what, check in (("json", check_json), ("sse", check_sse), ("cancel", check_cancel),
                            ("ten_at_once", check_ten_at_once)):
            checks[what] = check(url)
            time.sleep(0.5)  # coglet 0.23.1 frees a slot a moment after its answer
        checks["container"] = check_container(a.name)
        checks["docker_stop"] = check_docker_stop(url, a.name)
        t1 = time.time()
        docker("start", a.name)
        restart = round(wait_ready(url, 300) - t1, 1)
        checks["restart"] = {**check_json(url), "to_ready_s": restart}
    except Exception as e:  # noqa: BLE001 - recorded as the failed check, with the container's log
        checks["error"] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                           "log_tail": docker("logs", "--tail", "30", a.name, check=False).stderr[-3000:]}
    result["ok"] = all(c.get("ok") for c in checks.values()) and "restart" in checks
    text = json.dumps(result, indent=2)
    print(text)
    with open(a.out, "w") as f:
        f.write(text + "\n")
    raise SystemExit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
