"""Reference logits for the GPU check, computed on CPU by the transformers backend (committed as fixtures).

    python scripts/make_gptq_reference.py [OUT_DIR]     (default: tests/fixtures/gptq-reference)

For each tiny GPTQ test model (built deterministically by tests.model_builders.build_gptq) it records the
model file's sha256, a multi-token prompt, the CPU's greedy continuation, the logits of every fourth prompt
position (prefill) and the last-position logits after each greedy token fed one at a time (decode).
tests/test_gpu.py rebuilds the same model on the GPU machine and compares ExLlamaV2 with these.
"""

from repo_root import ROOT  # first: the repository's root on sys.path (tests.model_builders)
import argparse
import json
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from llama_pkg.backends.hf import TransformersBackend
from tests.model_builders import build_gptq
from llama_pkg.weights import sha256_file

CASES = {"g32": {"group_size": 32, "act_order": False}, "g64-act-order": {"group_size": 64, "act_order": True},
         "h256-g64": {"group_size": 64, "act_order": False, "hidden": 256, "heads": 2, "kv_heads": 2,
                      "intermediate": 512},
         "h256-g128-act-order": {"group_size": 128, "act_order": True, "hidden": 256, "heads": 2, "kv_heads": 2,
                                 "intermediate": 512}}
PROMPT = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is a llama? 🦙 [/INST]"
DECODE_STEPS = 6


def main(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, case in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            folder = build_gptq(Path(tmp) / name, seed=0, **case)
            backend = TransformersBackend(folder, 4096, gptq=True)
            from llama_pkg.tokenizer import Tokenizer

            ids = [1] + Tokenizer(folder).encode_text(PROMPT)
            positions = sorted(set(range(0, len(ids), 4)) | {len(ids) - 1})  # early ones catch a non-causal prefill
            prefill = backend.logits(ids)[positions]
            greedy = []
            for _ in range(DECODE_STEPS):
                greedy.append(int(backend.logits(ids + greedy)[-1].argmax()))
            steps = backend.step_logits(ids, greedy[:-1])
            meta = {"case": case, "model_sha256": sha256_file(folder / "model.safetensors"), "prompt_ids": ids,
                    "prefill_positions": positions, "greedy_ids": greedy}
            save_file({"prefill": prefill.half(), "steps": steps.half()}, str(out / f"{name}.safetensors"),
                      metadata={"json": json.dumps(meta)})
            print(name, meta["model_sha256"][:12], len(ids), greedy)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default=ROOT / "tests" / "fixtures" / "gptq-reference")
    main(ap.parse_args().out)
