"""GPU benchmark: a Llama-2-7B-shaped random GPTQ checkpoint through predict() and the bare ExLlamaV2 generator.

    python scripts/bench_gpu.py [--out results.json] [--folder /tmp/llama-2-7b-shaped-gptq] [--tokens 256]

Writes the checkpoint itself (32 layers, hidden 4096, intermediate 11008, vocab 32000, GPTQ 4-bit,
group 128, fp16 embeddings and lm_head, the real Llama 2 tokenizer), then measures in one run:
setup() time, time to first token at 128 and 2048 prompt tokens, decode tokens/s through predict()
with the default sampling settings, and the bare ExLlamaV2DynamicGenerator's tokens/s with the same
settings. Every figure is the median (with the interquartile range) of --rounds (default 10); the two decode
figures alternate within one run and their ratio is the median of the paired per-round ratios.

Random weights give a nearly flat next-token distribution: tens of thousands of tokens above ExLlamaV2's
1e-6 floor, the worst case for its CPU top-p (a heap over every candidate, each token). A trained chat
model is far more confident. So the decode is measured a second time on the same checkpoint with an
lm_head that spreads the logits to a standard deviation of --peaked-logit-std (a confident model's
shape). The distribution's shape is reported for both: tokens above 1e-6 and the 0.95 nucleus at
temperature 0.7, at the end of the prompt.
"""

import repo_root  # noqa: F401  (the repository's root on sys.path: tests.model_builders)
import argparse
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from bench_stats import paired, quartiles, report  # scripts/ is on sys.path when run
from tests.model_builders import peaked_twin, write_checkpoint


def distribution_shape(engine, ids, temperature=0.7, top_p=0.95):
    """How many tokens ExLlamaV2's top-p has to handle: above its 1e-6 floor, and in the nucleus."""
    logits = engine.backend.logits(ids)[-1].double()
    probs = torch.softmax(logits / temperature, -1).sort(descending=True).values
    return {"tokens_above_1e-6": int((probs > 1e-6).sum()),
            "nucleus_0.95": int((probs.cumsum(0) < top_p).sum()) + 1, "top_prob": round(float(probs[0]), 4)}


FIRST_WORDS = "world table river green house music water stone light cloud paper".split()  # one token each


def prompt_of(n_tokens, first="hello"):
    """Inputs whose prompt is exactly n_tokens ids: BOS, '▁first', then '▁hello's, through a bare template.
    The generator reuses the previous prompt's cached prefix: a new first word makes a prompt fresh."""
    return {"prompt": " ".join([first] + ["hello"] * (n_tokens - 2)), "prompt_template": "{prompt}"}


def predict_metrics(engine, inputs):
    """One prediction through runtime.predict, as every entry point runs it; its recorded metrics."""
    from llama_pkg import runtime

    metrics = {}
    for _ in runtime.predict(engine, inputs, metrics.__setitem__):
        pass
    return metrics


def ttft_ms(engine, inputs):
    metrics = predict_metrics(engine, {**inputs, "max_tokens": 1})
    return metrics, round(metrics["time_to_first_token"] * 1e3, 2)


def ttft_figures(engine, rounds):
    """Time to first token of fresh prompts (nothing but BOS cached), the first call after setup included:
    it is what the first user gets. Then prompts of varied lengths (a per-shape cost would show), and chat
    requests that share the default system prompt, as real traffic does (its prefix comes from the cache)."""
    words = iter(FIRST_WORDS * 10)
    out = {}
    for n in (128, 2048):
        ttft = []
        for _ in range(rounds + 1):
            metrics, ms = ttft_ms(engine, prompt_of(n, next(words)))
            assert metrics["input_token_count"] == n, metrics
            ttft.append(ms)
        out[f"ttft_ms_prompt_{n}"] = round(statistics.median(ttft[1:]), 2)
        out[f"ttft_ms_prompt_{n}_iqr"] = quartiles(ttft[1:])["iqr"]
        out[f"ttft_ms_prompt_{n}_all"] = ttft
    varied = [ttft_ms(engine, prompt_of(n, next(words)))[1] for n in (100, 117, 133, 150, 171, 190, 230, 300, 400, 512)]
    out["ttft_ms_prompts_100_to_512"] = varied
    out["ttft_ms_chat_default_system_prompt"] = [
        ttft_ms(engine, {"prompt": f"Write a short poem about the {w}."})[1] for w in ("sea", "moon", "autumn forest")]
    return out


def bare_generator_tps(generator, ids, tokens, settings):
    """One job on the bare ExLlamaV2 dynamic generator: decode tok/s after the first token."""
    from exllamav2.generator import ExLlamaV2DynamicJob

    job = ExLlamaV2DynamicJob(input_ids=torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens,
                              gen_settings=settings, seed=1, stop_conditions=[2])
    generator.enqueue(job)
    first, n = None, 0
    while generator.num_remaining_jobs():
        for r in generator.iterate():
            k = r["token_ids"].shape[-1] if "token_ids" in r else 0
            k += r.get("held", {}).get("token_ids", torch.zeros(1, 0)).shape[-1] if r.get("eos") else 0
            if k and first is None:
                first = time.perf_counter()
                k -= 1
            n += k
    return n / (time.perf_counter() - first)


def decode_figures(engine, inputs, ids, tokens, rounds, top_k):
    """Decode tok/s after the first token, medians of `rounds`: the bare generator and predict(), alternating."""
    from llama_pkg.backends.exllamav2 import sampler_settings
    from llama_pkg.params import SamplingParams, validate

    gen = engine.backend.generator
    settings = sampler_settings(SamplingParams.of(validate({**inputs, "top_k": top_k}), tokens, seed=1))

    def bare():
        return bare_generator_tps(gen, ids, tokens, settings)

    def through_predict():
        metrics = predict_metrics(engine, {**inputs, "top_k": top_k})
        assert metrics["output_token_count"] == tokens, metrics
        return metrics["tokens_per_second"]

    bare()  # a first generation after load or a settings change runs cold; not counted
    bare_tps, predict_tps = [], []
    for _ in range(rounds):
        bare_tps.append(bare())
        predict_tps.append(through_predict())
    return {"bare_generator_tok_s": round(statistics.median(bare_tps), 1),
            "predict_tok_s": round(statistics.median(predict_tps), 1),
            "predict_vs_bare": paired(predict_tps, bare_tps, 4)["median"],
            "predict_vs_bare_iqr": paired(predict_tps, bare_tps, 4)["iqr"],
            "bare_all": [round(x, 1) for x in bare_tps], "predict_all": [round(x, 1) for x in predict_tps]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--folder", default="/tmp/llama-2-7b-shaped-gptq")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--peaked-logit-std", type=float, default=6.0, help="logit std of the peaked twin; 0 skips it")
    a = ap.parse_args()
    from llama_pkg import runtime
    from llama_pkg.params import validate

    t = time.perf_counter()
    folder = Path(a.folder) if (Path(a.folder) / "config.json").exists() else write_checkpoint(a.folder)
    written = time.perf_counter() - t
    setup_log = []  # Pipeline.load logs each step's time
    logging.getLogger("llama_pkg").addFilter(lambda r: setup_log.append(r.getMessage()) or True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    engine = runtime.setup(folder)
    setup_s = time.perf_counter() - t
    assert engine.backend.name == "exllamav2"
    results = {"card": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"),
               "attention": os.environ.get("LLAMA_PKG_EXL2_ATTENTION", "matmul"),
               "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
               "exllamav2": __import__("exllamav2").__version__, "checkpoint_write_s": round(written, 2),
               "setup_s": round(setup_s, 3), "setup_log": [m for m in setup_log if m.startswith("setup")]}

    results.update(ttft_figures(engine, a.rounds))

    inputs = {**prompt_of(128), "max_tokens": a.tokens, "min_tokens": a.tokens, "seed": 1}
    ids = engine.prompt_ids(validate(inputs))
    results["distribution"] = distribution_shape(engine, ids)
    for label, top_k in (("", 0), ("_top_k_50", 50)):
        results.update({k + label: v for k, v in decode_figures(engine, inputs, ids, a.tokens, a.rounds, top_k).items()})
    results["gpu_memory_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)

    if a.peaked_logit_std:
        del engine
        torch.cuda.empty_cache()
        engine = runtime.setup(peaked_twin(folder, a.peaked_logit_std))
        results["peaked_logit_std"] = a.peaked_logit_std
        results["peaked_distribution"] = distribution_shape(engine, ids)
        results.update({f"peaked_{k}": v for k, v in decode_figures(engine, inputs, ids, a.tokens, a.rounds, 0).items()})
    results.update({"decode_tokens": a.tokens, "sampling": "defaults (temperature 0.7, top_p 0.95, top_k 0, "
                    "repetition_penalty 1.15); the _top_k_50 figures change only top_k"})
    report(results, a.out)


if __name__ == "__main__":
    main()
