"""Models the tests and benchmarks build: tiny random Llamas (float and GPTQ 4-bit) and a random GPTQ
checkpoint in Llama-2-7B's exact shape, all with the real Llama 2 tokenizer. Deterministic from a seed.

Needs transformers. Scripts import it as tests.model_builders (scripts/repo_root.py puts the repository's
root on sys.path); the tokenizer fixture is found beside this file, from any working directory.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from llama_pkg.model.gptq import quantization_config

TOKENIZER = Path(__file__).resolve().parent / "fixtures" / "llama2-tokenizer"


def build(out, seed=0, hidden=64, layers=2, heads=2, kv_heads=2, intermediate=128, context=4096):
    """A tiny random Llama in fp16 (a few MB, seconds): every token path runs as with Llama-2-7B-chat."""
    from transformers import LlamaConfig, LlamaForCausalLM

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

    from llama_pkg.model.gptq import pack_folder

    with tempfile.TemporaryDirectory() as tmp:
        return pack_folder(build(Path(tmp) / "float", seed=seed, **shape), out, group_size, act_order, seed)


SHAPE = dict(layers=32, hidden=4096, intermediate=11008, heads=32, vocab=32000, group=128)


def write_checkpoint(folder, s=SHAPE, seed=0, device="cuda"):
    """A random GPTQ checkpoint of shape s, one safetensors file per layer (random draws on `device`: fast on a GPU)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(seed)

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
    write_head(folder, s, lm_head_std=0.02, seed=seed, device=device)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": m,
              "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"], "num_key_value_heads": s["heads"],
              "vocab_size": s["vocab"], "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "tie_word_embeddings": False,
              "torch_dtype": "float16", "quantization_config": quantization_config(s["group"], False)}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / name, folder / name)
    return folder


def write_head(folder, s, lm_head_std, seed=0, device="cuda"):
    """Embeddings, final norm and lm_head; the lm_head's spread sets how peaked the next-token distribution is."""
    g = torch.Generator(device=device).manual_seed(seed + 1)

    def fp16(*shape, std):
        return (torch.randn(*shape, generator=g, device=device) * std).half().cpu()

    save_file({"model.embed_tokens.weight": fp16(s["vocab"], s["hidden"], std=1.0),
               "model.norm.weight": torch.ones(s["hidden"]).half(),
               "lm_head.weight": fp16(s["vocab"], s["hidden"], std=lm_head_std)},
              str(Path(folder) / "model-embed.safetensors"), metadata={"format": "pt"})


def peaked_twin(folder, logit_std, s=SHAPE):
    """The same checkpoint with another lm_head: the layer files are linked, only the head is written.
    The final norm leaves hidden states of RMS 1, so logits have std lm_head_std * sqrt(hidden)."""
    twin = Path(f"{folder}-peaked")
    twin.mkdir(exist_ok=True)
    for f in Path(folder).iterdir():
        if f.name != "model-embed.safetensors" and not (twin / f.name).exists():
            (twin / f.name).symlink_to(f.resolve())
    write_head(twin, s, logit_std / s["hidden"] ** 0.5)
    return twin
