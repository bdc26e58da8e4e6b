"""Prefill + cached decode. `stream_generate` yields small responses, `generate` joins them.

`TokenRun` drives an `Engine`'s compiled programs (see engine.py): it dispatches the next decode
call before it reads the tokens of the previous one, so the host never stalls the device; a run
nobody streams may decode in a single call.
Nothing retraces per token: shapes only change when a prompt or cache crosses a bucket. The
rest turns tokens into text: stop strings, UTF-8-safe streaming, batches.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from gpt2cli.engine import DecodeState, Engine, PromptBlock, SamplingParams
from gpt2cli.errors import UserError
from gpt2cli.model import KVCache
from gpt2cli.tokenizer import GPT2Tokenizer, StreamingDetokenizer

MIN_PREFILL = 16  # prompt blocks are powers of two from here


@dataclass
class PromptCache:
    """A KV cache and the token ids it holds, carried from one generation to the next.

    After a generation it holds the prompt and every generated token except the last one
    (that one was sampled but never fed back); `stream_generate` prefills whatever of the next
    prompt it does not share with `tokens`.
    """

    cache: KVCache | None = None
    tokens: list[int] = field(default_factory=list)

    def reset(self) -> None:
        self.cache, self.tokens = None, []


@dataclass(frozen=True)
class GenerationResponse:
    """One streamed step: the new text (maybe empty while a character or stop is pending)."""

    text: str
    token: int
    finish_reason: str | None = None  # on the last response: "stop", "eos" or "length"
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens actually run (the rest came from a PromptCache)
    generated_tokens: int = 0
    prompt_seconds: float = 0.0  # start until the first token
    generation_seconds: float = 0.0  # first token until this one


@dataclass(frozen=True)
class Completion:
    """A finished generation: the text, its token ids (without EOS) and how it ended."""

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    prefilled_tokens: int
    generated_tokens: int
    prompt_seconds: float
    generation_seconds: float

    def __str__(self) -> str:
        return self.text


def check_prompt(prompt: str | Sequence[int]) -> None:
    """A prompt, as text or token ids, must hold something to continue (text that is not empty
    always encodes to at least one token)."""
    if len(prompt) == 0:
        raise UserError("the prompt is empty: give some text to continue")


def fit_prompt(ids: Sequence[int], max_new_tokens: int, n_positions: int, truncate: bool):
    """Check prompt + new tokens fit the context window; with `truncate`, keep the prompt's end."""
    check_prompt(ids)
    if max_new_tokens < 1:
        raise UserError(f"max new tokens must be at least 1, got {max_new_tokens}")
    if max_new_tokens >= n_positions:
        raise UserError(
            f"max new tokens ({max_new_tokens}) must be below the model's context window "
            f"of {n_positions} tokens"
        )
    over = len(ids) + max_new_tokens - n_positions
    if over <= 0:
        return list(ids)
    if truncate:
        return list(ids[over:])
    raise UserError(
        f"prompt ({len(ids)} tokens) + max new tokens ({max_new_tokens}) exceeds the model's "
        f"context window of {n_positions} by {over} tokens; shorten the prompt, ask for fewer "
        f"tokens, or truncate the prompt (--truncate)"
    )


def _prefill_block(n: int) -> int:
    return _power_of_two(n, MIN_PREFILL)


def _power_of_two(n: int, least: int) -> int:
    """The smallest power of two >= n, at least `least`: lengths that compile few programs."""
    return max(least, 1 << (n - 1).bit_length())


def _round_up(n: int, block: int) -> int:
    """The smallest multiple of `block` >= n (cache lengths, whole chunks)."""
    return -(-n // block) * block


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@functools.partial(jax.jit, donate_argnums=0)
def _rewind(cache: KVCache, n) -> KVCache:
    """Keep the first n slots; later ones are masked out and will be overwritten."""
    keep = jnp.arange(cache.length) < n
    return cache.replace(mask=cache.mask & keep[None], index=jnp.asarray(n, jnp.int32))


class TokenRun:
    """One generation at the token level: iterate for [B] arrays of new token ids.

    Rows are left-padded when there are several; a single row is right-padded so it can extend
    a PromptCache without holes. On exit (exhausted or closed) the PromptCache is updated.
    `stream=False`: the caller reads the tokens only at the end, so where the engine does whole
    runs (a GPU) every token after the first comes from one decode call.
    """

    def __init__(
        self,
        engine: Engine,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        sampling_params: SamplingParams,
        prompt_cache: PromptCache | None = None,
        sample_ids: Sequence[int] | None = None,
        stream: bool = True,
    ):
        if prompt_cache is not None and len(prompts) != 1:
            raise ValueError("a PromptCache holds one sequence; pass a single prompt")
        self.engine = engine
        self.prompts = [list(p) for p in prompts]
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling_params
        self.prompt_cache = prompt_cache
        self.sample_ids = list(sample_ids) if sample_ids is not None else [0] * len(prompts)
        self.whole = not stream and engine.whole_runs
        self.prefilled = 0
        self.prompt_seconds = 0.0
        self.produced: list[np.ndarray] = []

    def _inputs(self) -> tuple[KVCache, PromptBlock]:
        """The cache to prefill into, and the prompt block (host arrays) to run into it."""
        engine, chunk = self.engine, self.engine.chunk
        batch = len(self.prompts)
        if batch == 1:
            prompt = self.prompts[0]
            cache = self.prompt_cache.cache if self.prompt_cache else None
            reuse = 0
            if cache is not None:
                reuse = min(_common_prefix(self.prompt_cache.tokens, prompt), len(prompt) - 1)
            suffix = prompt[reuse:]
            n = len(suffix)
            width = _prefill_block(n)
            ids = np.zeros((1, width), np.int32)
            ids[0, :n] = suffix
            mask = np.zeros((1, width), np.int32)
            mask[0, :n] = 1
            positions = np.minimum(reuse + np.arange(width), engine.config.n_positions - 1)[None]
            last, advance = np.array([n - 1]), n
            needed = reuse + max(width, n + self.max_new_tokens - 1 + chunk)
            if cache is None:
                rows = engine.kernels.cache_rows(1)
                cache = engine.new_cache(rows, _round_up(needed, engine.cache_block))
            else:
                if cache.length < needed:
                    cache = cache.with_length(_round_up(needed, engine.cache_block))
                cache = _rewind(cache, reuse)
            self.prefilled = n
        else:
            width = _prefill_block(max(map(len, self.prompts)))
            ids = np.zeros((batch, width), np.int32)
            mask = np.zeros((batch, width), np.int32)
            for row, prompt in enumerate(self.prompts):
                ids[row, width - len(prompt) :] = prompt
                mask[row, width - len(prompt) :] = 1
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
            last, advance = np.full((batch,), width - 1), width
            needed = width + self.max_new_tokens - 1 + chunk
            cache = engine.new_cache(batch, _round_up(needed, engine.cache_block))
            self.prefilled = sum(map(len, self.prompts))
        seen = None
        if self.sampling.repetition_penalty != 1.0:
            seen = np.zeros((batch, engine.config.vocab_size), np.bool_)
            for row, prompt in enumerate(self.prompts):
                seen[row, prompt] = True
        block = PromptBlock(
            ids=ids,
            positions=positions,
            mask=mask,
            last=last,
            advance=np.int32(advance),
            seen=seen,
            seed=np.uint32(self.sampling.seed),
            rows=np.asarray(self.sample_ids, np.int32),
        )
        return cache, block

    def __iter__(self) -> Iterator[np.ndarray]:
        engine, rule = self.engine, self.sampling.rule
        params, steering = engine.params, engine.steering
        start = time.perf_counter()
        cache, block = self._inputs()
        if self.prompt_cache is not None:
            self.prompt_cache.reset()  # its buffers are donated to the prefill
        state, inflight = engine.programs.prefill(params, cache, block, steering, rule=rule)
        todo = self.max_new_tokens - 1  # tokens still to ask the decode program for
        try:
            while inflight is not None:
                ahead = None
                if todo > 0 and self.whole:  # the rest in one call, of a bucketed length
                    length = _power_of_two(_round_up(todo, engine.chunk), engine.chunk)
                    state, ahead = engine.programs.decode_run(
                        params, state, np.int32(todo), steering, rule=rule, length=length
                    )
                    todo = 0
                elif todo > 0:  # queue the next chunk before blocking on this one
                    state, ahead = engine.programs.decode(params, state, steering, rule=rule)
                    todo -= engine.chunk
                block = np.asarray(inflight)  # [B, k]
                if not self.produced:
                    self.prompt_seconds = time.perf_counter() - start
                for column in block.T:
                    if len(self.produced) == self.max_new_tokens:
                        break
                    self.produced.append(column)
                    yield column
                inflight = ahead
        finally:
            self._keep(state)

    def _keep(self, state: DecodeState) -> None:
        """Leave the prompt and the fed-back generated tokens in the PromptCache."""
        if self.prompt_cache is None:
            return
        fed = [int(column[0]) for column in self.produced[:-1]]
        tokens = self.prompts[0] + fed
        self.prompt_cache.cache = _rewind(state.cache, len(tokens))
        self.prompt_cache.tokens = tokens


class StopFilter:
    """Holds back text that could be the start of a stop string; cuts at the first stop."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to show, whether a stop string was found)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            shown, self.pending = self.pending[: min(hits)], ""
            return shown, True
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(stop[:size]):
                    hold = size
                    break
        cut = len(self.pending) - hold
        shown, self.pending = self.pending[:cut], self.pending[cut:]
        return shown, False

    def flush(self) -> str:
        shown, self.pending = self.pending, ""
        return shown


class RowText:
    """Turns one row's token ids into shown text, and says when and why the row ended."""

    def __init__(self, tokenizer: GPT2Tokenizer, stop: Sequence[str], max_new_tokens: int, eos_id):
        self.detokenizer = StreamingDetokenizer(tokenizer)
        self.stops = StopFilter(stop)
        self.eos_id = eos_id
        self.max_new_tokens = max_new_tokens
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None

    def feed(self, token: int) -> str:
        """The text this token adds; sets `finish_reason` when the row is done."""
        if token == self.eos_id:
            self.finish_reason = "eos"
            return self._show(self.detokenizer.finish(), final=True)
        self.tokens.append(token)
        shown = self._show(self.detokenizer.add(token))
        if self.finish_reason is None and len(self.tokens) == self.max_new_tokens:
            self.finish_reason = "length"
            shown += self._show(self.detokenizer.finish(), final=True)
        return shown

    def _show(self, text: str, final: bool = False) -> str:
        shown, stopped = self.stops.push(text)
        if stopped:
            self.finish_reason = "stop"
        elif final:
            shown += self.stops.flush()
        self.text += shown
        return shown


def stream_generate(
    engine: Engine,
    tokenizer: GPT2Tokenizer,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int = 256,
    sampling: SamplingParams | None = None,
    stop: Sequence[str] = (),
    prompt_cache: PromptCache | None = None,
    stream: bool = True,
) -> Iterator[GenerationResponse]:
    """Yield one response per generated token; the last one carries `finish_reason`.

    `stream=False` says the responses are read only at the end (as `generate` does): a GPU then
    decodes the run in one call, and the responses come all at once.
    """
    prompt_ids = fit_prompt(prompt_ids, max_new_tokens, engine.config.n_positions, False)
    run = TokenRun(
        engine,
        [prompt_ids],
        max_new_tokens=max_new_tokens,
        sampling_params=sampling or SamplingParams(),
        prompt_cache=prompt_cache,
        stream=stream,
    )
    row = RowText(tokenizer, stop, max_new_tokens, engine.config.eos_token_id)
    first_at = None
    with contextlib.closing(iter(run)) as steps:
        for count, column in enumerate(steps, start=1):
            token = int(column[0])
            text = row.feed(token)
            now = time.perf_counter()
            first_at = first_at or now
            yield GenerationResponse(
                text=text,
                token=token,
                finish_reason=row.finish_reason,
                prompt_tokens=len(prompt_ids),
                prefilled_tokens=run.prefilled,
                generated_tokens=count,
                prompt_seconds=run.prompt_seconds,
                generation_seconds=now - first_at,
            )
            if row.finish_reason:
                return


def generate(engine: Engine, tokenizer: GPT2Tokenizer, prompt_ids: Sequence[int], **kwargs):
    """Run `stream_generate` to the end and join it into a `Completion`."""
    pieces, tokens, last = [], [], None
    for last in stream_generate(engine, tokenizer, prompt_ids, stream=False, **kwargs):
        pieces.append(last.text)
        tokens.append(last.token)
    if last.finish_reason == "eos":
        tokens.pop()
    return Completion(
        text="".join(pieces),
        tokens=tokens,
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        prefilled_tokens=last.prefilled_tokens,
        generated_tokens=last.generated_tokens,
        prompt_seconds=last.prompt_seconds,
        generation_seconds=last.generation_seconds,
    )


def batch_generate(
    engine: Engine,
    tokenizer: GPT2Tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 256,
    sampling: SamplingParams | None = None,
    stop: Sequence[str] = (),
) -> list[Completion]:
    """Decode every prompt `num_samples` times in one batch; completions prompt by prompt.

    Sample j of every prompt draws from the random stream j of the seed, so a prompt gives the
    same text in a batch as alone.
    """
    if num_samples < 1:
        raise UserError(f"number of samples must be at least 1, got {num_samples}")
    n_positions = engine.config.n_positions
    prompts = [fit_prompt(p, max_new_tokens, n_positions, False) for p in prompts]
    rows = [p for p in prompts for _ in range(num_samples)]
    run = TokenRun(
        engine,
        rows,
        max_new_tokens=max_new_tokens,
        sampling_params=sampling or SamplingParams(),
        sample_ids=[j for _ in prompts for j in range(num_samples)],
        stream=False,
    )
    eos_id = engine.config.eos_token_id
    texts = [RowText(tokenizer, stop, max_new_tokens, eos_id) for _ in rows]
    first_at = None
    with contextlib.closing(iter(run)) as steps:
        for column in steps:
            first_at = first_at or time.perf_counter()
            for row, token in zip(texts, column.tolist(), strict=True):
                if row.finish_reason is None:
                    row.feed(token)
            if all(row.finish_reason for row in texts):
                break
    elapsed = time.perf_counter() - first_at
    return [
        Completion(
            text=row.text,
            tokens=row.tokens,
            finish_reason=row.finish_reason,
            prompt_tokens=len(prompt),
            prefilled_tokens=len(prompt),
            generated_tokens=len(row.tokens) + (row.finish_reason == "eos"),
            prompt_seconds=run.prompt_seconds,
            generation_seconds=elapsed,
        )
        for row, prompt in zip(texts, rows, strict=True)
    ]
