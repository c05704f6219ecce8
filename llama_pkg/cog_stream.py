"""One prediction for Cog's server (coglet 0.23.1): its text streamed live, many at once, cancellable.
coglet streams a coroutine that *returns* a plain generator live (an async generator it collects), but
cancels it by calling cancel() on that coroutine's finished future: `install()` makes that call stop the
stream. Each stream also removes coglet's folder for its prediction. `serve`'s stop reaches the running
streams through a pipe (watch_stop). What Cog's server does: docs/serving.md, "Reliability".
"""

import concurrent.futures
import contextvars
import inspect
import logging
import threading
import time
import types
import weakref
from importlib import metadata
from pathlib import Path

from cog import CancelationException

from . import runtime, settings

log = logging.getLogger("llama_pkg")
TESTED_COGLET = "0.23.1"  # the coglet whose internals this module relies on (cog.yaml, README)
_cancels = weakref.WeakKeyDictionary()  # each stream (a generator) -> what cancels it
_watching = False  # the stop pipe is watched (install is idempotent)
_draining = threading.Event()  # serve is stopping: no new prediction
PREDICTIONS = Path("/tmp/coglet/predictions")  # coglet 0.23.1's folder per prediction, named by its id


def stream(engine, inputs, record_metric):
    """A prediction's text chunks as a plain generator, for an async run to return (see above). Called
    in the run: the generator runs in the run's context, by which Cog routes the prediction's log lines
    (coglet iterates it on a thread of its own, where that context is not set)."""
    if _draining.is_set():
        raise RuntimeError("the server is stopping: send the request again (to another instance)")
    requested, stop = threading.Event(), threading.Event()  # the backend sets `stop` too, when it ends
    context = contextvars.copy_context()
    chunks = _chunks(engine, inputs, record_metric, requested, stop, context)
    _cancels[chunks] = lambda: (requested.set(), stop.set())
    return chunks


def _chunks(engine, inputs, record_metric, requested, stop, context):
    prediction, end = runtime.predict(engine, inputs, record_metric, stop), object()
    try:
        # After a cancel the backend stops at its next step and the pipeline ends, releasing what it held
        # back; every chunk up to there is still passed on (coglet sends it before "canceled"), so the
        # client receives the text of every billed token.
        while (chunk := context.run(next, prediction, end)) is not end:
            yield chunk
    finally:
        context.run(prediction.close)  # its final metrics are recorded before coglet ends the prediction
        remove_folder(next((v for var, v in context.items() if var.name == "_coglet_prediction_id"), None))
        # ^ coglet's log-routing variable, set in the run's context: the one place it says the id
    if requested.is_set():
        raise CancelationException("prediction cancelled")


def remove_folder(prediction_id):
    """The prediction's folder and its inputs/ and outputs/, those that are empty: only rmdir (never a
    file), only for a plain name (an id such as "../x" names no folder here)."""
    if not isinstance(prediction_id, str) or prediction_id in ("", ".", "..") or "/" in prediction_id:
        return
    folder = PREDICTIONS / prediction_id
    for path in (folder / "inputs", folder / "outputs", folder):
        try:
            path.rmdir()
        except (OSError, ValueError):  # not there, not empty, not a folder; a NUL in the name
            pass


_future_cancel = concurrent.futures.Future.cancel


def _cancel(future):
    if future.done() and not future.cancelled() and future.exception() is None:
        result = future.result()
        if isinstance(result, types.GeneratorType) and result in _cancels:
            _cancels[result]()
    return _future_cancel(future)


def cancel_all():
    """Cancel every running stream: each ends at the engine's next step, billed what it streamed."""
    for cancel in list(_cancels.values()):
        cancel()


def running():
    """The streams not yet ended (a stream coglet dropped unstarted goes when it is collected)."""
    return [g for g in list(_cancels) if inspect.getgeneratorstate(g) != inspect.GEN_CLOSED]


def watch_stop(path):
    """`serve`'s stop, through the pipe at `path` (the worker's main thread is held by coglet: no signal
    handler would run). "drain": new predictions are refused, and once none runs a file `idle` beside the
    pipe says so, for serve to stop coglet with nothing in flight (coglet stopping while a slot is busy
    logs "Slot poisoned"); "cancel": also cancel the running ones, billed what they streamed."""
    def watch():
        while True:
            try:
                with open(path, "rb") as pipe:  # waits for serve to open it
                    for word in (line.strip() for line in pipe):
                        if word in (b"drain", b"cancel") and not _draining.is_set():
                            _draining.set()
                            threading.Thread(target=report_idle, name="llama-pkg-idle", daemon=True).start()
                        if word == b"cancel":
                            log.info("serve is stopping: cancelling the running predictions")
                            cancel_all()
            except OSError:  # the pipe is gone: serve has ended
                return

    def report_idle():
        while running():
            time.sleep(0.05)
        Path(path).with_name("idle").touch()

    threading.Thread(target=watch, name="llama-pkg-stop", daemon=True).start()


def install():
    """Make cancel() reach the streams (in the process that serves predictions; idempotent), say so loudly
    when the serving coglet is not the version whose internals this module relies on, and take `serve`'s
    stop (LLAMA_PKG_STOP_FIFO)."""
    global _watching
    if not _watching and settings.get("LLAMA_PKG_STOP_FIFO"):
        _watching = True
        watch_stop(settings.get("LLAMA_PKG_STOP_FIFO"))
    concurrent.futures.Future.cancel = _cancel
    try:
        serving = metadata.version("coglet")
    except metadata.PackageNotFoundError:
        serving = None
    if serving != TESTED_COGLET:
        log.warning("coglet %s serves, this package is tested with coglet %s: live streaming, cancel and the "
                    "prediction-folder cleanup rely on its internals (build with COGLET_WHEEL=pypi:%s)",
                    serving or "(not installed)", TESTED_COGLET, TESTED_COGLET)
