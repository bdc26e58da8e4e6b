"""Multiple-choice tasks: read a jsonl file, score every choice, count acc and acc_norm.

Two forms, detected per file from its first item:
- HellaSwag's release (as llm.c reads it): `ctx`, `endings`, `label`; an ending is scored as
  `" " + ending`, joined to the context by one space as llm.c and lm-evaluation-harness join it.
- plain: `context`, `choices`, `answer`; each choice is appended exactly as written.

Scoring follows lm-evaluation-harness: context and choice are encoded together and split where
the context's tokens end (trailing spaces of the context move to the choice), an empty context
is `<|endoftext|>`, and a window longer than the model's context loses tokens on the left.
`acc` picks the choice with the largest sum of token log-probabilities, `acc_norm` the largest
sum over the choice's length in characters (HellaSwag: the ending without its space); ties go to
the first choice, as numpy's argmax breaks them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpt2cli.errors import UserError
from gpt2cli.scoring import Scorer

FORMS = {
    "hellaswag": ("ctx", "endings", "label"),
    "plain": ("context", "choices", "answer"),
}


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]  # the text scored after the context
    lengths: tuple[int, ...]  # each choice's length in characters, for acc_norm
    answer: int


@dataclass(frozen=True)
class Result:
    logprobs: tuple[float, ...]  # per choice: the sum of its tokens' log-probabilities
    pred: int  # by the sum
    pred_norm: int  # by the sum per character
    answer: int

    @property
    def acc(self) -> float:
        return float(self.pred == self.answer)

    @property
    def acc_norm(self) -> float:
        return float(self.pred_norm == self.answer)


def read_task(path: str | Path) -> list[Item]:
    """Every item of a task file, or a UserError naming the file and line of the first bad one."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the task file {path}: {exc.strerror}") from None
    items, form = [], None
    for number, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{where}: not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{where}: not a JSON object ({exc})") from None
        if not isinstance(doc, dict):
            raise UserError(f"{where}: not a JSON object")
        form = form or _form(doc, where)
        items.append(_item(doc, form, where))
    if not items:
        raise UserError(f"the task file {path} has no items")
    return items


def _form(doc: dict, where: str) -> str:
    for form, fields in FORMS.items():
        if fields[0] in doc or fields[1] in doc:
            return form
    raise UserError(
        f"{where}: an item needs ctx, endings and label (HellaSwag) or context, choices and answer"
    )


def _item(doc: dict, form: str, where: str) -> Item:
    context_key, choices_key, answer_key = FORMS[form]
    for key in FORMS[form]:
        if key not in doc:
            first, second, third = FORMS[form]
            raise UserError(
                f"{where}: missing {key!r} (this file's items have {first}, {second} and {third})"
            )
    context, choices, answer = doc[context_key], doc[choices_key], doc[answer_key]
    if not isinstance(context, str):
        raise UserError(f"{where}: {context_key!r} must be a string")
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) for c in choices)
    ):
        raise UserError(f"{where}: {choices_key!r} must be a list of at least two strings")
    if not all(choices):
        raise UserError(f"{where}: choice {choices.index('')} is empty")
    if isinstance(answer, str) and answer.isdigit():  # HellaSwag's label is a string on the Hub
        answer = int(answer)
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise UserError(f"{where}: {answer_key!r} must be a choice's index, got {answer!r}")
    if not 0 <= answer < len(choices):
        raise UserError(f"{where}: {answer_key!r} {answer} is not in 0..{len(choices) - 1}")
    joined = " " if form == "hellaswag" else ""  # a plain choice carries its own separator
    return Item(context, tuple(joined + c for c in choices), tuple(map(len, choices)), answer)


def sequences(item: Item, tokenizer, n_positions: int) -> list[tuple[list[int], int]]:
    """Per choice: the tokens of its window (at most n_positions + 1) and how many of the last
    ones are the choice's."""
    out = []
    for choice in item.choices:
        context, continuation = _encode_pair(item, choice, tokenizer)
        whole = (context + continuation)[-(n_positions + 1) :]
        out.append((whole, len(continuation)))
    return out


def _encode_pair(item: Item, choice: str, tokenizer) -> tuple[list[int], list[int]]:
    if not item.context:
        return [tokenizer.eos_id], tokenizer.encode(choice)
    context = item.context.rstrip()
    choice = item.context[len(context) :] + choice
    whole = tokenizer.encode(context + choice)
    ids = tokenizer.encode(context)
    return ids, whole[len(ids) :]


def score_items(
    scorer: Scorer,
    tokenizer,
    items: list[Item],
    progress: Callable[[int], None] | None = None,
) -> list[Result]:
    """Score every choice of every item in batched passes; `progress(choices)` after each."""
    windows = [sequences(item, tokenizer, scorer.config.n_positions) for item in items]
    flat = [seq for item_windows in windows for seq, _ in item_windows]
    scored = iter(scorer(flat, progress=progress))
    results = []
    for item, item_windows in zip(items, windows, strict=True):
        sums = tuple(
            float(next(scored).logprobs[-n:].sum(dtype="float64")) for _, n in item_windows
        )
        norm = [s / length for s, length in zip(sums, item.lengths, strict=True)]
        results.append(Result(sums, _argmax(sums), _argmax(norm), item.answer))
    return results


def _argmax(values) -> int:
    """The first index of the largest value (numpy's argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def accuracy(results: list[Result]) -> tuple[float, float]:
    """acc and acc_norm: the share of items each prediction gets right."""
    return (
        sum(r.acc for r in results) / len(results),
        sum(r.acc_norm for r in results) / len(results),
    )
