"""The request: every input's default and bounds, defined once, and validation that names the field.

predict.py's Cog `Input`s, the CLI and the Python API all go through `validate()`, so every entry
point rejects the same values with the same words.
"""

import json
import math
from dataclasses import dataclass, fields, replace

# Meta's default system prompt for Llama 2 chat, the default of Replicate's meta/llama-2-7b-chat (README: Inputs)
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does not "
    "make any sense, or is not factually coherent, explain why instead of answering something not correct. If you "
    "don't know the answer to a question, please don't share false information.")
MAX_SEED = 2**32 - 1
MAX_SCHEMA_CHARS = 32768


class InputError(ValueError):
    """A bad request value; `field` names the input."""

    def __init__(self, field, message):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Request:
    prompt: str = ""
    messages: str = ""  # a dialog as a JSON list of {role, content}; exclusive with prompt
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_tokens: int = 512
    min_tokens: int = -1
    max_new_tokens: int | None = None  # max_tokens' older name (Replicate renamed it)
    min_new_tokens: int | None = None  # min_tokens' older name
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    repetition_penalty: float = 1.15
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_sequences: str = ""
    seed: int | None = None
    prompt_template: str = ""
    json_schema: str = ""  # a JSON Schema the answer must validate against; empty: free text
    # set by validate(), not inputs: what the engine uses
    stops: tuple = ()  # stop_sequences as the list of stops to match
    max_new: int = 512  # max_tokens (or its older name)
    min_new: int = 0  # min_tokens (or its older name) with its "-1 is off" resolved (0: EOS may come at once)
    dialog: tuple = ()  # messages' user and assistant turns as (role, content); their system message is in system_prompt



@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are drawn, as every backend takes it: the inputs' defaults (Request),
    with min_new_tokens resolved within the budget and the seed chosen."""

    temperature: float = Request.temperature  # 0 means greedy
    top_p: float = Request.top_p
    top_k: int = Request.top_k  # 0 means off
    repetition_penalty: float = Request.repetition_penalty  # over every token in the context: prompt and output
    presence_penalty: float = Request.presence_penalty
    frequency_penalty: float = Request.frequency_penalty
    min_new_tokens: int = 0  # stop ids cannot be sampled before this many tokens
    seed: int = 0

    @classmethod
    def of(cls, request, max_new_tokens, seed):
        """A validated Request's settings for a generation of at most max_new_tokens."""
        same = {f.name: getattr(request, f.name) for f in fields(cls) if f.name not in ("min_new_tokens", "seed")}
        return cls(**same, min_new_tokens=min(request.min_new, max_new_tokens), seed=seed)

# name: (type, minimum, maximum, minimum is exclusive)
BOUNDS = {
    "max_tokens": (int, 1, 4096, False),
    "min_tokens": (int, -1, 4096, False),
    "max_new_tokens": (int, 1, 4096, False),
    "min_new_tokens": (int, -1, 4096, False),
    "temperature": (float, 0.0, 5.0, False),
    "top_p": (float, 0.0, 1.0, False),
    "top_k": (int, -1, 32000, False),
    "repetition_penalty": (float, 0.01, 5.0, False),
    "presence_penalty": (float, -2.0, 2.0, False),
    "frequency_penalty": (float, -2.0, 2.0, False),
    "seed": (int, 0, MAX_SEED, False),
}
FIELDS = tuple(f for f in Request.__dataclass_fields__ if f not in ("stops", "max_new", "min_new", "dialog"))  # the inputs

# What each input means, as clients read it in the schema (predict.py's literals must equal these:
# tests/test_predict.py).
DESCRIPTIONS = {
    "prompt": "The user's message (or give messages). For a Llama 2 model a dialog may be given as [INST] ... [/INST] "
              "turns.",
    "messages": 'A dialog instead of prompt: a JSON list of {"role": "system" | "user" | "assistant", "content": '
                '"..."}, alternating user and assistant turns after an optional system message, ending with a user '
                "turn. Contents are plain text, never parsed for tags.",
    "system_prompt": "System prompt placed in the first turn; empty for none.",
    "max_tokens": "Most tokens to generate.",
    "min_tokens": "Fewest tokens to generate before EOS may end the answer; -1 for off.",
    "max_new_tokens": "Older name of max_tokens; give one of the two.",
    "min_new_tokens": "Older name of min_tokens; give one of the two.",
    "temperature": "Sampling temperature; 0 is greedy.",
    "top_p": "Nucleus sampling: keep the most likely tokens up to this probability mass (0: the most likely only).",
    "top_k": "Keep only the k most likely tokens; 0 or -1 for off.",
    "repetition_penalty": "Penalty for tokens already in the prompt or the answer; 1 for off.",
    "presence_penalty": "Subtracted from tokens already in the prompt or the answer.",
    "frequency_penalty": "Subtracted per occurrence of a token in the prompt and the answer.",
    "stop_sequences": 'Comma-separated stop sequences, or a JSON list of strings such as ["a,b", "\\n\\n"].',
    "seed": "Random seed; empty for a random one (it is logged).",
    "prompt_template": "Custom template with {prompt} and optionally {system_prompt}; empty for the model's chat "
                       "format.",
    "json_schema": "A JSON Schema the answer must be a JSON document of (constrained decoding); empty for free text.",
}


def _number(name, value):
    kind, low, high, exclusive_low = BOUNDS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(name, f"must be a number, got {type(value).__name__} {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise InputError(name, f"must be an integer, got {value!r}")
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise InputError(name, f"must be a finite number, got {value!r}")
    if value < low or value > high or (exclusive_low and value == low):
        left = "(" if exclusive_low else "["
        raise InputError(name, f"must be in {left}{low}, {high}], got {value!r}")
    return value


def _text(name, value):
    if not isinstance(value, str):
        raise InputError(name, f"must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise InputError(name, "must not contain NUL characters")
    return value


def validate(raw):
    """A dict of input values (missing ones take their defaults) -> Request, or InputError."""
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise InputError(unknown[0], f"unknown input; known inputs are {', '.join(FIELDS)}")
    values = {}
    for name, value in raw.items():
        if name in ("seed", "max_new_tokens", "min_new_tokens") and value is None:
            values[name] = None
        elif name in ("prompt", "messages") and value is None:  # not given (Cog's default): one of the two is
            values[name] = ""
        elif name == "messages" and isinstance(value, list):  # the Python API may pass the list itself
            values[name] = value
        elif name in BOUNDS:
            values[name] = _number(name, value)
        else:
            values[name] = _text(name, value)
    request = Request(**values)
    if request.messages:
        if request.prompt:
            raise InputError("messages", "cannot be given with prompt: a request is one or the other")
        if request.prompt_template:
            raise InputError("prompt_template", "applies to prompt, not to messages: give one of the two")
        system, dialog = parse_messages(request.messages)
        if system is not None:
            if request.system_prompt not in ("", DEFAULT_SYSTEM_PROMPT):
                raise InputError("system_prompt", "cannot be given with a system message in messages: give one of the two")
            request = replace(request, system_prompt=system)
        request = replace(request, dialog=dialog)
    elif not request.prompt.strip():
        raise InputError("prompt", "is required and must not be empty (or give messages, a dialog)")
    max_name, max_new = _one_of(request, "max_tokens", "max_new_tokens")
    min_name, min_new = _one_of(request, "min_tokens", "min_new_tokens")
    if min_new > max_new:
        raise InputError(min_name, f"must not be above {max_name} ({max_new}), got {min_new}")
    if request.prompt_template and "{prompt}" not in request.prompt_template:
        raise InputError("prompt_template", "must contain {prompt}")
    if request.json_schema:
        _check_schema(request.json_schema)
    return replace(request, stops=tuple(parse_stop_sequences(request.stop_sequences)), max_new=max_new,
                   min_new=max(0, min_new), top_k=max(0, request.top_k))


def _one_of(request, name, older):
    """One input under two names (Replicate's and its older one) -> (the name given, the value). A name at
    its default counts as not given; two given values must agree."""
    value, old = getattr(request, name), getattr(request, older)
    if old is None:
        return name, value
    if value != Request.__dataclass_fields__[name].default and value != old:
        raise InputError(name, f"is {value} and {older}, its older name, is {old}: give one of the two")
    return older, old


def _check_schema(text):
    """json_schema's own checks (the grammar is compiled later, by the pipeline): size, JSON, an object."""
    if len(text) > MAX_SCHEMA_CHARS:
        raise InputError("json_schema", f"is {len(text)} characters, at most {MAX_SCHEMA_CHARS} are taken")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError("json_schema", f"is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(schema, dict):
        raise InputError("json_schema", f"must be a JSON object (a JSON Schema), got {type(schema).__name__}")


ROLES = ("system", "user", "assistant")


def parse_messages(value):
    """messages (a JSON list, or the list) -> (the system message's content or None, ((role, content), ...)):
    an optional system message first, then user and assistant turns alternating from a user turn to a
    user turn. Contents are kept as given (plain text: nothing in them is markup)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise InputError("messages", f"is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(value, list) or not value:
        raise InputError("messages", "must be a non-empty JSON list of {\"role\", \"content\"} objects")
    turns = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            keys = sorted(message) if isinstance(message, dict) else type(message).__name__
            raise InputError("messages", f"[{i}] must be an object with exactly role and content, got {keys}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise InputError("messages", f"[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str) or "\x00" in content:
            raise InputError("messages", f"[{i}].content must be a string without NUL characters")
        if role != "system" and not content.strip():
            raise InputError("messages", f"[{i}].content must not be empty")
        turns.append((role, content))
    system = turns.pop(0)[1] if turns[0][0] == "system" else None
    for i, (role, _) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            at = i + (system is not None)
            where = "only the first message may be the system message" if role == "system" else (
                "user and assistant turns alternate, from a user turn")
            raise InputError("messages", f"[{at}] is {'an' if role == 'assistant' else 'a'} {role} message where "
                                         f"{'an' if expected == 'assistant' else 'a'} {expected} one belongs: {where}")
    if not turns or turns[-1][0] != "user":
        raise InputError("messages", "the dialog must end with a user message")
    return system, tuple(turns)


def parse_stop_sequences(value):
    """Replicate's convention: comma-separated; a value whose first character is '[' is a JSON list of
    strings. Anything else is used verbatim (" [x" is the stop " [x")."""
    if value.startswith("["):
        try:
            stops = json.loads(value)
        except json.JSONDecodeError as e:
            raise InputError("stop_sequences", f"starts with '[' but is not a JSON list of strings: {e.msg}") from None
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise InputError("stop_sequences", "a JSON value must be a list of strings")
    else:
        stops = value.split(",")
    stops = [s for s in stops if s]
    if len(stops) > 16:
        raise InputError("stop_sequences", f"at most 16 stop sequences, got {len(stops)}")
    if any(len(s) > 256 for s in stops):
        raise InputError("stop_sequences", "each stop sequence must be at most 256 characters")
    return stops
