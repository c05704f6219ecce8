import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from hypothesis import settings

# Without a GPU, Triton kernels run in Triton's interpreter. It must be chosen before anything imports
# triton (transformers may): its library functions are built for one mode or the other at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI explores the same examples every run (a red CI then means a real change); locally they vary.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

ROOT = Path(__file__).resolve().parent.parent  # the project's folder; pytest.ini puts it on the path

TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "llama2-tokenizer"
from llama_pkg.params import DEFAULT_SYSTEM_PROMPT as DEFAULT_SYSTEM  # noqa: E402  (the input's default)


def sentencepiece():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model"))


def recount(prompt, system=DEFAULT_SYSTEM):
    """An independent recount of a single-turn prompt's ids by Meta's rule, with SentencePiece."""
    return 1 + len(sentencepiece().encode(f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{prompt} [/INST]"))


@pytest.fixture(scope="session")
def tokenizer():
    from llama_pkg.tokenizer import Tokenizer

    return Tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="session")
def test_model(tmp_path_factory):
    """The tiny random Llama with the real Llama 2 tokenizer, built once per session."""
    from model_builders import build

    return build(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def engine(test_model):
    from llama_pkg.pipeline import Pipeline

    return Pipeline.load(str(test_model))


def reference_engine(folder, *args, **kwargs):
    """The batched engine with float32 Linears (LLAMA_PKG_CPU_WEIGHTS=float32): what tests compare with
    transformers' logits at float32 tolerances."""
    from llama_pkg.engine.llm_engine import LLMEngine

    with pytest.MonkeyPatch.context() as m:
        m.setenv("LLAMA_PKG_CPU_WEIGHTS", "float32")
        return LLMEngine(folder, *args, **kwargs)


def run(engine, **inputs):
    """One prediction through the engine: (chunks, metrics)."""
    from llama_pkg import runtime

    metrics = {}
    chunks = list(runtime.predict(engine, inputs, metrics.__setitem__))
    return chunks, metrics


class CogServer:
    """The real Cog HTTP server (coglet) on predict.py, started by `python -m llama_pkg serve`."""

    def __init__(self, weights, port, predictor="predict.py:Predictor", env=None, args=()):
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(Path(weights).parent / f"server-{port}.log", "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "llama_pkg", "serve", "--weights", str(weights),
                                      "--port", str(port), "--predictor", predictor, *args], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def health(self):

        return requests.get(f"{self.url}/health-check", timeout=5).json()

    def wait_ready(self, timeout=180, until=("READY",)):
        import time


        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.logs()[-3000:]}")
            try:
                status = self.health()["status"]
                if status in until:
                    return status
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not READY in {timeout} s: {self.logs()[-3000:]}")

    def logs(self):
        self.log.flush()
        return open(self.log.name).read()

    def predict(self, timeout=120, headers=None, stream=False, **inputs):
        """POST a prediction. coglet 0.23.1 frees its slot a moment after answering, so a request sent
        right after the previous answer can get 409: retried briefly, as a client should. stream: the
        response's body is read as it arrives (SSE), not at once when it ends."""
        for _ in range(100):
            r = requests.post(f"{self.url}/predictions", json={"input": inputs}, timeout=timeout, headers=headers,
                              stream=stream)
            if r.status_code != 409:
                return r
            self.busy_retries += 1
            time.sleep(0.02)
        return r

    busy_retries = 0

    def stop(self):
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except Exception:  # noqa: BLE001 - a server that ignores SIGTERM is killed
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


@contextlib.contextmanager
def package_log():
    """The package's log lines while the block runs, at INFO as runtime.configure_logging sets it."""
    lines, handler = [], logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("llama_pkg")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def concurrently(fn, jobs, timeout=600):
    """fn(**job) for every job, each on its own thread, all at once -> their results, in order."""
    out = [None] * len(jobs)

    def one(i):
        out[i] = fn(**jobs[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return out


def wait_for(condition, timeout=10):
    """True as soon as condition() is, False after `timeout` seconds."""
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.01)
    return True


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def openai_front(upstream_url, model):
    """`llama-pkg openai` in front of a Cog server, while the block runs: its URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_pkg", "openai", "--upstream", upstream_url, "--port",
                             str(port), "--model-name", model], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return requests.get(f"{url}/v1/models", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        assert wait_for(up, timeout=30), "the front did not start"
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def scrape(metrics_url):
    """A Prometheus text endpoint's samples: {name: value}, histograms as name_count / name_sum."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(metrics_url, timeout=10).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.name.endswith("_created") and "le" not in s.labels}


SERVER_SLOTS = 4  # concurrent predictions of the session's server (LLAMA_PKG_MAX_BATCH)


@pytest.fixture(scope="session")
def server(test_model):
    metrics_port = free_port()
    s = CogServer(test_model, free_port(), env={"LLAMA_PKG_MAX_BATCH": str(SERVER_SLOTS),
                                                "LLAMA_PKG_METRICS_PORT": str(metrics_port)})
    s.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def sse_events(response):
    """(event, data) pairs, each as soon as its bytes arrive (a streamed response: requests' iter_lines
    waits for 512 bytes or the end). Lines end at "\n" only: a chunk may hold other line breaks
    (U+2028, \x1c, \r), which JSON leaves unescaped and str.splitlines would cut at."""
    event, pending = None, b""
    for chunk in response.iter_content(chunk_size=None):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8").rstrip("\r")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                yield event, json.loads(line[6:])
