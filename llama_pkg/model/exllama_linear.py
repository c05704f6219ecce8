"""GPTQ 4-bit Linears on CUDA through ExLlamaV2 0.3.2's kernels, not its model: each packed Linear (q/k/v
and gate/up fused when their group indices agree) becomes one QMatrix, and a call is `gemm_half_q_half`:
its 4-bit kernel up to 32 rows, above that the matrix dequantized into a shared fp16 scratch and cuBLAS
(or cuBLAS on an fp16 copy kept from load, when memory allows). All run on the current stream without
synchronising, so they can be captured in a CUDA graph.
"""

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import settings
from .gptq import dequantize, read_tensors

log = logging.getLogger("llama_pkg")
DENSE_ROWS = 32  # ExLlamaV2's MAX_Q_GEMM_ROWS: above it, its GEMM dequantizes the whole matrix at every call


def _ext():
    from exllamav2 import ext

    return ext


# ExLlamaV2's own bound on the elements dequantized at once (config.max_dq_size). Its GEMM takes the
# dequantize + cuBLAS path above 32 rows only when the chunk of rows, rounded down to 128, covers the
# whole input: a bound from our scratch size would round to 0 for layers under 128 inputs and send
# every row count to the 4-bit kernel, a path ExLlamaV2 itself never takes. The scratch holds every
# matrix whole, so the chunk is always the whole matrix.
MAX_DQ_SIZE = 512 * 1024 ** 2


def check_shape(prefix, in_features, out_features, groups):
    """Refuse a layer ExLlamaV2 0.3.2's GPTQ kernel cannot run, naming it. From its source: each thread
    writes 4 output columns at once and steps through 32 input rows at a time (q_gemm_kernel_gptq.cuh),
    the group size is taken to be the power of two that covers the rows (q_matrix.cu), and the row
    permutation is held in 16 bits."""
    group = in_features // groups
    problems = []
    if in_features % 32:
        problems.append(f"{in_features} input features is not a multiple of 32")
    if out_features % 4:
        problems.append(f"{out_features} output features is not a multiple of 4")
    if groups > 1 and (group * groups != in_features or group < 32 or group & (group - 1)):
        problems.append(f"group size {in_features}/{groups} is not a power of two of at least 32")
    if in_features > 65536:
        problems.append(f"{in_features} input features is more than 65,536")
    if problems:
        raise ValueError(f"{prefix}: ExLlamaV2's GPTQ kernel cannot run this layer: {'; '.join(problems)}")


class QLinear:
    def __init__(self, tensors, out_features, scratch, dense=False):
        """tensors: qweight, qzeros, scales, g_idx on the GPU. ExLlamaV2's QMatrix keeps raw pointers to them
        and to the scratch (ext_qmatrix.cpp), so this object holds every one for as long as it lives.
        dense: also keep the fp16 weight [out, in] for batches over DENSE_ROWS rows (made first: ExLlamaV2
        shuffles qweight in place)."""
        self.tensors, self.out_features, self.scratch = tensors, out_features, scratch
        self.dense = dequantize(*(tensors[k] for k in ("qweight", "qzeros", "scales", "g_idx"))).half() if dense else None
        self.handle = _ext().make_q_matrix(tensors, scratch, max_dq_rows=MAX_DQ_SIZE // out_features)

    def __call__(self, x):
        if self.dense is not None and x.shape[0] > DENSE_ROWS:
            return F.linear(x, self.dense)
        out = torch.empty(x.shape[0], self.out_features, dtype=torch.float16, device=x.device)
        _ext().ext_c.gemm_half_q_half(x.contiguous(), self.handle, out, False)
        return out


class Concat:
    """Several matrices of the same input whose group indices differ (act-order): outputs side by side."""

    def __init__(self, parts):
        self.parts = parts

    def __call__(self, x):
        return torch.cat([p(x) for p in self.parts], dim=-1)


class Linears:
    """make_linear for model.Llama: the prefixes of Linears that read one input -> one callable."""

    def __init__(self, tensors, device, offset_qzeros=False, dense=False):
        self.tensors, self.device, self.offset_qzeros, self.dense = tensors, device, offset_qzeros, dense
        largest = max(t.shape[0] * 8 * t.shape[1] for n, t in tensors.items() if n.endswith(".qweight"))
        fused = max(sum(tensors[f"{p}.qweight"].shape[1] for p in group) * tensors[f"{group[0]}.qweight"].shape[0] * 8
                    for group in _groups(tensors))
        # one fp16 buffer for every matrix's dequantized weights (the >32-row path), as ExLlamaV2's scratch
        self.scratch = torch.empty(max(largest, fused), dtype=torch.float16, device=device)

    def _q(self, prefix):
        t = self.tensors
        qzeros = t[f"{prefix}.qzeros"]
        if self.offset_qzeros:  # gptq_v2 stores the zero points themselves, v1 stores them minus one
            qzeros = qzeros - 0b00010001000100010001000100010001
        qweight, scales = t[f"{prefix}.qweight"], t[f"{prefix}.scales"]
        g_idx = t.get(f"{prefix}.g_idx")
        if g_idx is None:  # older checkpoints: groups in order
            rows = qweight.shape[0] * 8
            g_idx = torch.arange(rows, dtype=torch.int32) // (rows // scales.shape[0])
        return {"qweight": qweight, "qzeros": qzeros, "scales": scales.half(), "g_idx": g_idx.int()}

    def __call__(self, prefixes):
        parts = [self._q(p) for p in prefixes]
        for prefix, q in zip(prefixes, parts):
            check_shape(prefix, q["qweight"].shape[0] * 8, q["qweight"].shape[1], q["scales"].shape[0])
        if all(torch.equal(p["g_idx"], parts[0]["g_idx"]) for p in parts):
            fused = {k: torch.cat([p[k] for p in parts], dim=1) for k in ("qweight", "qzeros", "scales")}
            return self._linear(dict(fused, g_idx=parts[0]["g_idx"]))
        return Concat([self._linear(p) for p in parts])

    def _linear(self, q):
        out_features = q["qweight"].shape[1]
        on_gpu = {k: v.to(self.device).contiguous() for k, v in q.items() if k != "g_idx"}
        on_gpu["g_idx"] = q["g_idx"].to(self.device)
        return QLinear(on_gpu, out_features, self.scratch, self.dense)


def _groups(tensors):
    """The fused prefixes of every layer (for sizing the scratch buffer)."""
    layers = {n.split(".")[2] for n in tensors if n.startswith("model.layers.")}
    for i in sorted(layers):
        p = f"model.layers.{i}."
        yield [p + f"self_attn.{n}_proj" for n in "qkv"]
        yield [p + "mlp.gate_proj", p + "mlp.up_proj"]


def load(folder, device="cuda"):
    """A GPTQ folder -> (float tensors of the rest, in fp16; Linears over the packed ones)."""
    from ..backends.exllamav2 import require_extension

    require_extension()
    folder = Path(folder)
    tensors = read_tensors(folder)
    config = json.loads((folder / "config.json").read_text())
    q = config.get("quantization_config") or {}
    if q.get("bits", 4) != 4:
        raise ValueError(f"{folder / 'config.json'}: only 4-bit GPTQ is supported, not {q.get('bits')}-bit")
    packed = {n: t for n, t in tensors.items() if n.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    rest = {n: t for n, t in tensors.items() if n not in packed}
    return rest, Linears(packed, device, offset_qzeros=q.get("checkpoint_format") == "gptq_v2",
                         dense=dense_copy(packed, device))


def dense_copy(packed, device):
    """Whether to keep fp16 copies of the weights (LLAMA_PKG_DENSE_WEIGHTS; auto: when they take at most
    half the GPU memory left after the 4-bit weights and the reserve). Logged either way."""
    choice = settings.choice("LLAMA_PKG_DENSE_WEIGHTS", ("auto", "0", "1"))
    dense = sum(t.numel() * 8 * 2 for n, t in packed.items() if n.endswith(".qweight"))
    if choice != "auto":
        made, why = choice == "1", "LLAMA_PKG_DENSE_WEIGHTS"
    else:
        four_bit = sum(t.numel() * t.element_size() for t in packed.values())
        free = torch.cuda.mem_get_info(device)[0] if torch.device(device).type == "cuda" else 0
        left = free - four_bit - (settings.integer("LLAMA_PKG_GPU_RESERVE_MB", low=0) << 20)
        made, why = dense <= left / 2, f"{left / 2**30:.1f} GiB free after the 4-bit weights and the reserve"
    log.info("fp16 copy of the GPTQ weights for batches over %d rows (%.1f GiB): %s (%s)", DENSE_ROWS, dense / 2**30,
             "made" if made else "not made", why)
    return made
