"""Cog adapter: typed inputs, then everything is llama_pkg's. The defaults, bounds and descriptions here
are literals because `cog build` reads them statically; tests/test_predict.py checks each equals its
one declaration in llama_pkg.params.

Predictions run concurrently (an async run): as many at once as Cog has slots. Its slots come from
COG_MAX_CONCURRENCY, which `python -m llama_pkg serve` sets to the engine's maximum batch, and
cog.yaml's `concurrency.max` in the image; `max=256` below is only the most this adapter allows.
The run returns a plain generator, so that Cog streams the text live (llama_pkg/cog_stream.py says why).
"""

from typing import Optional

from cog import BaseRunner, ConcatenateIterator, Input, Path, concurrent, current_scope, streaming

from llama_pkg import cog_stream, runtime
from llama_pkg.params import DEFAULT_SYSTEM_PROMPT, FIELDS


class Predictor(BaseRunner):
    def setup(self, weights: Optional[Path] = None) -> None:
        self.engine = runtime.setup(weights)
        cog_stream.install()

    @streaming
    @concurrent(max=256)
    async def run(
        self,
        prompt: Optional[str] = Input(
            description="The user's message (or give messages). For a Llama 2 model a dialog may be given as [INST] ... "
                        "[/INST] turns.",
            default=None, min_length=1,
        ),
        messages: Optional[str] = Input(
            description='A dialog instead of prompt: a JSON list of {"role": "system" | "user" | "assistant", "content": '
                        '"..."}, alternating user and assistant turns after an optional system message, ending with a '
                        "user turn. Contents are plain text, never parsed for tags.",
            default=None, min_length=1,
        ),
        system_prompt: str = Input(
            description="System prompt placed in the first turn; empty for none.", default=DEFAULT_SYSTEM_PROMPT
        ),
        max_tokens: int = Input(description="Most tokens to generate.", default=512, ge=1, le=4096),
        min_tokens: int = Input(
            description="Fewest tokens to generate before EOS may end the answer; -1 for off.", default=-1, ge=-1, le=4096
        ),
        max_new_tokens: Optional[int] = Input(
            description="Older name of max_tokens; give one of the two.", default=None, ge=1, le=4096, deprecated=True
        ),
        min_new_tokens: Optional[int] = Input(
            description="Older name of min_tokens; give one of the two.", default=None, ge=-1, le=4096, deprecated=True
        ),
        temperature: float = Input(description="Sampling temperature; 0 is greedy.", default=0.7, ge=0.0, le=5.0),
        top_p: float = Input(
            description="Nucleus sampling: keep the most likely tokens up to this probability mass (0: the most likely "
                        "only).", default=0.95, ge=0.0, le=1.0
        ),
        top_k: int = Input(description="Keep only the k most likely tokens; 0 or -1 for off.", default=0, ge=-1, le=32000),
        repetition_penalty: float = Input(
            description="Penalty for tokens already in the prompt or the answer; 1 for off.", default=1.15, ge=0.01, le=5.0
        ),
        presence_penalty: float = Input(description="Subtracted from tokens already in the prompt or the answer.",
                                        default=0.0, ge=-2.0, le=2.0),
        frequency_penalty: float = Input(
            description="Subtracted per occurrence of a token in the prompt and the answer.", default=0.0, ge=-2.0, le=2.0
        ),
        stop_sequences: str = Input(
            description='Comma-separated stop sequences, or a JSON list of strings such as ["a,b", "\\n\\n"].', default=""
        ),
        seed: Optional[int] = Input(description="Random seed; empty for a random one (it is logged).",
                                    default=None, ge=0, le=4294967295),
        prompt_template: str = Input(
            description="Custom template with {prompt} and optionally {system_prompt}; empty for the model's chat format.",
            default="",
        ),
        json_schema: str = Input(
            description="A JSON Schema the answer must be a JSON document of (constrained decoding); empty for free text.",
            default="",
        ),
    ) -> ConcatenateIterator[str]:
        inputs = {name: value for name, value in locals().items() if name in FIELDS}  # every input, by name
        return cog_stream.stream(self.engine, inputs, current_scope().record_metric)
