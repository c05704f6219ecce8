"""The calls every entry point makes: load an engine, run one prediction with metering (a generator:
the CLI iterates it, and so does Cog's server, through cog_stream)."""

import logging
import sys

from .pipeline import Pipeline
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
    """Load the model; serve its Prometheus metrics when LLAMA_PKG_METRICS_PORT names a port."""
    from . import settings

    configure_logging()
    port = settings.integer("LLAMA_PKG_METRICS_PORT", low=0)  # read first: a bad value fails before the load
    engine = Pipeline.load(str(weights) if weights else None)
    if port:
        from .metrics import Metrics

        engine.metrics = Metrics(engine)
        engine.metrics.setup.set(engine.setup_seconds)
        engine.metrics.serve(port)
    return engine


def predict(engine, inputs, record_metric, cancel=None):
    """Validate, stream, and record the metrics also when the prediction fails or is cancelled
    (the counts as they change, everything once more at the end)."""
    metrics = getattr(engine, "metrics", None)
    observer = None
    if metrics is not None:
        from .metrics import Observer

        observer = Observer(metrics)
        metrics.active += 1
    meter = Meter(record=record_metric, observer=observer)
    try:
        request = validate(inputs)
        yield from engine.stream(request, meter, cancel)
    finally:
        if metrics is not None:
            metrics.active -= 1
        for name, value in meter.metrics().items():
            record_metric(name, value)
