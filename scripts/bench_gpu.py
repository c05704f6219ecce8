"""GPU benchmark: a Llama-2-7B-shaped random GPTQ checkpoint through predict() and the bare ExLlamaV2 generator.

    python scripts/bench_gpu.py [--out results.json] [--folder /tmp/llama-2-7b-shaped-gptq] [--tokens 256]

Writes the checkpoint itself (32 layers, hidden 4096, intermediate 11008, vocab 32000, GPTQ 4-bit,
group 128, fp16 embeddings and lm_head, the real Llama 2 tokenizer), then measures in one run:
setup() time, time to first token at 128 and 2048 prompt tokens, decode tokens/s through predict()
with the default sampling settings, and the bare ExLlamaV2DynamicGenerator's tokens/s with the same
settings. Every figure is the best of --rounds; the two decode figures alternate within one run.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama_pkg.backends.gptq import quantization_config  # noqa: E402

SHAPE = dict(layers=32, hidden=4096, intermediate=11008, heads=32, vocab=32000, group=128)


def write_checkpoint(folder, s=SHAPE, seed=0, device="cuda"):
    """A random GPTQ checkpoint of shape s, one safetensors file per layer (random draws on `device`: fast on a GPU)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(seed)

    def fp16(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=device) * std).half().cpu()

    def gptq(prefix, n_in, n_out):
        groups = n_in // s["group"]
        return {f"{prefix}.qweight": torch.randint(-2**31, 2**31 - 1, (n_in // 8, n_out), generator=g, device=device,
                                                   dtype=torch.int32).cpu(),
                f"{prefix}.qzeros": torch.full((groups, n_out // 8), 0x77777777, dtype=torch.int32),
                f"{prefix}.scales": torch.full((groups, n_out), 0.6 / n_in ** 0.5 / 7, dtype=torch.float16),
                f"{prefix}.g_idx": torch.arange(n_in, dtype=torch.int32) // s["group"]}

    h, m = s["hidden"], s["intermediate"]
    for i in range(s["layers"]):
        p = f"model.layers.{i}"
        t = {f"{p}.input_layernorm.weight": torch.ones(h, dtype=torch.float16),
             f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.float16)}
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t.update(gptq(f"{p}.self_attn.{name}", h, h))
        t.update(gptq(f"{p}.mlp.gate_proj", h, m))
        t.update(gptq(f"{p}.mlp.up_proj", h, m))
        t.update(gptq(f"{p}.mlp.down_proj", m, h))
        save_file(t, str(folder / f"model-{i:05d}.safetensors"), metadata={"format": "pt"})
    save_file({"model.embed_tokens.weight": fp16(s["vocab"], h, std=1.0), "model.norm.weight": torch.ones(h).half(),
               "lm_head.weight": fp16(s["vocab"], h)}, str(folder / "model-embed.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": m,
              "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"], "num_key_value_heads": s["heads"],
              "vocab_size": s["vocab"], "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "tie_word_embeddings": False,
              "torch_dtype": "float16", "quantization_config": quantization_config(s["group"], False)}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(ROOT / "tests" / "fixtures" / "llama2-tokenizer" / name, folder / name)
    return folder


def prompt_of(n_tokens):
    """Inputs whose prompt is exactly n_tokens ids: BOS + n-1 times '▁hello' through a bare template."""
    return {"prompt": " ".join(["hello"] * (n_tokens - 1)), "prompt_template": "{prompt}"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--folder", default="/tmp/llama-2-7b-shaped-gptq")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    from llama_pkg import runtime
    from llama_pkg.backends.exllamav2 import sampler_settings
    from llama_pkg.engine import sampling_for
    from llama_pkg.params import validate

    t = time.perf_counter()
    folder = Path(a.folder) if (Path(a.folder) / "config.json").exists() else write_checkpoint(a.folder)
    written = time.perf_counter() - t
    torch.cuda.synchronize()
    t = time.perf_counter()
    engine = runtime.setup(folder)
    setup_s = time.perf_counter() - t
    assert engine.backend.name == "exllamav2"
    gen = engine.backend.generator
    results = {"card": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"),
               "attention": os.environ.get("LLAMA_PKG_EXL2_ATTENTION", "matmul"),
               "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
               "exllamav2": __import__("exllamav2").__version__, "checkpoint_write_s": round(written, 2),
               "setup_s": round(setup_s, 3)}

    def run(inputs):
        metrics = {}
        t0 = time.perf_counter()
        n = sum(1 for _ in runtime.predict(engine, inputs, metrics.__setitem__))
        return metrics, n, time.perf_counter() - t0

    for n in (128, 2048):
        ttft = [run({**prompt_of(n), "max_new_tokens": 1})[0] for _ in range(a.rounds)]
        assert ttft[0]["input_token_count"] == n, ttft[0]
        results[f"ttft_ms_prompt_{n}"] = round(min(m["time_to_first_token"] for m in ttft) * 1e3, 2)

    inputs = {**prompt_of(128), "max_new_tokens": a.tokens, "min_new_tokens": a.tokens, "seed": 1}
    ids = engine.prompt_ids(validate(inputs))

    def bare(sampling):
        from exllamav2.generator import ExLlamaV2DynamicJob

        job = ExLlamaV2DynamicJob(input_ids=torch.tensor([ids]), max_new_tokens=a.tokens, min_new_tokens=a.tokens,
                                  gen_settings=sampler_settings(sampling), seed=1, stop_conditions=[2])
        gen.enqueue(job)
        first, n = None, 0
        while gen.num_remaining_jobs():
            for r in gen.iterate():
                k = r["token_ids"].shape[-1] if "token_ids" in r else 0
                k += r.get("held", {}).get("token_ids", torch.zeros(1, 0)).shape[-1] if r.get("eos") else 0
                if k and first is None:
                    first = time.perf_counter()
                    k -= 1
                n += k
        return n / (time.perf_counter() - first)

    for label, top_k in (("", 0), ("_top_k_50", 50)):
        sampling = sampling_for(validate({**inputs, "top_k": top_k}), a.tokens, seed=1)
        bare(sampling)  # a first generation after load or a settings change runs cold; not counted
        bare_tps, engine_tps = [], []
        for _ in range(a.rounds):
            bare_tps.append(bare(sampling))
            metrics, _, _ = run({**inputs, "top_k": top_k})
            assert metrics["output_token_count"] == a.tokens, metrics
            engine_tps.append(metrics["tokens_per_second"])
        results.update({f"bare_generator_tok_s{label}": round(max(bare_tps), 1),
                        f"predict_tok_s{label}": round(max(engine_tps), 1),
                        f"predict_vs_bare{label}": round(max(engine_tps) / max(bare_tps), 4),
                        f"bare_all{label}": [round(x, 1) for x in bare_tps],
                        f"predict_all{label}": [round(x, 1) for x in engine_tps]})
    results.update({"decode_tokens": a.tokens, "sampling": "defaults (temperature 0.7, top_p 0.95, top_k 0, "
                    "repetition_penalty 1.15); the _top_k_50 figures change only top_k",
                    "gpu_memory_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)})
    text = json.dumps(results, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
