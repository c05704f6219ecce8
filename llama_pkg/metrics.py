"""Prometheus metrics of the process that holds the engine, served on LLAMA_PKG_METRICS_PORT (off when
unset): what an autoscaler reads (requests running and waiting, e.g. KEDA's Prometheus scaler on
`llama_pkg:num_requests_waiting`) and the token counters and latencies. Names follow vLLM's, under the
prefix `llama_pkg:`; docs/serving.md: "Metrics".
"""

import logging
import time

log = logging.getLogger("llama_pkg")
PREFIX = "llama_pkg:"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    """The counters and histograms a Meter feeds, and gauges read from the pipeline when scraped."""

    def __init__(self, pipeline):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.pipeline = pipeline
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens billed (input_token_count)", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens billed (output_token_count)",
                                         registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "From a prediction's start to its first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Between two tokens of one prediction",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.setup = Gauge(PREFIX + "setup_seconds", "Seconds the model's setup took", registry=r)
        running = Gauge(PREFIX + "num_requests_running", "Predictions generating now", registry=r)
        waiting = Gauge(PREFIX + "num_requests_waiting", "Predictions queued for a place in the batch", registry=r)
        usage = Gauge(PREFIX + "kv_cache_usage_perc", "Fraction of the KV cache's blocks held by predictions",
                      registry=r)
        running.set_function(lambda: self._queues()[0])
        waiting.set_function(lambda: self._queues()[1])
        usage.set_function(self._kv_usage)
        self.active = 0  # predictions streaming (the backends without a scheduler)

    def _queues(self):
        scheduler = getattr(self.pipeline.backend, "scheduler", None)
        if scheduler is None:
            return self.active, 0
        return len(scheduler.running), len(scheduler.waiting)

    def _kv_usage(self):
        pool = getattr(self.pipeline.backend, "pool", None)
        if pool is None:
            return 0.0
        return (pool.blocks - len(pool.free) - len(pool.idle)) / pool.blocks

    def serve(self, port):
        from prometheus_client import start_http_server

        start_http_server(port, registry=self.registry)
        log.info("metrics on :%d/metrics (LLAMA_PKG_METRICS_PORT)", port)


class Observer:
    """One prediction's feed into Metrics (the Meter calls it)."""

    def __init__(self, metrics, clock=time.perf_counter):
        self.metrics, self.clock = metrics, clock
        self.started, self.last = clock(), None

    def prompt(self, n):
        self.metrics.prompt_tokens.inc(n)

    def token(self):
        now = self.clock()
        self.metrics.generation_tokens.inc()
        if self.last is None:
            self.metrics.ttft.observe(now - self.started)
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now
