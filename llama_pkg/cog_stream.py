"""One prediction for Cog's server (coglet 0.23.1): its text streamed live, many at once, cancellable.
coglet streams a coroutine that *returns* a plain generator live (an async generator it collects), but
cancels it by calling cancel() on that coroutine's finished future: `install()` makes that call stop the
stream. Each stream also removes coglet's folder for its prediction. README: "What Cog's server does".
"""

import concurrent.futures
import contextvars
import logging
import threading
import types
import weakref
from importlib import metadata
from pathlib import Path

from cog import CancelationException

from . import runtime

log = logging.getLogger("llama_pkg")
TESTED_COGLET = "0.23.1"  # the coglet whose internals this module relies on (cog.yaml, README)
_cancels = weakref.WeakKeyDictionary()  # each stream (a generator) -> what cancels it
PREDICTIONS = Path("/tmp/coglet/predictions")  # coglet 0.23.1's folder per prediction, named by its id


def stream(engine, inputs, record_metric):
    """A prediction's text chunks as a plain generator, for an async run to return (see above). Called
    in the run: the generator runs in the run's context, by which Cog routes the prediction's log lines
    (coglet iterates it on a thread of its own, where that context is not set)."""
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


def install():
    """Make cancel() reach the streams (in the process that serves predictions; idempotent), and say so
    loudly when the serving coglet is not the version whose internals this module relies on."""
    concurrent.futures.Future.cancel = _cancel
    try:
        running = metadata.version("coglet")
    except metadata.PackageNotFoundError:
        running = None
    if running != TESTED_COGLET:
        log.warning("coglet %s serves, this package is tested with coglet %s: live streaming, cancel and the "
                    "prediction-folder cleanup rely on its internals (build with COGLET_WHEEL=pypi:%s)",
                    running or "(not installed)", TESTED_COGLET, TESTED_COGLET)
