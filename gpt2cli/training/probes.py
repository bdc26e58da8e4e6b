"""What a run measures besides its loss: a multiple-choice task's accuracy at each evaluation
(`--eval-task`) and a short greedy sample every few steps (`--sample-every`).

Both only read the current weights: they draw no random numbers and take no batches, so the
data order and the random state, and with them a resumed run's losses, stay as they were.
"""

from __future__ import annotations

from gpt2cli.config import GPT2Config
from gpt2cli.engine import Engine
from gpt2cli.errors import UserError
from gpt2cli.generate import fit_prompt, generate
from gpt2cli.scoring import Scorer
from gpt2cli.training import tasks
from gpt2cli.training.settings import LoopSettings


class Probes:
    """The task (read once, when the run starts) and the sample's prompt, and when each runs."""

    def __init__(self, loop: LoopSettings, config: GPT2Config, tokenizer, dtype: str) -> None:
        self.loop, self.config, self.tokenizer, self.dtype = loop, config, tokenizer, dtype
        self.items = tasks.read_task(loop.eval_task) if loop.eval_task else None
        self.prompt = None
        if loop.sample_every:
            ids = tokenizer.encode(loop.sample_prompt)
            try:
                self.prompt = fit_prompt(ids, loop.sample_tokens, config.n_positions, True)
            except UserError as exc:
                raise UserError(f"--sample-prompt and --sample-tokens: {exc}") from None
        self._scorer: Scorer | None = None

    def due(self, step: int, evaluating: bool) -> bool:
        return (self.items is not None and evaluating) or self._sampling(step)

    def _sampling(self, step: int) -> bool:
        every = self.loop.sample_every
        return bool(every) and (step % every == 0 or step == self.loop.steps)

    def measure(self, params, step: int, evaluating: bool) -> dict:
        """The record's task and sample fields at `step` (host params, as numpy arrays)."""
        record = {}
        if self.items is not None and evaluating:
            record.update(self._score(params))
        if self._sampling(step):
            engine = Engine(self.config, params, self.dtype)
            completion = generate(
                engine, self.tokenizer, self.prompt, max_new_tokens=self.loop.sample_tokens
            )
            record["sample"] = completion.text
        return record

    def _score(self, params) -> dict:
        if self._scorer is None:
            self._scorer = Scorer(self.config, params, self.dtype)
        else:
            self._scorer.load(params)
        acc, acc_norm = tasks.accuracy(tasks.score_items(self._scorer, self.tokenizer, self.items))
        return {"task_acc": acc, "task_acc_norm": acc_norm}
