"""llama_pkg.cog_stream: the generator Cog streams live, and cancel() reaching it as coglet 0.23.1 calls it
(on the finished concurrent future of the run's coroutine). The real server: tests/test_reliability.py."""

import asyncio
import concurrent.futures
import threading

import pytest
from cog import CancelationException

from llama_pkg import cog_stream


@pytest.fixture(autouse=True, scope="module")
def installed():
    cog_stream.install()
    yield
    concurrent.futures.Future.cancel = cog_stream._future_cancel


def submitted(coroutine):
    """The coroutine run as coglet runs an async prediction: run_coroutine_threadsafe on a loop thread,
    the future finished once the coroutine has returned."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    future = asyncio.run_coroutine_threadsafe(coroutine, loop)
    future.result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    return future


async def returns(value):
    return value


def test_cancel_stops_a_stream_mid_answer_with_its_final_metrics(engine):
    metrics = {}
    future = submitted(returns(cog_stream.stream(engine, {"prompt": "Hi", "max_new_tokens": 200, "min_new_tokens": 200,
                                                          "seed": 1}, metrics.__setitem__)))
    chunks = future.result()
    first = [next(chunks) for _ in range(3)]
    assert future.cancel() is False and not future.cancelled()  # what cancel() says of a finished future
    with pytest.raises(CancelationException):
        for chunk in chunks:
            first.append(chunk)
    assert first and 3 <= metrics["output_token_count"] < 200  # stopped within a step, billed as sampled
    assert metrics["input_token_count"] > 0


def test_an_uncancelled_stream_ends_normally(engine):
    metrics = {}
    chunks = submitted(returns(cog_stream.stream(engine, {"prompt": "Hi", "max_new_tokens": 5, "min_new_tokens": 5},
                                                 metrics.__setitem__))).result()
    assert "".join(chunks) and metrics["output_token_count"] == 5  # the backend's own end is no cancel
    assert metrics["finish_reason"] == "length"


def test_a_document_cut_by_max_tokens_is_said_so_not_a_cancel(engine):
    """The backend sets the stream's stop event when it ends: that end is max_tokens, not a cancel (the log
    said "a cancel" for every cut document over HTTP)."""
    from conftest import package_log

    metrics = {}
    with package_log() as lines:
        chunks = submitted(returns(cog_stream.stream(engine, {"prompt": "Hi", "max_tokens": 4, "seed": 0,
                                                              "json_schema": '{"type": "object"}'},
                                                     metrics.__setitem__))).result()
        list(chunks)
    assert metrics["truncated"] is True and metrics["finish_reason"] == "length"
    assert any("cut by max_tokens" in line for line in lines), lines


def test_cancel_before_the_first_chunk(engine):
    metrics = {}
    future = submitted(returns(cog_stream.stream(engine, {"prompt": "Hi", "max_new_tokens": 50}, metrics.__setitem__)))
    future.cancel()
    with pytest.raises(CancelationException):
        list(future.result())
    assert metrics == {"input_token_count": 0, "output_token_count": 0}  # nothing ran, nothing billed


def test_other_futures_cancel_as_before():
    pending = concurrent.futures.Future()
    assert pending.cancel() is True and pending.cancelled()
    for result in ([1, 2], (c for c in "ab"), None):
        done = concurrent.futures.Future()
        done.set_result(result)
        assert done.cancel() is False and not done.cancelled()
    failed = concurrent.futures.Future()
    failed.set_exception(RuntimeError("x"))
    assert failed.cancel() is False
    running = concurrent.futures.Future()
    assert running.set_running_or_notify_cancel() and running.cancel() is False


def test_remove_folder_removes_only_an_empty_prediction_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(cog_stream, "PREDICTIONS", tmp_path / "predictions")
    for name in ("done", "busy", "other"):
        for sub in ("inputs", "outputs"):
            (tmp_path / "predictions" / name / sub).mkdir(parents=True)
    (tmp_path / "predictions" / "busy" / "outputs" / "answer.txt").write_text("kept")
    (tmp_path / "outside").mkdir()
    cog_stream.remove_folder("done")
    cog_stream.remove_folder("busy")
    for bad in ("..", ".", "", "../outside", "other/inputs", "a\0b", None, 7):
        cog_stream.remove_folder(bad)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == ["outside", "predictions", "predictions/busy", "predictions/busy/outputs",
                    "predictions/busy/outputs/answer.txt", "predictions/other", "predictions/other/inputs",
                    "predictions/other/outputs"]
