"""The calls every entry point makes: load an engine, run one prediction with metering (a plain
generator for the CLI and tests, an async one for Cog's concurrent predictor)."""

import asyncio
import contextvars
import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from .engine import Engine
from .metering import Meter
from .params import validate


def configure_logging():
    """Log lines to stderr (Cog attaches them to the prediction's logs). Never prompt text."""
    logger = logging.getLogger("llama_pkg")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def setup(weights=None):
    configure_logging()
    return Engine.load(str(weights) if weights else None)


def predict(engine, inputs, record_metric, cancel=None):
    """Validate, stream, and record the metrics also when the prediction fails or is cancelled
    (the counts as they change, everything once more at the end)."""
    meter = Meter(record=record_metric)
    try:
        request = validate(inputs)
        yield from engine.stream(request, meter, cancel)
    finally:
        for name, value in meter.metrics().items():
            record_metric(name, value)


_workers = {}


def _executor(engine):
    """One thread per prediction in flight: it waits on the engine's token stream, never computes.
    Twice the engine's concurrency, so a cancelled prediction still winding down holds no new one back."""
    if engine not in _workers:
        _workers[engine] = ThreadPoolExecutor(max_workers=2 * engine.backend.concurrency,
                                              thread_name_prefix="llama_pkg-prediction")
    return _workers[engine]


async def predict_async(engine, inputs, record_metric):
    """predict() for an asyncio caller: the stream runs on a worker thread (with the prediction's
    context: Cog routes a thread's log lines and metrics by it) and its chunks come back through the
    event loop. Cog finalizes a cancelled prediction at once, with the metrics recorded until then:
    the worker records the billed counts as they change, and the generation stops at the engine's
    next step."""
    loop = asyncio.get_running_loop()
    chunks = asyncio.Queue()
    cancel = threading.Event()
    done = object()

    def work():
        try:
            for chunk in predict(engine, inputs, record_metric, cancel):
                loop.call_soon_threadsafe(chunks.put_nowait, chunk)
                if cancel.is_set():
                    break
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's side
            loop.call_soon_threadsafe(chunks.put_nowait, e)
        else:
            loop.call_soon_threadsafe(chunks.put_nowait, done)

    worker = _executor(engine).submit(contextvars.copy_context().run, work)
    try:
        while (item := await chunks.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()
        worker.result()  # at most one engine step: the final metrics are recorded before Cog reads them
