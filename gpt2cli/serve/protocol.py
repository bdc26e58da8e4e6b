"""OpenAI's request fields -> a `Plan` of jobs, and the response and stream-chunk bodies back
(`Bodies`).

Every field is implemented or refused with a 400 that names it; nothing is silently ignored.
Validation is ours (not a schema library's), so every error keeps OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from dataclasses import dataclass, replace

from gpt2cli.chat import (
    ROLES,
    TEMPLATES,
    MessageError,
    Template,
    Trimmed,
    default_reply_tokens,
    render,
    turns_to_drop,
)
from gpt2cli.errors import UserError
from gpt2cli.generate import SamplingParams, check_prompt
from gpt2cli.sampling_checks import check_sampling

MAX_STOPS = 16  # OpenAI allows 4; lm-evaluation-harness sends more (it adds <|endoftext|>)
COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
SEED_RANGE = 2**32  # seeds are used modulo this (gpt2 generate --seed takes 0 .. 2**32 - 1)

COMMON_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "n",
    "logprobs",
    "logit_bias",
    "stream",
    "stream_options",
    "user",
}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "truncation"}
TRUNCATIONS = ("auto", "disabled")  # OpenAI's values (its Responses API); "disabled": strict
# OpenAI fields a base GPT-2 cannot honour: refused by name unless null.
UNSUPPORTED = {
    "suffix": "GPT-2 cannot fill in the middle",
    "best_of": "generate n choices and rank them yourself",
    "tools": "GPT-2 was not trained to call tools",
    "tool_choice": "GPT-2 was not trained to call tools",
    "functions": "GPT-2 was not trained to call functions",
    "function_call": "GPT-2 was not trained to call functions",
    "parallel_tool_calls": "GPT-2 was not trained to call tools",
    "response_format": "structured output is not implemented",
    "modalities": "only text is supported",
    "audio": "only text is supported",
    "prediction": "predicted outputs are not implemented",
    "reasoning_effort": "GPT-2 does not reason",
    "service_tier": "there is one tier",
    "store": "completions are not stored",
    "metadata": "completions are not stored",
    "web_search_options": "there is no web search",
}


class APIError(Exception):
    """An error response in OpenAI's shape."""

    TYPES = {401: "authentication_error", 404: "not_found_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        if self.status in (502, 503):
            kind = "server_error"
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


def bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """How every choice of a request picks its tokens, and what it reports about them: checked
    here, carried by each `Job` to the engine thread, turned into device arrays there
    (`programs.settings_arrays`). The defaults are off (greedy, no penalty)."""

    sampling: SamplingParams = SamplingParams()  # as `gpt2 generate` samples, seed included
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    logprobs: int | None = None  # None: none; else how many top logprobs per token (0..20)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A validated request: prompts as token ids, and how to generate from each."""

    chat: bool
    prompts: list[list[int]]
    prompt_texts: list[str]
    max_tokens: list[int]  # per prompt
    n: int
    settings: Settings  # shared by every choice of the request
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    echo: bool
    model: str
    dropped_messages: int | None = None  # truncation "auto": the oldest messages left out

    @property
    def score_prompts(self) -> bool:
        """The prompts' own logprobs are asked for (echo with logprobs)."""
        return self.echo and self.settings.logprobs is not None


def _number(body: dict, name: str, default, *, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(name, f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if isinstance(value, int):  # JSON integers have any number of digits
        if integer:
            return value
        try:
            return float(value)
        except OverflowError:
            raise bad(
                name, f"{name} is out of range: a number of {len(str(value))} digits"
            ) from None
    if not math.isfinite(value):
        raise bad(name, f"{name} must be a finite number, got {value!r}")
    if integer and not value.is_integer():
        raise bad(name, f"{name} must be an integer, got {value!r}")
    return int(value) if integer else value


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"{name} must be true or false, got {value!r}")
    return value


def _checked(param: str, check, *args, **kwargs) -> None:
    """Run a core check; its error becomes a 400 naming the request's field."""
    try:
        check(*args, **kwargs)
    except UserError as exc:
        raise bad(param, str(exc)) from None


# a \uD800-\uDFFF escape: the only way JSON text can hold a surrogate (UTF-8 bytes cannot)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_body(raw: bytes):
    """A request body -> its JSON value, or a 400: not JSON, nested too deeply for Python, or
    holding a lone surrogate (`"\\ud800"`: JSON allows it, no tokenizer or encoder does)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(None, f"the request body is not valid JSON: {exc}", "invalid_json") from None
    except RecursionError:
        raise bad(None, "the request body is nested too deeply", "invalid_json") from None
    if _SURROGATE_ESCAPE.search(raw):
        _check_text(body)
    return body


def _check_text(body) -> None:
    """400 naming the field of the first string (key or value) that is not valid Unicode."""
    todo = [(body, None)]
    while todo:
        value, param = todo.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                at = key if param is None else f"{param}.{key}"
                todo += [(key, param), (item, at)]
        elif isinstance(value, list):
            todo += [(item, f"{param}[{i}]") for i, item in enumerate(value)]
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                char = value[exc.start]
                raise bad(
                    param, f"the text holds a lone surrogate {char!r}: not valid Unicode"
                ) from None


def check_fields(body, allowed: set[str]) -> None:
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    for name, value in body.items():
        if name in allowed:
            continue
        if name in UNSUPPORTED:
            if value is None:
                continue
            raise bad(
                name, f"{name} is not supported: {UNSUPPORTED[name]}", "unsupported_parameter"
            )
        raise bad(name, f"unknown field {name!r}", "unknown_parameter")


def parse_stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "stop must be a string or a list of strings")
    if len(stops) > MAX_STOPS:
        raise bad("stop", f"stop takes at most {MAX_STOPS} strings, got {len(stops)}")
    if "" in stops:
        raise bad("stop", "an empty stop string would end every reply before it starts")
    return tuple(stops)


def parse_settings(body: dict, vocab: int, seed: int, known: int | None = None) -> Settings:
    """The sampling fields (OpenAI's defaults where absent); logprobs are the plan's to add.

    `known`: the tokenizer's ids, when the model's vocabulary is wider (nanoGPT pads 50257 to
    50304): the ids beyond it are text to no one, so they are never sampled unless biased."""
    temperature = _number(body, "temperature", 1.0)
    top_p = _number(body, "top_p", 1.0)
    min_p = _number(body, "min_p", 0.0)
    penalty = _number(body, "repetition_penalty", 1.0)
    top_k = _number(body, "top_k", 0, integer=True)
    if top_k == -1:  # vLLM's spelling of "off"
        top_k = 0
    for name, value in (
        ("temperature", temperature),
        ("top_p", top_p),
        ("min_p", min_p),
        ("repetition_penalty", penalty),
        ("top_k", top_k),
    ):
        _checked(name, check_sampling, **{name: value})
    additive = {}
    for name in ("presence_penalty", "frequency_penalty"):
        value = _number(body, name, 0.0)
        if not -2.0 <= value <= 2.0:
            raise bad(name, f"{name} must be between -2 and 2, got {value:g}")
        additive[name] = value
    sampling = SamplingParams(
        temperature=temperature,
        top_k=min(top_k, vocab),
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=penalty,
        seed=seed,
    )
    bias = parse_logit_bias(body, vocab)
    if known is not None and known < vocab:
        biased = {token for token, _ in bias}
        bias += tuple((t, -math.inf) for t in range(known, vocab) if t not in biased)
    return Settings(sampling=sampling, logit_bias=bias, **additive)


def parse_logit_bias(body: dict, vocab: int) -> tuple[tuple[int, float], ...]:
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise bad("logit_bias", "logit_bias must map token ids to numbers from -100 to 100")
    table = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()):  # int() would take " 5 ", "1_0" and "٣"
            raise bad("logit_bias", f"logit_bias key {key!r} is not a token id")
        token = int(key)
        if not 0 <= token < vocab:
            raise bad("logit_bias", f"logit_bias token {token} is outside 0..{vocab - 1}")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not -100 <= value <= 100
        ):
            raise bad(
                "logit_bias",
                f"logit_bias values must be numbers from -100 to 100, got {value!r}",
            )
        table[token] = float(value)
    return tuple(table.items())


def parse_seed(body: dict) -> int:
    seed = _number(body, "seed", None, integer=True)
    return secrets.randbelow(SEED_RANGE) if seed is None else seed % SEED_RANGE


def check_model(body: dict, models: set[str]) -> str:
    """The served id the request names (or the only one, if it names none)."""
    model = body.get("model")
    if model is None:
        return sorted(models)[0]
    if not isinstance(model, str):
        raise bad("model", f"model must be a string, got {model!r}")
    if model not in models:
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {', '.join(sorted(models))}",
            "model",
            "model_not_found",
        )
    return model


def parse_common(body: dict, models: set[str], vocab: int, known: int | None = None) -> dict:
    model = check_model(body, models)
    n = _number(body, "n", 1, integer=True)
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options", "stream_options is only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("stream_options", "stream_options takes only include_usage")
        include_usage = _flag(options, "include_usage")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user", "user must be a string")
    seed = parse_seed(body)
    return dict(
        model=model,
        n=n,
        stream=stream,
        include_usage=include_usage,
        settings=parse_settings(body, vocab, seed, known),
        stop=parse_stop(body),
    )


def _max_tokens(body: dict, names: tuple[str, ...], least: int = 1) -> int | None:
    given = [(name, _number(body, name, None, integer=True)) for name in names]
    given = [(name, v) for name, v in given if v is not None]
    if len({v for _, v in given}) > 1:
        raise bad(given[1][0], f"{given[0][0]} and {given[1][0]} disagree: give one")
    if not given:
        return None
    name, value = given[0]
    if value < least:
        raise bad(name, f"{name} must be at least {least}, got {value}")
    return value


def check_context(ids: list[int], max_tokens: int, n_positions: int, param: str) -> None:
    if len(ids) + max_tokens > n_positions:
        raise bad(
            param,
            f"this model's context window is {n_positions} tokens, but the prompt has "
            f"{len(ids)} tokens and {max_tokens} were asked for: shorten the prompt or lower "
            "max_tokens",
            "context_length_exceeded",
        )


def check_ids(ids, vocab: int, param: str) -> list[int]:
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
        raise bad(param, f"token ids must be integers from 0 to {vocab - 1}")
    return list(ids)


def parse_prompts(prompt, tokenizer, vocab: int) -> tuple[list[list[int]], list[str]]:
    """A string, a list of strings, a list of token ids, or a list of lists of ids."""
    if isinstance(prompt, str) or (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt)
    ):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        prompts = prompt
    else:
        raise bad("prompt", "prompt must be a string, a list of strings, or token ids")
    ids, texts = [], []
    for p in prompts:
        if isinstance(p, str):
            encoded = tokenizer.encode_unlocked(p) or [tokenizer.eos_id]  # "" starts a new document
            ids.append(check_ids(encoded, vocab, "prompt"))
            texts.append(p)
        else:
            _checked("prompt", check_prompt, p)
            ids.append(check_ids(p, vocab, "prompt"))
            texts.append(tokenizer.decode(p))
    return ids, texts


def completion_plan(body: dict, *, models: set[str], tokenizer, config, max_batch: int) -> Plan:
    check_fields(body, COMPLETION_FIELDS)
    if "prompt" not in body:
        raise bad("prompt", "prompt is required")
    common = parse_common(body, models, config.vocab_size, tokenizer.vocab_size)
    prompts, texts = parse_prompts(body["prompt"], tokenizer, config.vocab_size)
    logprobs = _number(body, "logprobs", None, integer=True)
    if logprobs is not None and not 0 <= logprobs <= 20:
        raise bad("logprobs", f"logprobs must be from 0 to 20, got {logprobs}")
    echo = _flag(body, "echo")
    max_tokens = _max_tokens(body, ("max_tokens",), least=0 if echo else 1)  # 0: the prompt only
    max_tokens = COMPLETION_DEFAULT_TOKENS if max_tokens is None else max_tokens
    for ids in prompts:
        check_context(ids, max_tokens, config.n_positions, "prompt")
    _check_n(common["n"] * len(prompts), max_batch)
    common["settings"] = replace(common["settings"], logprobs=logprobs)
    return Plan(
        chat=False,
        prompts=prompts,
        prompt_texts=texts,
        max_tokens=[max_tokens] * len(prompts),
        echo=echo,
        **common,
    )


def _check_n(choices: int, max_batch: int) -> None:
    if not 1 <= choices <= max_batch:
        raise bad(
            "n",
            f"n (times the number of prompts) must be from 1 to {max_batch} (the server's "
            f"--max-batch), got {choices}",
        )


def _message_text(message: dict, index: int) -> str:
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise bad(f"messages[{index}].content", "only text content parts are supported")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise bad(f"messages[{index}].content", "content must be a string or a list of text parts")
    return content


@dataclass(frozen=True)
class Transcript:
    """The transcript `gpt2 chat` would send, as the preamble's ids and each turn's: a user
    message and the assistant messages after it. The last turn is the new one."""

    preamble: list[int]
    turns: list[list[int]]
    messages: list[int]  # how many messages (not system ones) each turn is made of

    @property
    def ids(self) -> list[int]:
        return [t for part in (self.preamble, *self.turns) for t in part]

    def dropping(self, n: int) -> Transcript:
        """The transcript without its `n` oldest turns."""
        return Transcript(self.preamble, self.turns[n:], self.messages[n:])


def check_message_fields(message: dict, index: int) -> None:
    """role and content; other fields only as null (a client replaying OpenAI's replies sends
    `refusal: null`). `name` is refused: the transcript calls every turn User or Assistant."""
    for name, value in message.items():
        if name in ("role", "content") or value is None:
            continue
        param = f"messages[{index}].{name}"
        if name == "name":
            raise bad(
                param,
                "name is not supported: gpt2 chat's transcript calls every turn User or Assistant",
                "unsupported_parameter",
            )
        raise bad(param, f"unknown message field {name!r}", "unknown_parameter")


def chat_ids(messages, tokenizer, template: Template = TEMPLATES["chat"]) -> list[int]:
    """The ids of the transcript `gpt2 chat` would send (see `transcript`)."""
    return transcript(messages, tokenizer, template).ids


def transcript(messages, tokenizer, template: Template = TEMPLATES["chat"]) -> Transcript:
    """The transcript `gpt2 chat` would send (chat.render), cut into turns: preamble, then each
    turn, ending at the assistant's name. System (or developer) messages replace the preamble."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty list")
    pairs = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"messages[{i}]", "each message must be an object with role and content")
        check_message_fields(message, i)
        role = message.get("role")
        role = "system" if role == "developer" else role
        if role not in ROLES:
            raise bad(
                f"messages[{i}].role", f"role must be system, user or assistant, got {role!r}"
            )
        pairs.append((role, _message_text(message, i)))
    if messages[-1].get("role") != "user":
        raise bad("messages", "the last message must be the user's")
    try:
        rendered = render(pairs, template, tokenizer, tokenizer.encode_unlocked)
    except MessageError as exc:
        raise bad(
            "messages" if exc.index is None else f"messages[{exc.index}]", exc.reason
        ) from None
    turns, counts = [], []
    for part, reply in rendered.parts:
        if reply:  # an assistant message: part of the turn its user message began
            turns[-1] = turns[-1] + part
            counts[-1] += 1
        else:
            turns.append(part)
            counts.append(1)
    return Transcript(rendered.preamble, turns, counts)


def fit_transcript(chat: Transcript, max_tokens: int, n_positions: int) -> tuple[Transcript, int]:
    """truncation "auto": the oldest turns dropped as `gpt2 chat` drops them (`turns_to_drop`)
    until the transcript and `max_tokens` fit the window -> (transcript, messages dropped)."""
    room = n_positions - max_tokens
    lengths = [len(turn) for turn in chat.turns]
    drop = turns_to_drop(len(chat.preamble), lengths[:-1], lengths[-1], room)
    kept = chat.dropping(drop)
    if len(kept.ids) > room:
        raise bad(
            "messages",
            f"this model's context window is {n_positions} tokens, but the system message and "
            f"the last user message alone have {len(kept.ids)} tokens and {max_tokens} were "
            "asked for: shorten them or lower max_tokens",
            "context_length_exceeded",
        )
    return kept, sum(chat.messages[:drop])


def chat_plan(body: dict, *, models: set[str], tokenizer, config, max_batch: int) -> Plan:
    check_fields(body, CHAT_FIELDS)
    if "messages" not in body:
        raise bad("messages", "messages is required")
    common = parse_common(body, models, config.vocab_size, tokenizer.vocab_size)
    truncation = body.get("truncation")
    if truncation is not None and truncation not in TRUNCATIONS:
        raise bad("truncation", f"truncation must be auto or disabled, got {truncation!r}")
    chat = transcript(body["messages"], tokenizer)
    check_ids(chat.ids, config.vocab_size, "messages")
    logprobs = _flag(body, "logprobs")
    top = _number(body, "top_logprobs", None, integer=True)
    if top is not None:
        if not logprobs:
            raise bad("top_logprobs", "top_logprobs needs logprobs: true")
        if not 0 <= top <= 20:
            raise bad("top_logprobs", f"top_logprobs must be from 0 to 20, got {top}")
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"))
    dropped = None
    if truncation == "auto":  # a reply's room, as `gpt2 chat` keeps it, unless one was asked
        max_tokens = max_tokens or default_reply_tokens(config.n_positions)
        chat, dropped = fit_transcript(chat, max_tokens, config.n_positions)
    elif max_tokens is None:  # the rest of the window, as vLLM does
        max_tokens = max(config.n_positions - len(chat.ids), 1)
    ids = chat.ids
    check_context(ids, max_tokens, config.n_positions, "messages")
    _check_n(common["n"], max_batch)
    common["stop"] = TEMPLATES["chat"].stops + common["stop"]
    common["settings"] = replace(common["settings"], logprobs=(top or 0) if logprobs else None)
    return Plan(
        chat=True,
        prompts=[ids],
        prompt_texts=[""],
        max_tokens=[max_tokens],
        echo=False,
        dropped_messages=dropped,
        **common,
    )


# ---- other routes ----------------------------------------------------------------------


def tokenize(body, tokenizer, n_positions: int, models: set[str]) -> dict:
    """/tokenize: a prompt, or chat messages as `chat_ids` writes them -> their token ids.
    `add_special_tokens` (vLLM's field) changes nothing: GPT-2 adds no BOS or EOS to a text."""
    if isinstance(body, dict) and "messages" in body:
        check_fields(body, {"model", "messages", "add_special_tokens"})
        check_model(body, models)
        ids = chat_ids(body["messages"], tokenizer)
    else:
        check_fields(body, {"model", "prompt", "add_special_tokens"})
        check_model(body, models)
        if not isinstance(body.get("prompt"), str):
            raise bad("prompt", "prompt must be a string")
        ids = tokenizer.encode_unlocked(body["prompt"])
    _flag(body, "add_special_tokens")
    return {"tokens": ids, "count": len(ids), "max_model_len": n_positions}


def tokenizer_info(tokenizer, n_positions: int) -> dict:
    """/tokenizer_info: what a client needs to tokenize as the server does (vLLM's route, which
    lm-evaluation-harness probes). GPT-2 has one special token, begin and end alike."""
    eos = tokenizer.decode([tokenizer.eos_id])
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "eos_token": eos,
        "bos_token": eos,
        "unk_token": eos,
        "pad_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": n_positions,
        "vocab_size": tokenizer.vocab_size,
    }


def detokenize(body, tokenizer, vocab: int, models: set[str]) -> dict:
    """/detokenize: token ids -> their text (ids beyond the tokenizer's are no text)."""
    check_fields(body, {"model", "tokens"})
    check_model(body, models)
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise bad("tokens", "tokens must be a list of token ids")
    return {"prompt": tokenizer.decode(check_ids(tokens, vocab, "tokens"))}


def model_card(name: str, created: int, n_positions: int | None) -> dict:
    card = {"id": name, "object": "model", "created": created, "owned_by": "gpt2cli"}
    if n_positions is not None:
        card["max_model_len"] = n_positions
    return card


# ---- response bodies ---------------------------------------------------------------------


class Choice:
    """The output of one choice, gathered or streamed (a chat reply without its outer spaces)."""

    def __init__(self, chat: bool):
        self.trim = Trimmed() if chat else None
        self.text: list[str] = []
        self.prompt: list = []  # the prompt's TokenInfo, when echoed with logprobs
        self.tokens: list = []  # the scheduler's TokenInfo: token, logprob, top (id, logprob)
        self.finish: str | None = None
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens taken from the prefix cache

    def add(self, text: str, tokens) -> str:
        """Keep a delta's text and tokens; -> the text to show."""
        if self.trim is not None:
            text = "".join(self.trim.push(text))
        self.text.append(text)
        self.tokens.extend(tokens)
        return text


class Bodies:
    """The response of one request in OpenAI's shapes: a whole body, or stream chunks.

    Each choice's output is gathered here (`add` or `delta`, then `finish`) as the engine thread
    sends it; `table` holds the raw bytes of every token id (`tokenizer.token_bytes`).
    """

    def __init__(self, plan: Plan, table: tuple[bytes, ...]):
        self.plan = plan
        self.table = table
        self.id = f"{'chatcmpl' if plan.chat else 'cmpl'}-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.choices = [Choice(plan.chat) for _ in range(len(plan.prompts) * plan.n)]
        self.offsets = [0] * len(self.choices)  # streamed text per choice, for text_offset

    def add(self, index: int, text: str, tokens) -> str:
        """Gather a choice's new text and tokens; -> the text it shows."""
        return self.choices[index].add(text, tokens)

    def delta(self, index: int, text: str, tokens) -> dict | None:
        """`add`, and the chunk that streams what it adds (None: nothing to send)."""
        text = self.add(index, text, tokens)
        wanted = self.plan.settings.logprobs
        if not text and not (wanted is not None and tokens):
            return None
        logprobs = None
        if wanted is not None:
            logprobs = self._logprobs(tokens, wanted, self.offsets[index])
            self.offsets[index] += sum(len(self._text(t.token)) for t in tokens)
        content = {"delta": {"content": text}} if self.plan.chat else {"text": text}
        return self._chunk(
            [{"index": index, **content, "logprobs": logprobs, "finish_reason": None}]
        )

    def prompt(self, index: int, tokens) -> dict:
        """Keep a choice's scored prompt tokens; -> the chunk that streams the echoed prompt
        with them."""
        self.choices[index].prompt = list(tokens)
        text = self.plan.prompt_texts[index // self.plan.n]
        self.offsets[index] = len(text)
        logprobs = self._completion_logprobs([(tokens, 0)], self.plan.settings.logprobs)
        return self._chunk(
            [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}]
        )

    def finish(self, index: int, reason: str, completion_tokens: int, cached_tokens: int = 0):
        """A choice's end -> the chunk that streams it."""
        choice = self.choices[index]
        choice.finish, choice.completion_tokens = reason, completion_tokens
        choice.cached_tokens = cached_tokens
        end = {"index": index, "logprobs": None, "finish_reason": reason}
        end.update({"delta": {}} if self.plan.chat else {"text": ""})
        return self._chunk([end])

    def opening(self) -> list[dict]:
        """The chunks before any token: each chat choice's role, or each echoed prompt."""
        plan, chunks = self.plan, []
        for index in range(len(self.choices)):
            if plan.chat:
                part = {"delta": {"role": "assistant", "content": ""}}
            elif plan.echo and not plan.score_prompts:  # else `prompt` sends it, scored
                text = plan.prompt_texts[index // plan.n]
                self.offsets[index] = len(text)
                part = {"text": text}
            else:
                continue
            part.update(logprobs=None, finish_reason=None)
            chunks.append(self._chunk([{"index": index, **part}]))
        return chunks

    def usage_chunk(self) -> dict | None:
        """The last chunk, with the usage, if the request asked for it."""
        if not self.plan.include_usage:
            return None
        return {**self._chunk([]), "usage": self._usage()}

    def whole(self) -> dict:
        """The body of a response that was not streamed, once every choice has finished."""
        plan, out = self.plan, []
        wanted = plan.settings.logprobs
        for index, choice in enumerate(self.choices):
            text = "".join(choice.text)
            if plan.chat:
                logprobs = None if wanted is None else self._logprobs(choice.tokens, wanted)
                message = {"role": "assistant", "content": text.rstrip(), "refusal": None}
                part = {"message": message, "logprobs": logprobs}
            else:
                prompt_text = plan.prompt_texts[index // plan.n] if plan.echo else ""
                logprobs = None
                if wanted is not None:
                    parts = [(choice.prompt, 0), (choice.tokens, len(prompt_text))]
                    logprobs = self._completion_logprobs(parts, wanted)
                part = {"text": prompt_text + text, "logprobs": logprobs}
            out.append({"index": index, **part, "finish_reason": choice.finish})
        return {
            "id": self.id,
            "object": "chat.completion" if plan.chat else "text_completion",
            "created": int(time.time()),
            "model": plan.model,
            "choices": out,
            "usage": self._usage(),
            **self._dropped(),
        }

    def _chunk(self, parts: list[dict]) -> dict:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.plan.chat else "text_completion",
            "created": self.created,
            "model": self.plan.model,
            "choices": parts,
        }
        if self.plan.include_usage:
            body["usage"] = None
        return {**body, **self._dropped()}

    def _dropped(self) -> dict:
        """Our field of a truncation "auto" response: the oldest messages left out."""
        dropped = self.plan.dropped_messages
        return {} if dropped is None else {"dropped_messages": dropped}

    def _usage(self) -> dict:
        prompt = sum(map(len, self.plan.prompts))
        completion = sum(c.completion_tokens for c in self.choices)
        n = self.plan.n  # a prompt's tokens count once: its choices' least cached count
        cached = sum(
            min(c.cached_tokens for c in self.choices[i : i + n])
            for i in range(0, len(self.choices), n)
        )
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def _bytes(self, token: int) -> bytes:
        """A token's bytes; none for an id beyond the tokenizer's (a padded vocabulary)."""
        return self.table[token] if token < len(self.table) else b""

    def _text(self, token: int) -> str:
        return self._bytes(token).decode("utf-8", errors="replace")

    def _logprobs(self, tokens, want_top: int, offset: int = 0) -> dict:
        """Chat's `content` list of tokens with their bytes, or the completions' four lists."""
        if self.plan.chat:
            return {
                "content": [
                    {
                        **self._token(t.token, t.logprob),
                        "top_logprobs": [self._token(i, lp) for i, lp in t.top],
                    }
                    for t in tokens
                ],
                "refusal": None,
            }
        return self._completion_logprobs([(tokens, offset)], want_top)

    def _completion_logprobs(self, parts, want_top: int) -> dict:
        """The completions' four lists over `parts`, (tokens, text offset of the first) each. A
        prompt's first token has no logprob: its entries are null, as OpenAI's."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tokens, offset in parts:
            for t in tokens:
                text = self._text(t.token)
                top = None if t.logprob is None else {self._text(i): lp for i, lp in t.top}
                out["tokens"].append(text)
                out["token_logprobs"].append(t.logprob)
                out["top_logprobs"].append(top)
                out["text_offset"].append(offset)
                offset += len(text)
        return out if want_top else {**out, "top_logprobs": None}

    def _token(self, token: int, logprob: float) -> dict:
        return {"token": self._text(token), "logprob": logprob, "bytes": list(self._bytes(token))}
