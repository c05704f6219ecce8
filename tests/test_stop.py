"""`llama-pkg serve` stopping: SIGTERM or Ctrl-C drains for LLAMA_PKG_STOP_GRACE_S, then cancels what still
runs (billed what it streamed); a second signal cancels at once; a clean stop logs no error. Before, coglet
waited for every running answer however long, ignored a second Ctrl-C, and a Ctrl-C reaching its worker
left "Slot poisoned" in the log. Each test runs its own server on the tiny model."""

import contextlib
import signal
import threading
import time

import pytest

from conftest import CogServer, free_port, sse_events

pytestmark = pytest.mark.slow  # servers


@contextlib.contextmanager
def serving(test_model, grace):
    server = CogServer(test_model, free_port(), env={"LLAMA_PKG_MAX_BATCH": "2", "LLAMA_PKG_STOP_GRACE_S": str(grace)})
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def stream(server, tokens, out):
    """An SSE prediction of `tokens` tokens (no EOS before): out gets its chunks, then its end."""
    r = server.predict(prompt="Hi", max_tokens=tokens, min_tokens=tokens, seed=1, stream=True,
                       headers={"Accept": "text/event-stream"}, timeout=120)
    for event, data in sse_events(r):
        if event == "output":
            out.setdefault("chunks", []).append(data["chunk"])
        elif event == "completed":
            out["completed"], out["ended_at"] = data, time.monotonic()


def running(out):
    thread = threading.Thread(target=stream, args=out)
    thread.start()
    deadline = time.monotonic() + 30
    while len(out[2].get("chunks", [])) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert out[2].get("chunks"), "the prediction did not start"
    return thread


def billed_as_streamed(out):
    """The server's record of the answer is the text the client received, and the billed tokens are those
    chunks' (a chunk holds one token's text, or a few when a character spans tokens; the exact token-level
    check, against a ledger of sampled ids, is tests/test_reliability.py's)."""
    done = out["completed"]
    assert done["output"] == out["chunks"]
    assert len(out["chunks"]) <= done["metrics"]["output_token_count"] <= len(out["chunks"]) + 3 < 4000


def exit_status(server, timeout):
    try:
        return server.proc.wait(timeout)
    except Exception:  # noqa: BLE001 - reported as None: still running
        return None


def error_lines(server):
    return [line for line in server.logs().splitlines() if '"level":"ERROR"' in line or '"level":"WARN"' in line
            or "Traceback" in line or "poisoned" in line]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_drains_for_the_grace_then_cancels_billing_what_streamed(test_model, sig):
    with serving(test_model, grace=2) as server:
        out = {}
        thread = running((server, 4000, out))
        asked = time.monotonic()
        server.proc.send_signal(sig)
        thread.join(60)
        status = exit_status(server, 30)
        done = out["completed"]
        assert done["status"] == "canceled", done.get("status")
        assert 2 <= out["ended_at"] - asked < 6, out["ended_at"] - asked  # the grace, then the cancel
        billed_as_streamed(out)
        assert status == 0 and error_lines(server) == []


def test_an_answer_that_ends_within_the_grace_completes(test_model):
    with serving(test_model, grace=60) as server:
        out = {}
        thread = running((server, 600, out))
        server.proc.send_signal(signal.SIGTERM)
        thread.join(60)
        done = out["completed"]
        assert done["status"] == "succeeded" and done["metrics"]["output_token_count"] == 600
        assert done["output"] == out["chunks"]
        assert exit_status(server, 30) == 0 and error_lines(server) == []


def test_a_second_ctrl_c_cancels_at_once(test_model):
    with serving(test_model, grace=120) as server:
        out = {}
        thread = running((server, 4000, out))
        server.proc.send_signal(signal.SIGINT)
        time.sleep(1)
        assert "completed" not in out  # still draining; a new prediction is refused at once
        late = server.predict(prompt="Hi", max_tokens=3, timeout=10).json()
        assert late["status"] == "failed" and "the server is stopping" in late["error"], late
        again = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        thread.join(60)
        assert out["completed"]["status"] == "canceled" and out["ended_at"] - again < 3
        billed_as_streamed(out)
        assert exit_status(server, 30) == 0 and error_lines(server) == []
