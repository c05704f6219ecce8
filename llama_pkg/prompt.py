"""Prompt rendering: a request becomes segments the tokenizer turns into ids: Bos()/Eos() (special
tokens), Text (user text, always plain text: a typed "<s>" stays text) and Markup (a chat template's
text, whose special-token strings are real). Three renderers: llama2 (Meta's `chat_completion`, for
Llama 2 models), custom (a request's `prompt_template` after one BOS), template (the model's own chat
template, e.g. the SmolLM2 demo's).
"""

import re
from dataclasses import dataclass

from .params import InputError

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SYS_TAGS = ("<<SYS>>", "<</SYS>>")


@dataclass(frozen=True)
class Bos:
    pass


@dataclass(frozen=True)
class Eos:
    pass


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Markup:
    text: str


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    content: str


def parse_dialog(prompt):
    """A prompt, plain or marked up with [INST] ... [/INST] turns, -> alternating user/assistant turns.

    "[INST] Hi! [/INST]\\nHello!\\n[INST] How are you? [/INST]" is three turns; a plain prompt is one.
    The dialog must end with a user turn; tags must alternate and nothing may precede the first [INST].
    The <s> and </s> that the written-out format puts around exchanges are accepted where they belong
    (before an [INST]) and dropped: the renderer adds the real BOS and EOS tokens.
    """
    if B_INST not in prompt and E_INST not in prompt:
        return [Turn("user", prompt)]
    parts = re.split(r"(\[/?INST\])", prompt)
    for i in range(0, len(parts) - 1, 2):  # text before each [INST] or [/INST]
        if parts[i + 1] == B_INST:
            parts[i] = re.sub(r"(\s*</?s>)+\s*$", "", parts[i])
    if parts[0].strip():
        raise InputError("prompt", "text before the first [INST] tag; a marked-up dialog starts with [INST]")
    turns, expected = [], B_INST
    for i in range(1, len(parts), 2):
        tag, content = parts[i], parts[i + 1].strip()
        if tag != expected:
            raise InputError("prompt", f"unbalanced [INST] tags: found {tag} where {expected} was expected")
        if tag == B_INST:
            if not content:
                raise InputError("prompt", "empty user turn between [INST] and [/INST]")
            # kept as written but for the format's one space after [INST] and before [/INST]: the
            # renderer strips it as Meta does (which keeps a first message's leading whitespace)
            raw = parts[i + 1]
            raw = raw[1:] if raw.startswith(" ") else raw
            turns.append(Turn("user", raw[:-1] if raw.endswith(" ") else raw))
            expected = E_INST
        else:
            is_last = i + 2 >= len(parts)
            if content:
                if is_last:
                    raise InputError("prompt", "the dialog must end with a user turn ([INST] ... [/INST])")
                turns.append(Turn("assistant", content))
            elif not is_last:
                raise InputError("prompt", "empty assistant turn between [/INST] and [INST]")
            expected = B_INST
    if expected == E_INST:
        raise InputError("prompt", "unbalanced [INST] tags: the last [INST] has no [/INST]")
    return turns


def _check_no_sys_tags(field, text):
    for tag in SYS_TAGS:
        if tag in text:
            raise InputError(field, f"must not contain {tag}; the system prompt goes in system_prompt")


def render_llama2(turns, system_prompt, field="prompt"):
    """Meta's reference rule (llama/generation.py chat_completion): every exchange is BOS "[INST] user
    [/INST] answer " EOS; the last is BOS "[INST] user [/INST]". Each message is stripped, and the system
    block is merged into the first user message *before* that: "<<SYS>>\n{system}\n<</SYS>>\n\n{first}"
    loses whitespace at its outer ends only, so the system prompt's own and the first message's leading
    whitespace stay. A system prompt of only whitespace is none (the input's "empty for none").
    field: where the turns came from (prompt, or messages, whose contents may not hold [INST] tags either:
    Meta's code refuses all four tags in messages, which would otherwise read as turns of the dialog)."""
    for turn in turns:
        _check_no_sys_tags(field, turn.content)
        if field == "messages" and (B_INST in turn.content or E_INST in turn.content):
            raise InputError(field, "must not contain [INST] or [/INST]: in Llama 2's format they would read as "
                                    "turns of the dialog")
    _check_no_sys_tags("system_prompt", system_prompt)
    for tag in (B_INST, E_INST):
        if tag in system_prompt:
            raise InputError("system_prompt", f"must not contain {tag}")
    contents = [t.content for t in turns]
    if system_prompt.strip():
        contents[0] = B_SYS + system_prompt + E_SYS + contents[0]
    contents = [c.strip() for c in contents]
    segments = []
    for i in range(0, len(contents) - 1, 2):
        segments += [Bos(), Text(f"{B_INST} {contents[i]} {E_INST} {contents[i + 1]} "), Eos()]
    segments += [Bos(), Text(f"{B_INST} {contents[-1]} {E_INST}")]
    return segments


def render_custom(template, prompt, system_prompt):
    """Fill {prompt} and {system_prompt}; every other brace is literal text, never a format field."""
    pieces = re.split(r"(\{prompt\}|\{system_prompt\})", template)
    values = {"{prompt}": prompt, "{system_prompt}": system_prompt}
    return [Bos(), Text("".join(values.get(p, p) for p in pieces))]


# Placeholders for message contents while a chat template renders; they cannot occur in input
# because params.validate rejects NUL characters.
def _slot(i):
    return f"\x00{i}\x00"


def render_chat_template(template, turns, system_prompt, special_tokens):
    """Render with the model's Jinja chat template; message contents stay Text, the template's own text is Markup."""
    import jinja2.sandbox

    messages = ([{"role": "system", "content": _slot(0)}] if system_prompt.strip() else [])
    contents = [system_prompt.strip()] if messages else []
    for turn in turns:
        messages.append({"role": turn.role, "content": _slot(len(contents))})
        contents.append(turn.content.strip())
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    rendered = env.from_string(template).render(messages=messages, add_generation_prompt=True, **special_tokens)
    segments = []
    for i, piece in enumerate(re.split("\x00(\\d+)\x00", rendered)):
        if i % 2:
            segments.append(Text(contents[int(piece)]))
        elif piece:
            segments.append(Markup(piece))
    return segments


def model_template(chat_template):
    """A model folder's chat template -> the one rendering uses: None (Meta's Llama 2 rule) for a Llama 2
    model (no template, or one written in [INST] tags), else the template itself."""
    return None if not chat_template or B_INST in chat_template else chat_template


def render(request, chat_template=None, special_tokens=None):
    """The request's prompt as segments, by the rule that applies (see the module docstring)."""
    if request.prompt_template:
        return render_custom(request.prompt_template, request.prompt, request.system_prompt)
    if request.dialog:  # messages: the turns as given, their contents never parsed for tags
        turns, field = [Turn(role, content) for role, content in request.dialog], "messages"
    elif chat_template is None:  # Llama 2's format: a prompt may be a dialog in its [INST] tags
        turns, field = parse_dialog(request.prompt), "prompt"
    else:  # another model's format has no such tags: the prompt is the user's text, whatever it holds
        turns, field = [Turn("user", request.prompt)], "prompt"
    if chat_template is None:
        return render_llama2(turns, request.system_prompt, field)
    return render_chat_template(chat_template, turns, request.system_prompt, special_tokens or {})
