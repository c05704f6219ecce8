"""Reference checks of the engine's decode path from outside its step: teacher forcing. Each case's prompt
runs through the serving path (prompt chunks, then batched decode steps: CUDA graphs on CUDA), and after
each step the forced id replaces the sampled one and the step's logits for that sequence are kept."""

import torch

from llama_pkg.engine.sequence import Sequence
from llama_pkg.params import SamplingParams

GREEDY = SamplingParams(temperature=0, top_p=1.0, repetition_penalty=1.0)


def teacher_forced_logits(engine, cases):
    """For each (prompt_ids, next_ids): the last position's logits after the prompt and after each of
    next_ids fed one at a time ([len(next_ids) + 1, vocab]), every case at once."""
    seqs = {Sequence(prompt, len(after) + 1, GREEDY, frozenset()): (list(after), []) for prompt, after in cases}
    runner = engine.runner
    run = runner.run

    def forcing(scheduled):
        ids = run(scheduled)
        for i, s in enumerate(s for s in scheduled if s.samples):
            if s in seqs:
                after, logits = seqs[s]
                logits.append(runner.logits[i].float().cpu())
                if s.generated < len(after):
                    ids[i] = after[s.generated]
        return ids

    runner.run = forcing  # an instance attribute: the engine's loop calls it from its next step on
    try:
        for s in seqs:
            engine.submit(s)
        for s in seqs:
            for _ in engine.tokens(s):
                pass
    finally:
        del runner.run
    return [torch.stack(logits) for _, logits in seqs.values()]
