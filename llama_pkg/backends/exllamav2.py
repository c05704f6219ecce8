"""The CUDA default: GPTQ 4-bit weights through ExLlamaV2 0.3.2's dynamic generator, one prediction at a
time. ExLlamaV2 is archived, so its traps are handled here (docs/exllamav2.md: sampler defaults, EOS,
the non-causal SDPA prefill, cache length, unordered fp16 sums, the extension built at image build time).
"""

import importlib.util
import os

import torch

from .. import cdiv, settings

EXTENSIONS_DIR = "/opt/exllamav2-ext"


def causal_sdpa(q_states, k_states, v_states, scaling):
    """Causal attention of q_len queries that end a k_len-key sequence (bottom-right aligned), with
    grouped-query heads: (batch, q_len, heads, dim), (batch, k_len, kv_heads, dim) -> (batch, q_len, heads*dim).
    What ExLlamaV2's SDPA branch should compute for a causal prompt chunk."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    batch, q_len, heads, dim = q_states.shape
    k_len, groups = k_states.shape[1], heads // k_states.shape[2]
    q, k, v = q_states.transpose(1, 2), k_states.transpose(1, 2), v_states.transpose(1, 2)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    # Not an explicit mask: the lower-right causal bias keeps SDPA on its fused kernels when the chunk
    # continues a cached prefix (q_len < k_len), which is every prompt after the first (BOS is shared).
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q_len, k_len), scale=scaling)
    return out.transpose(1, 2).reshape(batch, q_len, heads * dim)


def _install_causal_sdpa():
    """Route ExLlamaV2's causal multi-token SDPA attention through causal_sdpa; everything else is unchanged."""
    from exllamav2.attn import ExLlamaV2Attention

    original = ExLlamaV2Attention._attn_torch
    if getattr(original, "causal_fix", False):
        return

    def _attn_torch(self, batch_size, q_len, q_states, k_states, v_states, attn_params, cfg, causal=True):
        if (causal and q_len > 1 and not cfg.no_sdpa and not cfg.attn_logit_softcapping and not self.sliding_window
                and attn_params.is_causal() and self.layer_idx not in attn_params.block_diag_layers):
            return causal_sdpa(q_states, k_states, v_states, self.scaling)
        return original(self, batch_size, q_len, q_states, k_states, v_states, attn_params, cfg, causal)

    _attn_torch.causal_fix = True
    ExLlamaV2Attention._attn_torch = _attn_torch


def _cache_length(context_length):
    return cdiv(context_length, 256) * 256


def sampler_settings(sampling):
    from exllamav2.generator import ExLlamaV2Sampler

    greedy = sampling.temperature == 0 or sampling.top_p == 0  # top_p 0 keeps the most likely token (0 is off there)
    return ExLlamaV2Sampler.Settings(
        temperature=1.0 if greedy else sampling.temperature,
        top_k=1 if greedy else sampling.top_k,
        top_p=0.0 if greedy or sampling.top_p >= 1.0 else sampling.top_p,
        token_repetition_penalty=sampling.repetition_penalty,
        token_repetition_range=-1,
        token_repetition_decay=0,
        token_presence_penalty=sampling.presence_penalty,
        token_frequency_penalty=sampling.frequency_penalty,
        min_p=0.0, top_a=0.0, tfs=0.0, typical=0.0, skew=0.0, smoothing_factor=0.0,
        min_temp=0.0, max_temp=0.0, temp_exponent=1.0, temperature_last=False,
        mirostat=False, dry_multiplier=0.0, xtc_probability=0.0,
    )


def build_extension():
    """Compile (or find) the ExLlamaV2 extension: run at image build time, never in setup()."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS_DIR)
    import exllamav2.ext  # noqa: F401  (importing it is what builds it)

    return os.environ["TORCH_EXTENSIONS_DIR"]


def _extension_is_built():
    if importlib.util.find_spec("exllamav2_ext") is not None:  # a prebuilt wheel or .so on the path
        return True
    root = os.environ.get("TORCH_EXTENSIONS_DIR", EXTENSIONS_DIR)
    return any(f.endswith(".so") for _, _, files in os.walk(root) for f in files if f.startswith("exllamav2_ext"))


def require_extension(allow_compile=None):
    """Before anything imports exllamav2: its extension must be built already, unless compiling is allowed."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS_DIR)
    if allow_compile is None:
        allow_compile = settings.get("LLAMA_PKG_ALLOW_COMPILE") == "1"
    if not allow_compile and not _extension_is_built():
        raise RuntimeError(
            f"the ExLlamaV2 extension is not built under {os.environ['TORCH_EXTENSIONS_DIR']} (set by "
            "TORCH_EXTENSIONS_DIR); build it once with `python -c 'from llama_pkg.backends.exllamav2 import "
            "build_extension; build_extension()'` (cog.yaml does this at image build time), or set "
            "LLAMA_PKG_ALLOW_COMPILE=1 to compile now (about 2 minutes)")


class ExLlamaV2Backend:
    name = "exllamav2"
    structured = False  # its generator draws with its own sampler: json_schema is refused by name
    concurrency = 1  # unpaged without flash-attn: its generator runs one job at a time

    def __init__(self, folder, context_length, allow_compile=None):
        require_extension(allow_compile)
        from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
        from exllamav2.generator import ExLlamaV2DynamicGenerator

        config = ExLlamaV2Config(str(folder))
        config.max_seq_len = context_length
        attention = settings.choice("LLAMA_PKG_EXL2_ATTENTION", ("matmul", "sdpa"))
        if attention == "sdpa":
            _install_causal_sdpa()
        config.no_sdpa = attention == "matmul"  # see the module docstring: 0.3.2's SDPA prefill is not causal
        self.context_length = context_length
        self.model = ExLlamaV2(config)
        self.cache = ExLlamaV2Cache(self.model, max_seq_len=_cache_length(context_length), lazy=True)
        self.model.load_autosplit(self.cache, progress=False)
        self.tokenizer = ExLlamaV2Tokenizer(config)
        paged = importlib.util.find_spec("flash_attn") is not None
        self.generator = ExLlamaV2DynamicGenerator(model=self.model, cache=self.cache, tokenizer=self.tokenizer,
                                                   paged=paged)

    def generate(self, prompt_ids, max_new_tokens, sampling, stop_ids, cancel=None, constraint=None):
        if constraint is not None:  # the pipeline refuses json_schema here first (structured is False)
            raise ValueError("json_schema is not supported by the exllamav2 backend")
        from exllamav2.generator import ExLlamaV2DynamicJob

        job = ExLlamaV2DynamicJob(
            input_ids=torch.tensor([prompt_ids], dtype=torch.long), max_new_tokens=max_new_tokens,
            min_new_tokens=sampling.min_new_tokens, gen_settings=sampler_settings(sampling), seed=sampling.seed,
            stop_conditions=sorted(stop_ids), decode_special_tokens=False)
        self.generator.enqueue(job)
        try:
            while cancel is None or not cancel.is_set():
                for result in self.generator.iterate():
                    if result.get("job") is not job or result.get("stage") != "streaming":
                        continue
                    if "token_ids" in result:
                        yield from result["token_ids"][0].tolist()
                    if result["eos"]:
                        held = result.get("held", {}).get("token_ids")
                        if held is not None:
                            yield from held[0].tolist()
                        return
        finally:
            if job in self.generator.active_jobs or job in self.generator.pending_jobs:
                self.generator.cancel(job)

    @torch.inference_mode()
    def logits(self, ids):
        """Logits for every position of one sequence (prefill only), as the transformers backend gives them."""
        from exllamav2 import ExLlamaV2Cache

        cache = ExLlamaV2Cache(self.model, max_seq_len=_cache_length(len(ids)))
        return self.model.forward(torch.tensor([ids]), cache=cache, last_id_only=False)[0].float().cpu()

    @torch.inference_mode()
    def step_logits(self, prompt_ids, next_ids):
        """Last-position logits after the prompt and after each of next_ids fed one at a time (the decode path)."""
        from exllamav2 import ExLlamaV2Cache

        cache = ExLlamaV2Cache(self.model, max_seq_len=_cache_length(len(prompt_ids) + len(next_ids)))
        out = [self.model.forward(torch.tensor([prompt_ids]), cache=cache, last_id_only=True)[0, -1].float().cpu()]
        for token in next_ids:
            out.append(self.model.forward(torch.tensor([[token]]), cache=cache, last_id_only=True)[0, -1].float().cpu())
        return torch.stack(out)
