"""The transformers backend: the independent reference for the engine's forward, one prediction at a
time, drawing with the package's one sampler."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from ..grammar import fill_masks, words
from ..model.sampler import SamplerRows


class TransformersBackend:
    name = "transformers"
    concurrency = 1
    structured = True  # takes a json_schema constraint

    def __init__(self, folder, context_length, gptq=False, dtype=torch.float32):
        hf_logging.disable_progress_bar()
        self.model = _load_gptq(folder, dtype) if gptq else AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        self.model.eval()
        self.context_length = context_length
        self.vocab_size = self.model.config.vocab_size

    @torch.inference_mode()
    def logits(self, ids):
        """Logits for every position of one sequence (prefill only): the reference for other backends."""
        return self.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()

    @torch.inference_mode()
    def step_logits(self, prompt_ids, next_ids):
        """Last-position logits after the prompt and after each of next_ids fed one at a time (the decode path)."""
        out = self.model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        steps = [out.logits[0, -1].float()]
        for token in next_ids:
            out = self.model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[0, -1].float())
        return torch.stack(steps)

    @torch.inference_mode()
    def generate(self, prompt_ids, max_new_tokens, params, stop_ids, cancel=None, constraint=None):
        sampler, row = SamplerRows(1, self.vocab_size, "cpu"), torch.zeros(1, dtype=torch.long)
        sampler.admit(0, prompt_ids, params, stop_ids)
        masks = torch.full((1, words(self.vocab_size)), -1, dtype=torch.int32) if constraint is not None else None
        out = self.model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        for step in range(max_new_tokens):
            if cancel is not None and cancel.is_set():
                return
            if constraint is not None:
                fill_masks([(constraint, 0)], masks.data_ptr(), masks.shape[1] * 4, 1)
            token = int(sampler.draw(out.logits[0, -1:], row, torch.tensor([step]), masks)[0])
            if constraint is not None and token not in stop_ids and not constraint.consume(token):
                raise RuntimeError(f"json_schema: the grammar refused token {token}: {constraint.error}")
            yield token
            if token in stop_ids or (constraint is not None and constraint.done):
                return
            if step + 1 < max_new_tokens:
                out = self.model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)


def _load_gptq(folder, dtype):
    """A GPTQ folder on CPU: the packed weights unpacked to floats (exactly the values the 4-bit grid holds)."""
    from ..model.gptq import unpacked_state_dict

    config = AutoConfig.from_pretrained(str(folder))
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = unpacked_state_dict(folder)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=not config.tie_word_embeddings)
    return model
