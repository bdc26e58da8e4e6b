"""A chat session over a base GPT-2: a transcript the model continues. No terminal I/O.

GPT-2 was never tuned to follow instructions, so a chat is a document it keeps writing:

    A conversation between a curious user and a helpful assistant.   <- the preamble
    User: Hi                                                         <- a turn: the user's line,
    Assistant: Hello! How can I help?                                   then the model's reply
    User: Tell me a story
    Assistant:                                                       <- the model continues here

A reply ends at `<|endoftext|>` (the end-of-turn marker), where the model starts the next
`User:` line (the stop string `"\\nUser:"`, which a base model writes on its own), or after
`max_new_tokens`. In the transcript every reply is followed by `<|endoftext|>`: one token, already
the end of a document to every GPT-2, the end of generation everywhere (`generate`, `serve`), and
what a model fine-tuned on chats (`gpt2 train --mask-prompt`) learns to write when its answer is
done. `render` writes a conversation's ids for all three users of a template (this session, the
server's chat endpoint, training), so a fine-tuned model sees at inference what it was trained on.

The transcript is kept as token ids, segment by segment (preamble, then each turn's prompt and
reply), so the ids sent for turn N+1 extend those of turn N: the prompt cache then holds the
whole conversation and a new turn prefills only its own tokens. A reply keeps the ids the model
generated (never re-encoded text), for the same reason.

When the next turn would not fit in `n_positions - max_new_tokens`, the oldest turns are dropped
(the preamble stays) until the history fills at most half of the room left, so a long chat pays
for a full re-prefill once every several turns rather than on every turn. Learned absolute
positions mean dropped turns shift every later position: the cache is rebuilt, not shifted.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

from gpt2cli.errors import UserError
from gpt2cli.generate import PromptCache, SamplingParams, stream_generate
from gpt2cli.tokenizer import GPT2Tokenizer


@dataclass(frozen=True)
class Template:
    """How a transcript is written: speaker names and the default preamble."""

    name: str
    user: str
    assistant: str
    system: str  # the default preamble

    def turn_prompt(self, message: str) -> str:
        """The text of one user turn, up to where the model writes the reply."""
        return f"\n{self.user}: {message}\n{self.assistant}:"

    @staticmethod
    def reply_text(message: str) -> str:
        """The text of one reply after its turn prompt (the end-of-turn token follows it)."""
        return f" {message}"

    @property
    def stops(self) -> tuple[str, ...]:
        return (f"\n{self.user}:",)


TEMPLATES: dict[str, Template] = {
    "chat": Template(
        "chat",
        "User",
        "Assistant",
        "A conversation between a curious user and a helpful assistant.",
    ),
    "qa": Template("qa", "Q", "A", "Questions and their answers."),
}
DEFAULT_TEMPLATE = "chat"
MIN_TURN_ROOM = 16  # tokens a user turn may always use, whatever the preamble and reply budget
REPLY_TOKENS = 100  # the most tokens a reply gets by default (less in a small window)
TAIL_TOKENS = 64  # how far back from a reply's end its generated tokens may stop matching its text


ROLES = ("system", "user", "assistant")


def one_line(text: str) -> str:
    """A message as the transcript holds it: one line, runs of whitespace made one space."""
    return " ".join(text.split())


class MessageError(ValueError):
    """A conversation `render` cannot write: `index` is the message at fault (None: the whole)."""

    def __init__(self, index: int | None, reason: str):
        super().__init__(reason)
        self.index, self.reason = index, reason


@dataclass(frozen=True)
class Rendered:
    """A conversation's token ids in parts: the preamble's, then each message's (a user turn's
    prompt, or a reply with its end-of-turn token), with whether it is a reply."""

    preamble: list[int]
    parts: list[tuple[list[int], bool]]

    @property
    def ids(self) -> list[int]:
        return self.preamble + [t for part, _ in self.parts for t in part]

    @property
    def replies(self) -> list[bool]:
        """For each id, whether it is a reply's (the loss counts it)."""
        return [False] * len(self.preamble) + [r for part, r in self.parts for _ in part]


def render(messages, template: Template, tokenizer: GPT2Tokenizer, encode=None) -> Rendered:
    """The transcript of (role, text) messages: the preamble (system messages replace the
    template's), then per user message its turn prompt, per assistant message its reply and the
    end-of-turn token. A conversation that ends with a user message ends where the model writes.

    Each part is tokenized on its own, as ChatSession sends them (by `encode`: the tokenizer's
    own by default; the server passes one that lets other threads run meanwhile).
    """
    encode = encode or tokenizer.encode
    system, parts = None, []
    for i, (role, text) in enumerate(messages):
        text = one_line(text)
        if role == "system":
            system = text if system is None else f"{system} {text}"
        elif role == "user":
            parts.append((encode(template.turn_prompt(text)), False))
        elif role == "assistant":
            if not any(not reply for _, reply in parts):
                raise MessageError(i, "an assistant message must follow a user message")
            parts.append((encode(template.reply_text(text)) + [tokenizer.eos_id], True))
        else:
            raise MessageError(
                i, f"role must be {', '.join(ROLES[:-1])} or {ROLES[-1]}, got {role!r}"
            )
    if not parts:
        raise MessageError(None, "a conversation needs a user message")
    return Rendered(encode(template.system if system is None else system), parts)


def template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UserError(
            f"unknown chat template {name!r} (choose from: {', '.join(TEMPLATES)})"
        ) from None


@dataclass(frozen=True)
class Turn:
    """One exchange. `ids` are its tokens in the transcript: the user prompt, then the reply."""

    user: str
    reply: str
    ids: tuple[int, ...]
    finish_reason: str  # "stop" (a stop string), "eos", "length" or "interrupted"


@dataclass(frozen=True)
class ReplyStats:
    prompt_tokens: int  # tokens sent as the prompt (the whole transcript)
    prefilled_tokens: int  # of those, how many the model computed (the rest came from the cache)
    generated_tokens: int
    first_token_s: float  # from sending the turn to its first generated token
    total_s: float
    dropped_turns: int  # oldest turns dropped to make room for this one

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0


def default_reply_tokens(n_positions: int) -> int:
    """A reply's default budget: 100 tokens, at most a quarter of the window (a reply that fills
    the window would leave no room for the history)."""
    return min(REPLY_TOKENS, n_positions // 4)


def turns_to_drop(preamble: int, turns: list[int], new: int, room: int) -> int:
    """How many of the oldest turns to drop so preamble + history + new turn fit in `room`.

    Lengths are in tokens. Nothing is dropped while everything fits; once it does not, the
    history kept fills at most half of what the preamble and the new turn leave free.
    """
    if preamble + sum(turns) + new <= room:
        return 0
    free = room - preamble - new
    kept, keep = 0, 0
    for length in reversed(turns):
        if kept + length > free // 2:
            break
        kept += length
        keep += 1
    return len(turns) - keep


def reply_ids(tokenizer: GPT2Tokenizer, tokens: list[int], text: str) -> list[int]:
    """The ids of a reply whose text is `text`, reusing the generated `tokens` where they match.

    The generated tokens usually run past the reply's text (the stop string, held-back bytes);
    keep the longest run of them that decodes to a prefix of `text`, and encode the rest.
    """
    for k in range(len(tokens), max(len(tokens) - TAIL_TOKENS, 0) - 1, -1):
        head = tokenizer.decode(tokens[:k])
        if text.startswith(head):
            rest = text[len(head) :]
            return list(tokens[:k]) + (tokenizer.encode(rest) if rest else [])
    return tokenizer.encode(text)


class Trimmed:
    """Passes streamed text on without its leading and trailing whitespace."""

    def __init__(self):
        self.started = False
        self.pending = ""  # whitespace shown only if more text follows it

    def push(self, text: str) -> list[str]:
        if not self.started:
            text = text.lstrip()
            if not text:
                return []
            self.started = True
        body = text.rstrip()
        if not body:
            self.pending += text
            return []
        shown, self.pending = self.pending + body, text[len(body) :]
        return [shown]


class ChatSession:
    """A conversation with one model: history, settings, the prompt cache across turns."""

    def __init__(
        self,
        engine,
        tokenizer: GPT2Tokenizer,
        *,
        template: Template = TEMPLATES[DEFAULT_TEMPLATE],
        system: str | None = None,
        sampling: SamplingParams | None = None,
        max_new_tokens: int = 100,
        stops: tuple[str, ...] = (),
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.template = template
        self.n_positions = engine.config.n_positions
        self.sampling = sampling if sampling is not None else SamplingParams()
        self.extra_stops = tuple(stops)
        self.turns: list[Turn] = []
        self.last: ReplyStats | None = None
        self.prompt_cache = PromptCache()
        self._sent = 0  # turns sent since the start: varies the seed from turn to turn
        self.max_new_tokens = max_new_tokens
        self.set_system(template.system if system is None else system)

    # ---- settings ---------------------------------------------------------------------

    @property
    def stops(self) -> tuple[str, ...]:
        return self.template.stops + self.extra_stops

    def set_system(self, text: str) -> None:
        """Replace the preamble (the history stays; the cache is rebuilt on the next turn)."""
        ids = self._encode(one_line(text), "the preamble")
        self._check_room(len(ids), self.max_new_tokens)
        self.system = one_line(text)
        self.preamble_ids = ids

    def set_max_new_tokens(self, value: int) -> None:
        self._check_room(len(self.preamble_ids), value)
        self.max_new_tokens = value

    def set_sampling(self, **changes) -> None:
        """Change sampling settings by name; a bad value raises UserError naming the range."""
        self.sampling = dataclasses.replace(self.sampling, **changes)

    def reset(self) -> None:
        """Forget the conversation (the preamble stays cached: it is the prompt's prefix)."""
        self.turns.clear()

    def _encode(self, text: str, what: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        vocab = self.engine.config.vocab_size
        if ids and max(ids) >= vocab:
            raise UserError(
                f"{what} has token id {max(ids)} but the model's vocabulary has {vocab} ids: "
                "pass the model's own tokenizer with --tokenizer"
            )
        return ids

    def _check_room(self, preamble: int, max_new_tokens: int) -> None:
        if max_new_tokens < 1:
            raise UserError(f"max-new-tokens must be at least 1, got {max_new_tokens}")
        most = self.n_positions - MIN_TURN_ROOM - 1  # a one-token reply still needs a turn
        if preamble > most:
            raise UserError(
                f"the preamble is {preamble} tokens: too long for the model's "
                f"{self.n_positions}-token window (at most {most} tokens); shorten it"
            )
        left = self.n_positions - preamble - max_new_tokens
        if left < MIN_TURN_ROOM:
            raise UserError(
                f"max-new-tokens {max_new_tokens} and a {preamble}-token preamble leave "
                f"{max(left, 0)} of the model's {self.n_positions}-token window for a turn "
                f"({MIN_TURN_ROOM} needed): use max-new-tokens <= "
                f"{self.n_positions - preamble - MIN_TURN_ROOM} or a shorter preamble"
            )

    # ---- the transcript ---------------------------------------------------------------

    def transcript_ids(self) -> list[int]:
        ids = list(self.preamble_ids)
        for turn in self.turns:
            ids.extend(turn.ids)
        return ids

    @property
    def context_tokens(self) -> int:
        return len(self.preamble_ids) + sum(len(t.ids) for t in self.turns)

    def to_markdown(self) -> str:
        lines = [f"# Chat ({self.template.name} template)", ""]
        if self.system:
            lines += [f"> {self.system}", ""]
        for turn in self.turns:
            lines += [f"**{self.template.user}:** {turn.user}", ""]
            lines += [f"**{self.template.assistant}:** {turn.reply}", ""]
        return "\n".join(lines)

    def to_json(self) -> str:
        data = {
            "template": self.template.name,
            "system": self.system,
            "sampling": dataclasses.asdict(self.sampling),
            "max_new_tokens": self.max_new_tokens,
            "turns": [
                {"user": t.user, "assistant": t.reply, "finish_reason": t.finish_reason}
                for t in self.turns
            ],
        }
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"

    # ---- a turn -----------------------------------------------------------------------

    def send(self, message: str) -> Iterator[str]:
        """Stream the reply to `message` as text pieces; the turn joins the history at the end.

        Closing the generator early (Ctrl-C in the REPL) keeps the reply shown so far.
        """
        message = one_line(message)
        if not message:
            raise UserError("empty message: type some text")
        prompt = self._encode(self.template.turn_prompt(message), "the message")
        room = self.n_positions - self.max_new_tokens
        if len(self.preamble_ids) + len(prompt) > room:
            raise UserError(
                f"the message is {len(prompt)} tokens but {room - len(self.preamble_ids)} fit "
                f"beside the preamble and {self.max_new_tokens} reply tokens in the model's "
                f"{self.n_positions}-token window: shorten it or lower max-new-tokens"
            )
        dropped = turns_to_drop(
            len(self.preamble_ids), [len(t.ids) for t in self.turns], len(prompt), room
        )
        del self.turns[:dropped]
        return self._stream(message, prompt, dropped)

    def _stream(self, message: str, prompt: list[int], dropped: int) -> Iterator[str]:
        prompt_ids = self.transcript_ids() + prompt
        sampling = dataclasses.replace(self.sampling, seed=self.sampling.seed + self._sent)
        self._sent += 1
        start = time.perf_counter()
        first = None
        pieces: list[str] = []
        tokens: list[int] = []
        last = None
        trim = Trimmed()
        try:
            for last in stream_generate(
                self.engine,
                self.tokenizer,
                prompt_ids,
                max_new_tokens=self.max_new_tokens,
                sampling=sampling,
                stop=self.stops,
                prompt_cache=self.prompt_cache,
            ):
                first = first or time.perf_counter() - start
                tokens.append(last.token)
                pieces.append(last.text)
                yield from trim.push(last.text)
        finally:  # also when closed early or interrupted: what was generated stays
            if tokens:
                finish = last.finish_reason or "interrupted"
                self._commit(message, prompt, pieces, tokens, finish)
            total = time.perf_counter() - start
            self.last = ReplyStats(
                prompt_tokens=len(prompt_ids),
                prefilled_tokens=last.prefilled_tokens if last else 0,
                generated_tokens=len(tokens),
                first_token_s=first or total,
                total_s=total,
                dropped_turns=dropped,
            )

    def _commit(self, message, prompt, pieces, tokens, finish) -> None:
        """The turn as `render` writes it: prompt, the reply's ids, the end-of-turn token. The
        model's own tokens are kept where they spell that text (the usual case: the cache then
        holds them); where they do not (no leading space, a newline), the rest is re-encoded."""
        reply = one_line("".join(pieces))
        eos = self.tokenizer.eos_id
        text = self.template.reply_text(reply)
        ids = reply_ids(self.tokenizer, [t for t in tokens if t != eos], text)
        self.turns.append(Turn(message, reply, tuple(prompt + ids + [eos]), finish))
