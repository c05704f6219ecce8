"""GPTQ v1 4-bit packing, the layout ExLlamaV2 and TheBloke's checkpoints use. For W[out, in], input row k,
output column n: W[n, k] = scales[g, n] * (q[k, n] - (z[g, n] + 1)), g = g_idx[k], q = nibble k % 8 of
qweight[k // 8, n], z = nibble n % 8 of qzeros[g, n // 8]. Quantization here is symmetric round to
nearest per group, optionally act-order (rows given to groups in a random order).
"""

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def pack_nibbles(values, dim):
    """int tensor of 4-bit values -> int32, 8 values per word along `dim` (lowest nibble first)."""
    v = values.to(torch.int32).movedim(dim, 0)
    v = v.reshape(v.shape[0] // 8, 8, *v.shape[1:])
    words = torch.zeros(v.shape[0], *v.shape[2:], dtype=torch.int64)
    for i in range(8):
        words |= v[:, i].to(torch.int64) << (4 * i)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(0, dim).contiguous()


def unpack_nibbles(words, dim):
    w = words.movedim(dim, 0)
    v = (w.unsqueeze(1) >> SHIFTS.to(w.device).view(1, 8, *([1] * (w.dim() - 1)))) & 0xF
    return v.reshape(w.shape[0] * 8, *w.shape[1:]).movedim(0, dim)


def group_index(in_features, group_size, act_order, generator=None):
    if in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide {in_features} input features")
    g_idx = torch.arange(in_features, dtype=torch.int32) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=generator)]
    return g_idx


def quantize(weight, group_size=128, act_order=False, generator=None):
    """weight [out, in] float -> (qweight, qzeros, scales, g_idx) as GPTQ v1 tensors."""
    w = weight.float().t()  # [in, out]
    g_idx = group_index(w.shape[0], group_size, act_order, generator)
    groups = w.shape[0] // group_size
    scales = torch.zeros(groups, w.shape[1])
    for g in range(groups):
        scales[g] = w[g_idx == g].abs().amax(dim=0).clamp(min=1e-8) / 7
    scales = scales.half()
    q = torch.clamp(torch.round(w / scales.float()[g_idx]) + 8, 0, 15).to(torch.int32)
    qzeros = pack_nibbles(torch.full((groups, w.shape[1]), 7, dtype=torch.int32), dim=1)
    return pack_nibbles(q, dim=0), qzeros, scales, g_idx


def dequantize(qweight, qzeros, scales, g_idx):
    """GPTQ v1 tensors -> weight [out, in] float32."""
    q = unpack_nibbles(qweight, dim=0)
    z = unpack_nibbles(qzeros, dim=1)
    g = g_idx.long()
    return (scales.float()[g] * (q - (z[g] + 1)).float()).t().contiguous()


def quantization_config(group_size, act_order):
    return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": act_order, "sym": True,
            "checkpoint_format": "gptq"}


def pack_folder(src, dst, group_size=128, act_order=False, seed=0):
    """A float Llama folder -> a GPTQ folder: every attention/MLP Linear packed, the rest kept in fp16."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, t in read_tensors(src).items():
        prefix, _, leaf = name.rpartition(".")
        if leaf == "weight" and prefix.rpartition(".")[2] in LINEARS:
            qweight, qzeros, scales, g_idx = quantize(t, group_size, act_order, generator)
            tensors.update({f"{prefix}.qweight": qweight, f"{prefix}.qzeros": qzeros, f"{prefix}.scales": scales,
                            f"{prefix}.g_idx": g_idx})
        else:
            tensors[name] = t.half()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(group_size, act_order)
    config["dtype"] = "float16"
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "generation_config.json"):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


class LazyTensors(Mapping):
    """A folder's safetensors read one tensor at a time, when asked for: building the CPU's integer Linears
    from it never holds the whole checkpoint in memory as well."""

    def __init__(self, folder):
        self.files = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as handle:
                self.files.update(dict.fromkeys(handle.keys(), f))

    def __getitem__(self, name):
        with safe_open(str(self.files[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def __contains__(self, name):
        return name in self.files

    def __iter__(self):
        return iter(self.files)

    def __len__(self):
        return len(self.files)


def read_tensors(folder):
    tensors = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def unpacked_state_dict(folder):
    """A GPTQ folder's tensors with every packed Linear turned back into a float `.weight`."""
    tensors = read_tensors(folder)
    out = {}
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            prefix = name[: -len(".qweight")]
            out[f"{prefix}.weight"] = dequantize(t, tensors[f"{prefix}.qzeros"], tensors[f"{prefix}.scales"],
                                                 tensors[f"{prefix}.g_idx"])
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            out[name] = t.float()
    return out
