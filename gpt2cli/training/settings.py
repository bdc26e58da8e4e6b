"""Every `gpt2 train` setting, once: its type, default and help in one field (mlx-lm's
`TrainingArgs`), grouped by concern.

The command's flags, `--config run.toml`, `--print-config`, run.json and the resume check
all read these fields. A default of None means "derived" (from the model, the step count or
another setting); the help says from what, and `resolve` computes it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from gpt2cli import precision
from gpt2cli.config import GPT2Config
from gpt2cli.errors import ParameterError, UserError
from gpt2cli.sampling_checks import MAX_SEED

VAL_FRACTION = 0.05  # the tail held out for validation, unless a prepared folder says otherwise
FINE_TUNE_LR = 5e-5
LORA_LR = 2e-4  # adapters start at zero and are few: PEFT's examples train them at 1e-4..3e-4


INT_LIMIT = 2**31 - 1  # JAX computes steps, lengths and counts in int32


@dataclass(frozen=True)
class Range:
    """The values a number setting allows: `low`/`high` bounds (None: none), each included
    unless open. Whole numbers are also held to int32 (what JAX counts in)."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def problem(self, value: float) -> str | None:
        """Why `value` is not allowed, or None."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"{value} is not a finite number"
        low, high = self.low, self.high
        if high is None and isinstance(value, int):
            high = INT_LIMIT
        low_ok = low is None or (value > low if self.open_low else value >= low)
        high_ok = high is None or (value < high if self.open_high else value <= high)
        if low_ok and high_ok:
            return None
        if self.low is not None and self.high is not None:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            return f"must be in {left}{low}, {high}{right}, got {value}"
        if not low_ok:
            return f"must be {'greater than' if self.open_low else 'at least'} {low}, got {value}"
        return f"must be {'below' if self.open_high else 'at most'} {high}, got {value}"


POSITIVE = Range(low=1)  # a count of at least one
COUNT = Range(low=0)  # 0 allowed: "off" or "only at the end"
FRACTION = Range(0, 1, open_high=True)  # a share, a probability, an Adam beta
RATE = Range(low=0, open_low=True)
SEED = Range(0, MAX_SEED)


def setting(
    default: Any, help: str, *aliases: str, fixed: bool = True, allowed: Range | None = None
) -> Any:
    """A field with its help; `fixed`: part of a run's identity, not changed on --resume;
    `allowed`: the range of a number (every source of settings checks it: `check_range`).

    A default that is a list is copied per instance (dataclasses need a factory for it).
    """
    meta = {"help": help, "aliases": aliases, "fixed": fixed, "allowed": allowed}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


SEQ_LENGTH = 256  # tokens per sequence, unless the model's context is shorter
WARMUP = 100  # warm-up steps, unless a tenth of the run is fewer
SAMPLE_PROMPT = "Hello, I'm a language model,"  # build-nanogpt's


@dataclass(frozen=True)
class ModelSettings:
    """Where the weights come from and the model's shape."""

    model: str | None = setting(
        None,
        "Starting model: a .npz, a Hugging Face folder or a Hub repo id [default: gpt2, "
        "unless --init].",
        "-m",
        "--model-name",
    )
    init: str | None = setting(
        None,
        "Train from scratch: a preset's shape (tiny, gpt2, gpt2-medium, ...) or a config.json "
        "(its file or folder).",
    )
    n_layer: int | None = setting(None, "With --init: transformer blocks.", allowed=POSITIVE)
    n_head: int | None = setting(
        None, "With --init: attention heads (must divide --n-embd).", allowed=POSITIVE
    )
    n_embd: int | None = setting(None, "With --init: residual stream width.", allowed=POSITIVE)
    n_positions: int | None = setting(
        None, "With --init: context length (nanoGPT's block_size).", allowed=POSITIVE
    )
    tokenizer: str | None = setting(None, "Tokenizer folder or repo id [default: the model's].")
    dropout: float | None = setting(
        None, "Dropout rate in training [default: the model's].", allowed=FRACTION
    )
    dtype: str = setting("float32", precision.HELP + " Weights stay float32.")


@dataclass(frozen=True)
class DataSettings:
    """What is read and how it is cut into batches."""

    dataset: list[str] = setting(
        [],
        "Text file(s) or globs (relative names are read from $DATA_DIR), or a folder made by "
        "gpt2 prepare.",
        "-d",
    )
    val_dataset: list[str] = setting([], "Validation text file(s) instead of a split.")
    val_fraction: float | None = setting(
        None,
        f"Tail of the data held out [default: {VAL_FRACTION}, or the prepared folder's].",
        allowed=FRACTION,
    )
    errors: str = setting("strict", "Non-UTF-8 bytes: strict (stop) or replace.")
    batch_size: int = setting(8, "Sequences per micro-batch.", "-b", allowed=POSITIVE)
    seq_length: int | None = setting(
        None,
        f"Tokens per sequence [default: {SEQ_LENGTH}, or the context if shorter].",
        allowed=POSITIVE,
    )
    grad_accum: int = setting(1, "Micro-batches per optimizer step.", allowed=POSITIVE)
    eval_batches: int = setting(8, "Validation batches per evaluation.", allowed=POSITIVE)
    mask_prompt: bool = setting(
        False,
        "Count only the replies in the loss (prompt/completion and messages rows): not the "
        "prompts, the preamble or the padding.",
    )
    chat_template: str = setting(
        "chat", "The template chat rows are written in (gpt2 chat --template's names)."
    )


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW and the learning-rate schedule."""

    lr: float | None = setting(
        None,
        f"Peak learning rate [default: {FINE_TUNE_LR} to fine-tune, {LORA_LR} with --lora; "
        "from scratch 6e-4 x 768 / n_embd, at most 1e-2].",
        allowed=RATE,
    )
    min_lr: float | None = setting(
        None, "Final learning rate [default: lr/10].", allowed=Range(low=0)
    )
    warmup: int | None = setting(
        None, f"Linear warm-up steps [default: min({WARMUP}, steps/10)].", allowed=COUNT
    )
    decay_steps: int | None = setting(
        None, "Step where the cosine reaches --min-lr [default: steps].", allowed=POSITIVE
    )
    weight_decay: float = setting(0.1, "AdamW decay of weight matrices.", allowed=Range(low=0))
    beta1: float = setting(0.9, "AdamW's first-moment decay.", allowed=FRACTION)
    beta2: float = setting(0.95, "AdamW's second-moment decay.", allowed=FRACTION)
    grad_clip: float = setting(1.0, "Global gradient-norm limit, 0 = off.", allowed=Range(low=0))
    seed: int = setting(0, "Data order, dropout and init.", allowed=SEED)


@dataclass(frozen=True)
class LoopSettings:
    """How long to run, how often to report and save, and where results go."""

    steps: int = setting(1000, "Optimizer steps in total.", fixed=False, allowed=POSITIVE)
    log_every: int = setting(10, "Steps per log line.", fixed=False, allowed=POSITIVE)
    eval_every: int = setting(
        0, "Steps per validation, 0 = at the end.", fixed=False, allowed=COUNT
    )
    save_every: int = setting(
        1000, "Steps per checkpoint, 0 = at the end.", fixed=False, allowed=COUNT
    )
    keep: int = setting(3, "Checkpoints kept.", fixed=False, allowed=POSITIVE)
    out: str | None = setting(None, "Run folder (checkpoints, metrics) [default: runs/<time>].")
    output: str | None = setting(
        None,
        "Trained model .npz [default: OUT/final.npz; gpt2_finetuned.npz without --out; "
        "with --lora the adapter folder OUT/adapter].",
        "-o",
    )
    plot: bool = setting(
        False, "Write loss.png (and the task's accuracy) in the run folder at the end.", fixed=False
    )
    eval_task: str | None = setting(
        None,
        "A multiple-choice task file (as gpt2 eval --task reads it), scored at each evaluation: "
        "task_acc and task_acc_norm in metrics.jsonl.",
        fixed=False,
    )
    sample_every: int = setting(
        0,
        "Steps per greedy sample written to the log and metrics.jsonl, 0 = never.",
        fixed=False,
        allowed=COUNT,
    )
    sample_prompt: str = setting(SAMPLE_PROMPT, "The text each sample continues.", fixed=False)
    sample_tokens: int = setting(32, "Tokens per sample.", fixed=False, allowed=POSITIVE)


@dataclass(frozen=True)
class ParallelSettings:
    """Devices, processes and memory."""

    data_parallel: bool = setting(False, "Split each batch over all devices.", fixed=False)
    fsdp: bool = setting(
        False, "Also shard params and optimizer state over the devices.", fixed=False
    )
    coordinator: str | None = setting(
        None, "HOST:PORT of process 0, for multi-process runs.", fixed=False
    )
    num_processes: int = setting(1, "Processes in the run.", fixed=False, allowed=POSITIVE)
    process_id: int = setting(
        0, "This process's index, from 0 to --num-processes - 1.", fixed=False, allowed=COUNT
    )
    remat: bool = setting(
        False, "Recompute each block in the backward pass: less memory, slower.", fixed=False
    )


@dataclass(frozen=True)
class LoraSettings:
    """Low-rank adapters trained beside a frozen model (lora.py)."""

    lora: bool = setting(
        False,
        "Train LoRA adapters on a frozen model instead of every weight: no gradient and no "
        "optimizer state for the model, checkpoints of megabytes; the run writes OUT/adapter "
        "(PEFT's format) instead of a whole model.",
    )
    lora_rank: int = setting(
        8, "With --lora: the adapters' rank r (PEFT's default).", allowed=POSITIVE
    )
    lora_alpha: float | None = setting(
        None,
        "With --lora: the update is scaled by alpha / r [default: the rank, so 1].",
        allowed=RATE,
    )
    lora_dropout: float = setting(
        0.0, "With --lora: dropout on each adapter's input.", allowed=FRACTION
    )
    lora_targets: list[str] = setting(
        ["c_attn"],
        "With --lora: the layers adapted, of attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj "
        "(PEFT's short names too: c_proj is both projections) [default: c_attn, as PEFT].",
    )


GROUPS = {
    "model": ModelSettings,
    "data": DataSettings,
    "optimizer": OptimizerSettings,
    "loop": LoopSettings,
    "parallel": ParallelSettings,
    "lora": LoraSettings,
}


@dataclass(frozen=True)
class Settings:
    """All of a run's settings, one object per concern."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    loop: LoopSettings = field(default_factory=LoopSettings)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> Settings:
        """From field names to values (absent names keep their defaults)."""
        unknown = set(values) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}")
        for name, value in values.items():
            check_range(name, value)
        groups = {}
        for group, kind in GROUPS.items():
            mine = {f.name: values[f.name] for f in dataclasses.fields(kind) if f.name in values}
            groups[group] = kind(**mine)
        return cls(**groups)

    def flat(self) -> dict[str, Any]:
        return {
            f.name: getattr(getattr(self, group), f.name)
            for group, kind in GROUPS.items()
            for f in dataclasses.fields(kind)
        }

    def replace(self, **changes: Any) -> Settings:
        return Settings.from_flat({**self.flat(), **changes})


@dataclass(frozen=True)
class PrepareSettings:
    """`gpt2 prepare`: what decides the tokens written (the worker count changes nothing)."""

    text_field: str = setting("text", "The JSON-lines field holding each document's text.")
    errors: str = setting("strict", DataSettings.__dataclass_fields__["errors"].metadata["help"])
    shard_tokens: int = setting(
        100_000_000,  # 200 MB per shard, as nanoGPT's FineWeb shards
        "Tokens per shard file (2 bytes each), at least: a shard ends with the ~1 MB piece of "
        "text that reaches it.",
    )
    val_fraction: float = setting(VAL_FRACTION, "Tail of the tokens held out for validation.")

    def __post_init__(self) -> None:
        check_text_errors(self.errors)
        if self.shard_tokens <= 0:
            raise ParameterError(
                "shard_tokens", f"must be a positive integer, got {self.shard_tokens}"
            )
        check_val_fraction(self.val_fraction)


def check_text_errors(value: str) -> None:
    """The one check of what to do with bytes that are not UTF-8 (Python's `errors=`)."""
    if value not in ("strict", "replace"):
        raise ParameterError("errors", f"must be strict or replace, got {value!r}")


def check_val_fraction(value: float) -> None:
    """The one check of a held-out share: the tail it takes must leave a head to train on."""
    problem = FRACTION.problem(value)
    if problem:
        raise ParameterError("val_fraction", problem)


def help_of(kind: type, name: str) -> str:
    return kind.__dataclass_fields__[name].metadata["help"]


# name -> (group, dataclass field), in the order of the groups
FIELDS: dict[str, tuple[str, dataclasses.Field]] = {
    f.name: (group, f) for group, kind in GROUPS.items() for f in dataclasses.fields(kind)
}


def field_type(name: str) -> Any:
    group, _ = FIELDS[name]
    return typing.get_type_hints(GROUPS[group])[name]


def flat_names(group: str) -> list[str]:
    return [name for name, (owner, _) in FIELDS.items() if owner == group]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def fixed_names() -> list[str]:
    """Settings that make a run what it is: a resumed run refuses to change them."""
    return [name for name, (_, f) in FIELDS.items() if f.metadata["fixed"]]


def default_of(name: str) -> Any:
    _, f = FIELDS[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def check_value(name: str, value: Any, where: str) -> Any:
    """`value` if it fits the field's type (ints pass as floats) and range; else one line
    naming it (`where`: the file, and the section, it was read from)."""
    kind = field_type(name)
    if not _fits(value, kind):
        raise UserError(f"{where}{name} must be {_describe(kind)}, got {value!r}")
    value = float(value) if kind in (float, float | None) and value is not None else value
    try:
        check_range(name, value)
    except ParameterError as exc:
        raise UserError(f"{where}{name} {exc.problem}") from None
    return value


def check_range(name: str, value: Any) -> None:
    """The one check of a setting's range, for every source (flags, --config, run.json)."""
    allowed = FIELDS[name][1].metadata["allowed"]
    problem = allowed.problem(value) if allowed and value is not None else None
    if problem:
        raise ParameterError(name, problem)


def check_together(s: Settings) -> None:
    """The ranges that depend on another setting."""
    p = s.parallel
    if p.process_id >= p.num_processes:
        raise ParameterError(
            "process_id", f"must be below the process count ({p.num_processes}), got {p.process_id}"
        )


def _fits(value: Any, kind: Any) -> bool:
    if value is None:
        return type(None) in typing.get_args(kind)
    base = _base(kind)
    if typing.get_origin(base) is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, base)


def _base(kind: Any) -> Any:
    """`int` of `int | None`; other types as they are."""
    if isinstance(kind, types.UnionType):
        return next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def _describe(kind: Any) -> str:
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    base = _base(kind)
    if typing.get_origin(base) is list:
        return "a list of strings"
    return words.get(base, str(base))


# ---- derived defaults ----------------------------------------------------------------------


def scratch_lr(config: GPT2Config) -> float:
    """Default peak learning rate of a model trained from scratch: 6e-4 at GPT-2's width (768,
    nanoGPT's value), inversely proportional to the width (as muP scales Adam's rate), at most
    1e-2. tiny (64 wide) gets 7.2e-3: 200 steps of 8 x 64 on Tiny Shakespeare reached
    validation loss 6.08 at 5e-3 and 5.96 at 7.2e-3; gpt2-medium 4.5e-4, gpt2-xl 2.9e-4, near
    the rates GPT-3's paper gives for those sizes."""
    return min(6e-4 * 768 / config.n_embd, 1e-2)


def resolve(s: Settings, config: GPT2Config | None, val_fraction: float | None = None) -> Settings:
    """The derived settings filled in, as far as they can be known (`config`: the model's)."""
    o, d, loop = s.optimizer, s.data, s.loop
    lr = o.lr
    if lr is None and s.lora.lora:
        lr = LORA_LR
    if lr is None:
        lr = (
            scratch_lr(config)
            if s.model.init and config
            else None
            if s.model.init
            else FINE_TUNE_LR
        )
    changes: dict[str, Any] = {"lr": lr}
    if o.min_lr is None and lr is not None:
        changes["min_lr"] = lr / 10
    if o.warmup is None:
        changes["warmup"] = min(WARMUP, loop.steps // 10)
    if o.decay_steps is None:
        changes["decay_steps"] = loop.steps
    if d.seq_length is None and config is not None:
        changes["seq_length"] = min(SEQ_LENGTH, config.n_positions)
    if d.val_fraction is None:
        changes["val_fraction"] = val_fraction
    if s.lora.lora and s.lora.lora_alpha is None:
        changes["lora_alpha"] = float(s.lora.lora_rank)
    return s.replace(**changes)
