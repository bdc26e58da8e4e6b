"""GPT2Config: the single source of every shape, read from and written to HF config.json."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2cli.errors import ParameterError, UserError
from gpt2cli.fields import check_types

# Activations we implement, by their Hugging Face names.
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu", "silu", "swish", "tanh")


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257  # BPE vocabulary, <|endoftext|> is the last id
    n_positions: int = 1024  # context window: learned position embeddings
    n_embd: int = 768  # residual stream width D
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads; D must divide by it
    n_inner: int | None = None  # MLP hidden width; None means 4 * D
    activation_function: str = "gelu_new"  # MLP non-linearity (HF name)
    layer_norm_epsilon: float = 1e-5
    resid_pdrop: float = 0.1  # dropout after each residual branch
    embd_pdrop: float = 0.1  # dropout after token + position embeddings
    attn_pdrop: float = 0.1  # dropout on attention probabilities
    scale_attn_weights: bool = True  # divide scores by sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool = False  # also divide by layer index + 1
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"config field {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise UserError(
                f"n_embd must be divisible by n_head (each head gets n_embd / n_head "
                f"dimensions): n_embd={self.n_embd} is not divisible by n_head={self.n_head}"
            )
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise UserError(
                f"config field n_inner must be a positive integer or null, got {self.n_inner!r}"
            )
        if self.activation_function not in ACTIVATIONS:
            raise UserError(
                f"config activation_function={self.activation_function!r} is not supported "
                f"(supported: {', '.join(ACTIVATIONS)})"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def check_fits(self, length: int, what: str) -> None:
        """The one context-length check: `what` (its caller's name for it) is `length` tokens."""
        if length > self.n_positions:
            raise ParameterError(
                what, f"{length} exceeds the model's context window of {self.n_positions} tokens"
            )

    def check_ids(self, ids: Any, what: str, fix: str = "") -> None:
        """The one vocabulary check: every token id in `ids` (its caller's name for them: `what`)
        must name a row of the embedding, whose lookup would clamp any other id silently.
        `fix`, appended, says what the caller's user can do."""
        import numpy as np

        ids = np.asarray(ids)
        if ids.size == 0:
            return
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.vocab_size:
            raise UserError(
                f"{what} has token id {low if low < 0 else high} but the model's vocabulary has "
                f"{self.vocab_size} ids: token ids must lie in [0, {self.vocab_size}){fix}"
            )

    def replace(self, **changes: Any) -> GPT2Config:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count from shapes alone (tied LM head counted once)."""
        d, inner = self.n_embd, self.mlp_width
        per_layer = (
            2 * d  # ln_1
            + d * 3 * d
            + 3 * d  # attn.c_attn
            + d * d
            + d  # attn.c_proj
            + 2 * d  # ln_2
            + d * inner
            + inner  # mlp.c_fc
            + inner * d
            + d  # mlp.c_proj
        )
        embeddings = self.vocab_size * d + self.n_positions * d
        return embeddings + self.n_layer * per_layer + 2 * d  # + ln_f

    # ---- Hugging Face config.json -------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GPT2Config:
        """Build from a HF GPT-2 config dict; refuse values that would change the math."""
        model_type = hf.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise UserError(f"config model_type={model_type!r} is not GPT-2 (expected 'gpt2')")
        for field, harmless in _MATH_CHANGING_FIELDS.items():
            if field in hf and hf[field] is not None and hf[field] != harmless:
                raise UserError(
                    f"config field {field}={hf[field]!r} is not supported "
                    f"(only {harmless!r} is implemented)"
                )
        missing = [key for key in _SHAPE_KEYS if key not in hf]
        if missing:
            raise UserError(
                f"config has no {missing[0]} (a GPT-2 config gives its shape: "
                f"{', '.join(_SHAPE_KEYS)})"
            )
        n_ctx = hf.get("n_ctx")
        if n_ctx is not None and "n_positions" in hf and n_ctx != hf["n_positions"]:
            raise UserError(f"config n_ctx={n_ctx} differs from n_positions={hf['n_positions']}")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in known}
        if "n_positions" not in values and n_ctx is not None:
            values["n_positions"] = n_ctx
        for token in ("bos_token_id", "eos_token_id"):
            if values.get(token) is None:
                values.pop(token, None)
        check_types(cls, values, "config field ")
        return cls(**values)

    def to_hf(self) -> dict[str, Any]:
        hf = dataclasses.asdict(self)
        hf.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_ctx=self.n_positions)
        hf["tie_word_embeddings"] = True
        return hf

    @classmethod
    def from_json_file(cls, path: str | Path) -> GPT2Config:
        try:
            hf = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(hf, dict):
            raise UserError(f"config {path} is not a JSON object")
        try:
            return cls.from_hf(hf)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None


_SHAPE_KEYS = ("n_embd", "n_layer", "n_head")

# HF fields that would change the computation, with the one value we implement.
_MATH_CHANGING_FIELDS: dict[str, Any] = {
    "add_cross_attention": False,
    "reorder_and_upcast_attn": False,
    "tie_word_embeddings": True,
    "is_encoder_decoder": False,
}

PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
    "distilgpt2": GPT2Config(n_layer=6),
    "tiny": GPT2Config(n_positions=128, n_embd=64, n_layer=2, n_head=4),
}


SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "n_positions")


def new_model_config(init: str, **shape: int | None) -> GPT2Config:
    """The shape of a model trained from scratch: a preset's name or a config.json (a file, or
    a folder holding one), with any of SHAPE_FIELDS changed (None: keep)."""
    path = Path(init)
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    base = GPT2Config.from_json_file(path) if path.is_file() else _preset_or_path(init)
    unknown = set(shape) - set(SHAPE_FIELDS)
    if unknown:
        raise ValueError(f"unknown shape fields {sorted(unknown)}")
    return base.replace(**{k: v for k, v in shape.items() if v is not None})


def _preset_or_path(init: str) -> GPT2Config:
    if init.endswith(".json") or "/" in init:
        raise UserError(f"init {init}: no such config file (give a preset or a config.json)")
    return preset(init)


def preset(name: str) -> GPT2Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r} (choose from: {', '.join(PRESETS)})") from None
