"""predict.Predictor with an audited, fault-injectable backend, for the reliability tests' server.

- Ledger: every generation appends {"prompt_ids": n, "sampled": m, "billable": m less a final stop
  token, "ids": the sampled ids} to $LLAMA_PKG_TEST_LEDGER when it ends, however it ends, so tests can check the billed
  metrics against what the backend really did; and a line to $LLAMA_PKG_TEST_LEDGER.started when
  it starts (the server runs several at once, so "BUSY" no longer says one is running).
- Faults: $LLAMA_PKG_TEST_FAULTS names a JSON file read at each generation: {"prefill_sleep": s}
  stalls before the first token (a slow prefill), {"token_sleep": s} between tokens,
  {"raise_after": n} raises inside the backend after n tokens; {"only_prompt_ids": n} limits the
  faults to generations whose prompt is n ids long (one request among concurrent ones).
"""

import json
import os
import time

from predict import Predictor


class AuditedBackend:
    def __init__(self, inner):
        self.inner, self.name, self.context_length = inner, inner.name, inner.context_length
        self.concurrency, self.structured = inner.concurrency, inner.structured

    def generate(self, prompt_ids, max_new_tokens, sampling, stop_ids, cancel=None, constraint=None):
        faults = {}
        path = os.environ.get("LLAMA_PKG_TEST_FAULTS")
        if path and os.path.exists(path):
            faults = json.loads(open(path).read() or "{}")
            if faults.get("only_prompt_ids", len(prompt_ids)) != len(prompt_ids):
                faults = {}
        with open(os.environ["LLAMA_PKG_TEST_LEDGER"] + ".started", "a") as f:
            f.write(f"{len(prompt_ids)}\n")
        ids = []
        try:
            deadline = time.monotonic() + faults.get("prefill_sleep", 0)
            while time.monotonic() < deadline and not (cancel and cancel.is_set()):
                time.sleep(0.01)
            for token in self.inner.generate(prompt_ids, max_new_tokens, sampling, stop_ids, cancel, constraint):
                if len(ids) == faults.get("raise_after", -1):
                    raise RuntimeError("injected backend fault")
                ids.append(token)
                yield token
                time.sleep(faults.get("token_sleep", 0))
        finally:
            with open(os.environ["LLAMA_PKG_TEST_LEDGER"], "a") as f:
                f.write(json.dumps({"prompt_ids": len(prompt_ids), "sampled": len(ids),
                                    "billable": len(ids) - bool(ids and ids[-1] in stop_ids), "ids": ids}) + "\n")


class AuditPredictor(Predictor):
    def setup(self, weights=None):
        super().setup(weights)
        self.engine.backend = AuditedBackend(self.engine.backend)
