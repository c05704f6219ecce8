"""Write a tiny random Llama-architecture model with the real Llama 2 tokenizer (a few MB, seconds).

    python scripts/make_test_model.py OUT_DIR [--seed 0] [--hidden 64] [--layers 2] [--gptq [--group-size 32] [--act-order]]

Deterministic from the seed. The weights are random, so the text is gibberish, but every token path
(prompt rendering, tokenizing, sampling, stopping, metering) runs exactly as with Llama-2-7B-chat.
"""

import repo_root  # noqa: F401  (the repository's root on sys.path: tests.model_builders)
import argparse

from tests.model_builders import build, build_gptq


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
