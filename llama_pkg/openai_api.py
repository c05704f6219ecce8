"""OpenAI's request and response shapes in terms of this package's Cog inputs: a chat or completion
request -> the prediction's inputs (or an ApiError naming the OpenAI field), and the prediction's text,
finish reason and metering -> OpenAI's objects. No I/O here: openai_front.py serves it.

OpenAI's defaults apply where they differ from the predictor's (temperature 1, top_p 1, no repetition
penalty, no system prompt unless a system message is sent, max_tokens up to the context's end).
docs/serving.md: "OpenAI-compatible API" lists every field and what is refused.
"""

import json
import time
import uuid

from .params import BOUNDS

UPSTREAM_MAX_TOKENS = BOUNDS["max_tokens"][2]  # "as many as fit": the pipeline reduces it to the context's room
# Fields taken as they are (vLLM's extensions included: top_k, repetition_penalty, min_tokens)
COMMON = ("model", "max_tokens", "temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty",
          "stream", "stream_options", "response_format", "top_k", "repetition_penalty", "min_tokens", "user")
CHAT = COMMON + ("messages", "max_completion_tokens")
COMPLETION = COMMON + ("prompt",)
# Fields OpenAI defines that this server does not do: refused unless they hold their "off" value
UNSUPPORTED = {"n": (None, 1), "logprobs": (None, False, 0), "top_logprobs": (None, 0), "tools": (None, []),
               "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
               "parallel_tool_calls": (None,), "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
               "logit_bias": (None, {}), "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
               "store": (None, False), "metadata": (None, {}), "service_tier": (None, "auto", "default"),
               "reasoning_effort": (None,), "web_search_options": (None,)}
# predictor input -> the OpenAI field it came from, for errors the upstream names by its input
FIELD_OF_INPUT = {"max_tokens": "max_tokens", "min_tokens": "min_tokens", "temperature": "temperature",
                  "top_p": "top_p", "top_k": "top_k", "seed": "seed", "stop_sequences": "stop",
                  "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                  "repetition_penalty": "repetition_penalty", "json_schema": "response_format",
                  "messages": "messages", "prompt": "prompt", "system_prompt": "messages", "prompt_template": "prompt"}


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, type="invalid_request_error", code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param, message):
    return ApiError(400, f"{param}: {message}", param=param)


def chat_inputs(body, model):
    """A /v1/chat/completions body -> (the prediction's inputs, stream, include_usage, {input: the field it
    came from, where the name differs})."""
    _check_fields(body, CHAT)
    if "max_tokens" in body and "max_completion_tokens" in body and body["max_tokens"] != body["max_completion_tokens"]:
        raise bad("max_completion_tokens", "differs from max_tokens, its older name: give one of the two")
    inputs = _common(body, model, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens")
    if "messages" not in body:
        raise bad("messages", "is required")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of messages")
    inputs["messages"] = json.dumps([_message(i, m) for i, m in enumerate(messages)])
    inputs["system_prompt"] = ""  # the messages are the whole dialog: a system prompt only if one is sent
    renamed = {"max_tokens": "max_completion_tokens"} if "max_completion_tokens" in body else {}
    return inputs, *_stream(body), renamed


def completion_inputs(body, model):
    """A /v1/completions body -> (the prediction's inputs, stream, include_usage, renamed inputs): the prompt
    as raw text after BOS (no chat format), as a completion model reads it."""
    _check_fields(body, COMPLETION)
    inputs = _common(body, model, "max_tokens")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("prompt", "must be a string (or a list of one string; token ids and several prompts are not "
                            "supported)")
    inputs.update(prompt=prompt, prompt_template="{prompt}")
    return inputs, *_stream(body), {}


def _check_fields(body, known):
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name, value in body.items():
        if name in UNSUPPORTED:
            if not any(value == off and type(value) is type(off) for off in UNSUPPORTED[name]):
                raise bad(name, f"is not supported by this server (only {UNSUPPORTED[name][-1]!r} or null)")
        elif name not in known:
            raise ApiError(400, f"Unrecognized request argument supplied: {name}", param=name)


def _common(body, model, max_name):
    requested = body.get("model", model)
    if requested != model:
        raise ApiError(404, f"The model `{requested}` does not exist: this server serves `{model}`", param="model",
                       code="model_not_found")
    inputs = {"temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0, "max_tokens": UPSTREAM_MAX_TOKENS}
    for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k",
                 "repetition_penalty", "min_tokens"):
        if body.get(name) is not None:
            inputs[name] = body[name]
    if body.get(max_name) is not None:
        inputs["max_tokens"] = body[max_name]
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise bad("stop", "must be a string or a list of strings")
        inputs["stop_sequences"] = json.dumps(stops)
    fmt = body.get("response_format")
    if fmt is not None:
        inputs.update(_response_format(fmt))
    return inputs


def _response_format(fmt):
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": json.dumps({"type": "object"})}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise bad("response_format", "json_schema.schema must be a JSON Schema object")
        return {"json_schema": json.dumps(spec["schema"])}
    raise bad("response_format", 'type must be "text", "json_object" or "json_schema"')


def _message(i, m):
    """One OpenAI message -> {role, content} as the predictor's messages input takes it."""
    if not isinstance(m, dict):
        raise bad(f"messages[{i}]", "must be an object")
    extra = sorted(set(m) - {"role", "content"})
    if extra:
        raise bad(f"messages[{i}].{extra[0]}", "is not supported (messages take role and content)")
    role = {"developer": "system"}.get(m.get("role"), m.get("role"))
    if role not in ("system", "user", "assistant"):
        raise bad(f"messages[{i}].role", f"must be system, developer, user or assistant, got {m.get('role')!r}")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise bad(f"messages[{i}].content", "only text parts are supported")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise bad(f"messages[{i}].content", "must be a string or a list of text parts")
    return {"role": role, "content": content}


def _stream(body):
    stream, options = body.get("stream") or False, body.get("stream_options")
    if not isinstance(stream, bool):
        raise bad("stream", "must be a boolean")
    if options is not None and not stream:
        raise bad("stream_options", "is only allowed when stream is true")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise bad("stream_options", "takes include_usage only")
    return stream, bool((options or {}).get("include_usage"))


def input_error(message, renamed=None):
    """A failed prediction's error -> an ApiError 400 naming the OpenAI field, when the error is an input's
    ("Prediction failed: ... InputError: top_p: must be ..."); else None (a server error)."""
    marker = "InputError: "
    if marker not in message:
        return None
    text = message[message.index(marker) + len(marker):]
    if ":" not in text:
        return ApiError(400, text)
    name, reason = text.split(":", 1)
    return field_error(name, reason.strip(), renamed)


def field_error(name, reason, renamed=None):
    """An ApiError 400 for the Cog input `name`, said with the OpenAI field that carried it."""
    return bad((renamed or {}).get(name) or FIELD_OF_INPUT.get(name, name), reason)


def usage(metrics):
    prompt, completion = int(metrics.get("input_token_count", 0)), int(metrics.get("output_token_count", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Response:
    """One request's identity and the objects OpenAI sends back for it (chat or text completion)."""

    def __init__(self, chat, model):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _object(self, kind, choices, **more):
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **more}

    def whole(self, text, finish_reason, metrics):
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            return self._object("chat.completion", [choice], usage=usage(metrics))
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._object("text_completion", [choice], usage=usage(metrics))

    def chunk(self, text=None, finish_reason=None, first=False):
        """A streamed piece: text, or the end (finish_reason), or the chat's first (the role)."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._object("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._object("text_completion", [choice])

    def usage_chunk(self, metrics):
        return self._object("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage(metrics))
