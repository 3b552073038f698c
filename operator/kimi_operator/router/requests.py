"""Checks of an OpenAI request body before it goes anywhere (pure): the wrong type of a field, an
argument OpenAI would not recognise, a missing ``messages`` or ``prompt``: a 400 naming the field,
in OpenAI's error shape, and the engine never sees it.

SGLang's own extensions (top_k, min_p, regex, chat_template_kwargs, ...) pass. ``lora_path`` does
not: SGLang would apply whatever adapter it names, around the router's choice of model and around
the key's scope.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

_OPENAI_COMMON = {
    "model",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "max_tokens",
    "n",
    "presence_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "user",
    "metadata",
    "service_tier",
    "store",
}
_OPENAI_CHAT = {
    "messages",
    "audio",
    "function_call",
    "functions",
    "max_completion_tokens",
    "modalities",
    "parallel_tool_calls",
    "prediction",
    "prompt_cache_key",
    "reasoning_effort",
    "response_format",
    "safety_identifier",
    "tool_choice",
    "tools",
    "top_logprobs",
    "verbosity",
    "web_search_options",
}
_OPENAI_COMPLETIONS = {"prompt", "best_of", "echo", "suffix"}
# SGLang's extensions of both endpoints (sglang/srt/entrypoints/openai/protocol.py).
_SGLANG = {
    "top_k",
    "min_p",
    "min_tokens",
    "regex",
    "ebnf",
    "json_schema",
    "repetition_penalty",
    "stop_token_ids",
    "stop_regex",
    "no_stop_trim",
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "session_params",
    "separate_reasoning",
    "stream_reasoning",
    "chat_template_kwargs",
    "continue_final_message",
    "return_hidden_states",
    "sampling_seed",
    "priority",
    "rid",
    "extra_key",
    "cache_salt",
    "custom_params",
}
CHAT_FIELDS = frozenset(_OPENAI_COMMON | _OPENAI_CHAT | _SGLANG)
COMPLETION_FIELDS = frozenset(_OPENAI_COMMON | _OPENAI_COMPLETIONS | _SGLANG)
# Fields the router decides, never the client.
ROUTER_OWNED = frozenset({"lora_path"})
# Serialized Python the engine would run (when started with --enable-custom-logit-processor): no
# key may send code to the engines through the router.
REFUSED = frozenset({"custom_logit_processor"})


class Invalid(ValueError):
    """A ValueError: the caller answers it, like a body that is not JSON at all, with a 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _is_number(v: Any) -> bool:
    # Python's JSON reader takes NaN and Infinity, which are not JSON: no engine is sent them. (An
    # int is finite; math.isfinite would overflow on one of hundreds of digits.)
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or (isinstance(v, float) and math.isfinite(v))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_prompt(v: Any) -> bool:
    if isinstance(v, str):
        return True
    if not isinstance(v, list) or not v:
        return False
    if all(isinstance(x, str) for x in v) or all(_is_int(x) for x in v):
        return True
    return all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in v)


_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (lambda v: isinstance(v, str), "a string"),
    "stream": (lambda v: isinstance(v, bool), "a boolean"),
    "stream_options": (lambda v: isinstance(v, dict), "an object"),
    "temperature": (_is_number, "a number"),
    "top_p": (_is_number, "a number"),
    "min_p": (_is_number, "a number"),
    "frequency_penalty": (_is_number, "a number"),
    "presence_penalty": (_is_number, "a number"),
    "repetition_penalty": (_is_number, "a number"),
    "max_tokens": (_is_int, "an integer"),
    "max_completion_tokens": (_is_int, "an integer"),
    "min_tokens": (_is_int, "an integer"),
    "n": (_is_int, "an integer"),
    "seed": (_is_int, "an integer"),
    "top_k": (_is_int, "an integer"),
    "top_logprobs": (_is_int, "an integer"),
    "best_of": (_is_int, "an integer"),
    "echo": (lambda v: isinstance(v, bool), "a boolean"),
    "user": (lambda v: isinstance(v, str), "a string"),
    "stop": (lambda v: isinstance(v, str) or _is_str_list(v), "a string or a list of strings"),
    "logit_bias": (lambda v: isinstance(v, dict), "an object"),
    "tools": (lambda v: isinstance(v, list), "a list"),
    "chat_template_kwargs": (lambda v: isinstance(v, dict), "an object"),
    "prompt": (_is_prompt, "a string, a list of strings, a list of token ids or a list of lists of token ids"),
}


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise Invalid("'messages' must be a non-empty list of messages", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise Invalid(f"messages[{i}] must be an object", f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise Invalid(f"messages[{i}].role must be a non-empty string", f"messages[{i}].role")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise Invalid(f"messages[{i}].content must be a string or a list of parts", f"messages[{i}].content")


def check(body: Any, *, chat: bool) -> Mapping[str, Any]:
    """The body as a mapping, or :class:`Invalid` naming what is wrong."""
    if not isinstance(body, dict):
        raise Invalid("the request body must be a JSON object")
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for name in body:
        if name in ROUTER_OWNED:
            raise Invalid(f"'{name}' is not accepted: the adapter is chosen by 'model'", name)
        if name in REFUSED:
            raise Invalid(f"'{name}' is not accepted through this endpoint", name)
        if name not in allowed:
            raise Invalid(f"Unrecognized request argument supplied: {name}", name)
    if "model" not in body:
        raise Invalid("you must provide a model parameter", "model")
    for name, value in body.items():
        if value is None and name != "model":
            continue
        rule = _TYPES.get(name)
        if rule is not None and not rule[0](value):
            raise Invalid(f"'{name}' must be {rule[1]}", name)
    options = body.get("stream_options")
    if options is not None and "include_usage" in options and not isinstance(options["include_usage"], bool):
        raise Invalid("'stream_options.include_usage' must be a boolean", "stream_options.include_usage")
    if chat:
        _check_messages(body.get("messages"))
    elif body.get("prompt") is None:
        raise Invalid("you must provide a prompt parameter", "prompt")
    return body
