"""Write a tiny random Llama-architecture model with the real Llama 2 tokenizer (a few MB, seconds).

    python scripts/make_test_model.py OUT_DIR [--seed 0] [--hidden 64] [--layers 2] [--gptq [--group-size 32] [--act-order]]

Deterministic from the seed. The weights are random, so the text is gibberish, but every token path
(prompt rendering, tokenizing, sampling, stopping, metering) runs exactly as with Llama-2-7B-chat.
"""

import argparse
import shutil
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT / "tests" / "fixtures" / "llama2-tokenizer"


def build(out, seed=0, hidden=64, layers=2, heads=2, kv_heads=2, intermediate=128, context=4096):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=context, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         pad_token_id=None, tie_word_embeddings=False, torch_dtype="float16")
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05 if p.dim() > 1 else 0.02).add_(1.0 if p.dim() == 1 else 0.0)
    out = Path(out)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / name, out / name)
    return out


def build_gptq(out, group_size=32, act_order=False, seed=0, **shape):
    """The same tiny model written as GPTQ v1 4-bit (the layout of TheBloke/Llama-2-7B-Chat-GPTQ)."""
    import tempfile

    from llama_pkg.backends.gptq import pack_folder

    with tempfile.TemporaryDirectory() as tmp:
        return pack_folder(build(Path(tmp) / "float", seed=seed, **shape), out, group_size, act_order, seed)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=128)
    ap.add_argument("--gptq", action="store_true", help="write GPTQ v1 4-bit instead of fp16")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--act-order", action="store_true")
    a = ap.parse_args()
    shape = dict(hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.heads, intermediate=a.intermediate)
    if a.gptq:
        print(build_gptq(a.out, a.group_size, a.act_order, a.seed, **shape))
    else:
        print(build(a.out, a.seed, **shape))


if __name__ == "__main__":
    main()
