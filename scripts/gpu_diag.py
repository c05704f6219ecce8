"""Where do ExLlamaV2 and the CPU reference part? Same weights through four paths, errors against HF fp32 CPU.

    python scripts/gpu_diag.py OUT.json
Paths: HF fp16 on the GPU (the noise floor of fp16), ExLlamaV2 on the fp16 float model, ExLlamaV2 on
its GPTQ twin vs HF's unpacked GPTQ, for several tiny shapes.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch


from llama_pkg import test_models
from llama_pkg.backends.exllamav2 import ExLlamaV2Backend
from llama_pkg.backends.hf import TransformersBackend

IDS = [1, 518, 25580, 29962, 3532, 14816, 29903, 6778, 13, 3629, 11473, 29889, 13, 29966, 829, 14816, 29903, 6778,
       13, 13, 5618, 338, 263, 11829, 29874, 29973, 518, 29914, 25580, 29962]
SHAPES = {"h64": dict(hidden=64, heads=2, kv_heads=2, intermediate=128),
          "h128-hd64": dict(hidden=128, heads=2, kv_heads=2, intermediate=256),
          "h256-hd128": dict(hidden=256, heads=2, kv_heads=2, intermediate=512)}


def err(a, b):
    e = (a - b).abs().max(dim=-1).values
    return {"rel_max": round(float((e / b.abs().max(dim=-1).values).max()), 4), "pos0": round(float(e[0]), 4),
            "last": round(float(e[-1]), 4)}


def main(out):
    results = {}
    for name, shape in SHAPES.items():
        with tempfile.TemporaryDirectory() as tmp:
            fl = test_models.build(Path(tmp) / "float", seed=0, **shape)
            gq = test_models.build_gptq(Path(tmp) / "gptq", group_size=32, seed=0, **shape)
            ref_f = TransformersBackend(fl, 4096).logits(IDS)
            ref_q = TransformersBackend(gq, 4096, gptq=True).logits(IDS)
            hf16 = TransformersBackend(fl, 4096, dtype=torch.float16)
            hf16.model.cuda()
            with torch.inference_mode():
                gpu16 = hf16.model(input_ids=torch.tensor([IDS]).cuda()).logits[0].float().cpu()
            r = {"hf_fp16_gpu_vs_fp32_cpu": err(gpu16, ref_f)}
            for label, folder, ref in (("exl_float", fl, ref_f), ("exl_gptq", gq, ref_q)):
                try:
                    r[label] = err(ExLlamaV2Backend(folder, 4096, allow_compile=True).logits(IDS), ref)
                except Exception as e:  # noqa: BLE001 - a diagnostic reports every failure and goes on
                    r[label] = f"{type(e).__name__}: {e}"[:300]
            results[name] = r
            print(name, json.dumps(r), flush=True)
    Path(out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
