"""Write `tests/fixtures/score.json`: golden log-probabilities from Hugging Face transformers +
PyTorch for tiny-a, for the scoring tests (the server's echoed prompts, `gpt2 eval --task`).

Needs torch + transformers (never the project's environment); from the repository root:

    ../peer/bin/python scripts/make_score_fixtures.py

For each prompt: its token ids, each token's log-probability given the ones before it, and the
top 5 alternatives at each position. For each task file in tests/fixtures/tasks/: per item and
choice, the tokens scored and their log-probabilities, with the context and choice encoded and
cut to the window as lm-evaluation-harness does (`_encode_pair`, then the last n_positions + 1
tokens). Numbers are computed in float64 from the stored float32 weights (eager attention).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2LMHeadModel

FIXTURES = Path("tests/fixtures")
MODEL = FIXTURES / "tiny-a"
EOT = 50256
TOP = 5
PROMPTS = [
    "Hello",
    "Hello, world",
    "The end.<|endoftext|>A new document begins here",
    "Ünïcödé: ☃ and 日本語 text",
]
LONG_TEXT = " ".join(["The bell rang twice before anyone answered the door."] * 20)


def tokenizer() -> ByteLevelBPETokenizer:
    tok = ByteLevelBPETokenizer(str(MODEL / "vocab.json"), str(MODEL / "merges.txt"))
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


@torch.no_grad()
def token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[n - 1, V] float64 log-probabilities of each next token."""
    logits = model(torch.tensor([ids[:-1]])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def prompt_entry(model, ids: list[int]) -> dict:
    if len(ids) == 1:  # nothing to score: OpenAI's first entry is null
        return {"ids": ids, "logprobs": [], "top_ids": [], "top_logprobs": []}
    lp = token_logprobs(model, ids)
    top = torch.topk(lp, TOP, dim=-1)
    picked = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return {
        "ids": ids,
        "logprobs": picked.tolist(),
        "top_ids": top.indices.tolist(),
        "top_logprobs": top.values.tolist(),
    }


def items(path: Path) -> list[tuple[str, list[str], list[int], int]]:
    """(context, continuations, lengths for acc_norm, answer) per item."""
    out = []
    for line in path.read_text("utf-8").splitlines():
        if not line.strip():
            continue
        doc = json.loads(line)
        if "ctx" in doc:
            ends = doc["endings"]
            out.append(
                (doc["ctx"], [" " + e for e in ends], [len(e) for e in ends], int(doc["label"]))
            )
        else:
            out.append(
                (doc["context"], doc["choices"], [len(c) for c in doc["choices"]], doc["answer"])
            )
    return out


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's rule: trailing spaces move to the continuation; encode the whole, split."""
    if not context:
        return [EOT], tok.encode(continuation).ids
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tok.encode(context + continuation).ids
    ctx = tok.encode(context).ids
    return ctx, whole[len(ctx) :]


def task_entry(model, tok, n_positions: int, path: Path) -> list[dict]:
    entries = []
    for context, choices, lengths, answer in items(path):
        scored = []
        for choice in choices:
            ctx, cont = encode_pair(tok, context, choice)
            whole = (ctx + cont)[-(n_positions + 1) :]
            lp = token_logprobs(model, whole)[-len(cont) :]
            scored.append(
                {
                    "sequence": whole,
                    "logprobs": lp[torch.arange(len(cont)), torch.tensor(cont)].tolist(),
                }
            )
        entries.append({"choices": scored, "lengths": lengths, "answer": answer})
    return entries


def main() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_pretrained(MODEL, attn_implementation="eager").double().eval()
    tok = tokenizer()
    n_positions = model.config.n_positions
    long_ids = tok.encode(LONG_TEXT).ids[:n_positions]
    assert len(long_ids) == n_positions
    prompts = [prompt_entry(model, tok.encode(p).ids) | {"text": p} for p in PROMPTS]
    prompts.append(prompt_entry(model, long_ids) | {"text": None})
    tasks = {
        path.name: task_entry(model, tok, n_positions, path)
        for path in sorted((FIXTURES / "tasks").glob("*.jsonl"))
    }
    out = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model": "tiny-a",
        "top": TOP,
        "prompts": prompts,
        "tasks": tasks,
    }
    (FIXTURES / "score.json").write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
