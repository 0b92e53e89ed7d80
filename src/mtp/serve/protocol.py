"""The OpenAI HTTP API as ``mtp serve`` speaks it: request fields checked into typed values, responses built.

Every field a client may send is either supported, accepted only at the value that means "off" (``n`` 1,
``presence_penalty`` 0, ``logprobs`` false, ...), or refused with a 400 that names it: nothing is silently
ignored. Errors are OpenAI's error object, ``{"error": {"message", "type", "param", "code"}}``, so the
official clients raise their usual exceptions.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 256
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed takes


class ApiError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                             413: "invalid_request_error", 422: "invalid_request_error",
                             429: "rate_limit_error"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


@dataclass
class Limits:
    """What one request may ask for (the server's flags)."""

    max_tokens: int = 1024  # most new tokens a request may ask for
    max_prompt_tokens: int = 4096
    context: int | None = None  # the model's context, prompt + new tokens
    default_temperature: float = 0.0
    default_top_p: float = 1.0
    default_top_k: int = 0


@dataclass
class Params:
    """One request, checked: what the engine and the response need."""

    kind: str  # "chat" | "completion"
    model: str
    messages: list[dict] | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = None  # None: up to the limits
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    echo: bool = False


# fields accepted only at their "off" value: {name: test that the value is off}
_OFF = {
    # JSON booleans are not numbers here (Python's True == 1), and a count is an integer (not 1.0)
    "n": lambda v: v is None or (_is_int(v) and v == 1),
    "presence_penalty": lambda v: v is None or (_is_number(v) and v == 0),
    "frequency_penalty": lambda v: v is None or (_is_number(v) and v == 0),
    "repetition_penalty": lambda v: v is None or (_is_number(v) and v == 1),
    "logprobs": lambda v: v in (None, False, 0),
    "top_logprobs": lambda v: v is None or (_is_int(v) and v == 0),
    "logit_bias": lambda v: v in (None, {}),
    "best_of": lambda v: v is None or (_is_int(v) and v == 1),
    "suffix": lambda v: v in (None, ""),
    "tools": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none"),
    "functions": lambda v: v in (None, []),
    "function_call": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: v in (None, True, False),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "store": lambda v: v in (None, False),
    "service_tier": lambda v: v in (None, "auto", "default"),
    "modalities": lambda v: v in (None, ["text"]),
}
_FREE = {"user", "metadata"}  # informational: accepted, not used for decoding
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "stream_options"}
_CHAT = _COMMON | {"messages", "max_completion_tokens"}
_COMPLETION = _COMMON | {"prompt", "echo"}
ROLES = ("system", "developer", "user", "assistant")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _number(body: dict, name: str, low: float, high: float, default: float, low_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise bad(f"'{name}' must be a finite number, got {_show(v)}", name)
    if v < low or v > high or (low_open and v == low):
        raise bad(f"'{name}' must be in {'(' if low_open else '['}{low:g}, {high:g}], got {v}", name)
    return float(v)


def _integer(body: dict, name: str, low: int, high: int | None, default):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise bad(f"'{name}' must be an integer, got {_show(v)}", name)
    if v < low or (high is not None and v > high):
        raise bad(f"'{name}' must be between {low} and {high}, got {v}" if high is not None else
                  f"'{name}' must be at least {low}, got {v}", name)
    return v


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def parse(body, kind: str, limits: Limits) -> Params:
    """A decoded JSON body of /v1/chat/completions (``kind`` "chat") or /v1/completions ("completion")."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    allowed = _CHAT if kind == "chat" else _COMPLETION
    unknown = sorted(k for k in body if k not in allowed and k not in _OFF and k not in _FREE)
    if unknown:
        raise bad(f"unsupported parameter{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}", unknown[0],
                  "unsupported_parameter")
    for name, is_off in _OFF.items():
        if name in body and not _safe(is_off, body[name]):
            raise bad(f"'{name}' = {_show(body[name])} is not supported by mtp serve (only its default)", name,
                      "unsupported_value")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: a model name from /v1/models", "model")
    p = Params(kind=kind, model=model)
    if kind == "chat":
        p.messages = _messages(body.get("messages"))
        if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
            raise bad("give 'max_tokens' or 'max_completion_tokens', not both", "max_completion_tokens")
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    else:
        p.prompt = _prompt(body.get("prompt"))
        p.echo = _flag(body, "echo")
        name = "max_tokens"
    p.max_tokens = _integer(body, name, 1, limits.max_tokens, None)
    if kind == "completion" and p.max_tokens is None:
        p.max_tokens = min(16, limits.max_tokens)  # OpenAI's default for completions
    p.temperature = _number(body, "temperature", 0, 2, limits.default_temperature)
    p.top_p = _number(body, "top_p", 0, 1, limits.default_top_p, low_open=True)
    p.top_k = _integer(body, "top_k", -1, None, limits.default_top_k)
    p.top_k = max(0, p.top_k)  # -1: all (vLLM's spelling)
    p.seed = _integer(body, "seed", *SEED_RANGE, None)
    p.stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not p.stream:
            raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise bad("'stream_options' takes {\"include_usage\": true|false}", "stream_options")
        if options.get("continuous_usage_stats"):
            raise bad("'stream_options.continuous_usage_stats' is not supported", "stream_options")
        p.include_usage = _flag(options, "include_usage", "stream_options.include_usage")
    p.stop = _stop(body.get("stop"))
    return p


def _safe(test, value) -> bool:
    try:
        return bool(test(value))
    except Exception:  # noqa: BLE001 - an unhashable or odd value is simply not "off"
        return False


def _flag(body: dict, name: str, shown: str | None = None) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"'{shown or name}' must be true or false, got {_show(v)}", shown or name)
    return v


def _stop(v) -> list[str]:
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("'stop' must be a string or a list of strings", "stop")
    if len(items) > MAX_STOP:
        raise bad(f"'stop' takes at most {MAX_STOP} strings, got {len(items)}", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in items):
        raise bad(f"'stop' strings may be at most {MAX_STOP_CHARS} characters", "stop")
    return [s for s in items if s]


def _messages(v) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"'{where}' must be an object with 'role' and 'content'", where)
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise bad(f"'{where}' has unsupported field(s): {', '.join(sorted(extra))}", where)
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"'{where}.role' must be one of {', '.join(ROLES)}, got {_show(role)}", f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise bad(f"'{where}.content' parts must be {{\"type\": \"text\", \"text\": ...}} (text only)",
                              f"{where}.content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise bad(f"'{where}.content' must be a string", f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _prompt(v) -> str | list[int]:
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]  # a batch of one
    if isinstance(v, str):
        if not v:
            raise bad("'prompt' is empty", "prompt")
        return v
    if isinstance(v, list) and v and all(_is_int(t) for t in v):
        return v
    raise bad("'prompt' must be a non-empty string or a list of token ids (one prompt per request)", "prompt")


# ----------------------------------------------------------------------------- text as it streams


class TextStream:
    """A row's text as its tokens arrive: whole characters only, stop strings cut off (and any text that may
    still become one held back), so a client never sees what the final text will not contain.

    Detokenized incrementally, as TGI and vLLM do: each push decodes only a window of the last tokens (from
    ``prefix``, a few tokens before the first unread one, so that a tokenizer's leading-space and merge rules see
    their context) and keeps what that window adds, instead of the whole text again (quadratic in the answer's
    length: 0.3 ms a token at 500 tokens, on the decoding thread's cores). Stop strings are searched in the new
    tail only."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.text = ""  # the text of the tokens up to ``read``
        self.prefix = self.read = 0  # token offsets: the window decoded starts at prefix; read: tokens in text
        self.sent = 0  # characters handed out
        self.cut: int | None = None  # where the earliest stop string begins
        self.scanned = 0  # characters already searched for stop strings
        self.stopped = False

    def _detokenize(self, final: bool) -> None:
        if self.read == len(self.tokens):
            return
        decode = self.tokenizer.decode
        before = decode(self.tokens[self.prefix:self.read], skip_special_tokens=True)
        window = decode(self.tokens[self.prefix:], skip_special_tokens=True)
        if not window.startswith(before):  # a tokenizer that rewrote the window's start: decode it all again
            self.text = decode(self.tokens, skip_special_tokens=True)
            self.prefix, self.read = max(0, len(self.tokens) - 4), len(self.tokens)
            return
        if window.endswith("\ufffd") and not final:  # a character split across tokens: wait for the rest
            return
        self.text += window[len(before):]
        self.prefix, self.read = max(0, len(self.tokens) - 4), len(self.tokens)

    def push(self, tokens: list[int], final: bool = False) -> str:
        """The new text to send after ``tokens`` (``final``: the row ended, send what was held back)."""
        self.tokens.extend(tokens)
        self._detokenize(final)
        text = self.text
        if self.cut is None:
            longest = max((len(s) for s in self.stop), default=1)
            start = max(0, self.scanned - longest + 1)
            found = [at for s in self.stop if (at := text.find(s, start)) >= 0]
            if found:
                self.cut, self.stopped = min(found), True
            self.scanned = len(text)
        end = len(text) if self.cut is None else self.cut
        if not self.stopped and not final:
            end = len(text.rstrip("\ufffd"))  # a character split across tokens (the fallback's text): wait
            for s in self.stop:  # the tail may be the start of a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if text.endswith(s[:k], 0, end):
                        end -= k
                        break
        if end <= self.sent:
            return ""
        out, self.sent = text[self.sent:end], end
        return out


def final_text(tokenizer, tokens: list[int], stop: list[str]) -> str:
    stream = TextStream(tokenizer, stop)
    return stream.push(tokens, final=True)


# ----------------------------------------------------------------------------- responses


FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(p: Params, rid: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
             fingerprint: str) -> dict:
    created = int(time.time())
    if p.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": FINISH[finish]}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": FINISH[finish]}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": p.model, "system_fingerprint": fingerprint,
            "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}


def chunk(p: Params, rid: str, created: int, text: str | None, finish: str | None, fingerprint: str,
          role: bool = False) -> dict:
    if p.kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish and FINISH[finish]}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish and FINISH[finish]}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": p.model, "system_fingerprint": fingerprint,
            "choices": [choice]}


def usage_chunk(p: Params, rid: str, created: int, prompt_tokens: int, completion_tokens: int,
                fingerprint: str) -> dict:
    obj = "chat.completion.chunk" if p.kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": p.model, "system_fingerprint": fingerprint,
            "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
