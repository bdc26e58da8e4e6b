"""From command-line choices to a ready run: settings, run folder, weights, data, and saving.

A new run records every setting in run.json once its data has loaded; `--resume` rebuilds the
very same run from that file, so a resumed run needs no flags besides (optionally) --steps.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from gpt2cli import data as datalib
from gpt2cli.config import GPT2Config, preset
from gpt2cli.errors import UserError
from gpt2cli.runs import RunFolder, load_checkpoint
from gpt2cli.train import LoopSettings, TrainConfig, TrainData, Trainer, TrainState
from gpt2cli.training.shards import is_prepared, open_prepared

SEED_OUTPUT = "gpt2_finetuned.npz"  # where the original script saved; kept without --out


@dataclass
class Plan:
    folder: RunFolder
    spec: dict[str, Any]
    resumed: bool
    start_params: Any = None  # a new run's starting weights (host copy), when already loaded

    @property
    def model_config(self) -> GPT2Config:
        return GPT2Config.from_hf(self.spec["model"]["config"])

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.spec["train"])

    @property
    def loop(self) -> LoopSettings:
        loop = self.spec["loop"]
        return LoopSettings(
            steps=loop["steps"],
            log_every=loop["log_every"],
            eval_every=loop["eval_every"],
            save_every=loop["save_every"],
        )

    @property
    def keep(self) -> int:
        return self.spec["loop"]["keep"]

    @property
    def output(self) -> Path:
        return Path(self.spec["output"])


@dataclass
class NewRun:
    """What the user asked for in a fresh run (None: not given, use the default)."""

    dataset: list[str]
    model: str | None
    init: str | None
    tokenizer: str | None
    out: str | None
    output: str | None
    val_dataset: list[str] | None
    val_fraction: float | None  # None: the prepared folder's split, else 0.05
    errors: str
    eval_batches: int
    steps: int
    log_every: int
    eval_every: int
    save_every: int
    keep: int
    train: dict[str, Any] = field(default_factory=dict)


def default_folder() -> Path:
    return Path("runs") / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def new_plan(req: NewRun, model_config: GPT2Config, *, force: bool, main_process: bool) -> Plan:
    """Check everything that could fail late; the folder is created by `start_folder`.

    Only the main process checks for existing outputs: the others may look after it wrote them.
    """
    data_dir = _data_dir()
    prepared = _prepared_folder(req.dataset, data_dir)
    files = [prepared] if prepared else datalib.resolve_files(req.dataset, data_dir)
    val_files = datalib.resolve_files(req.val_dataset, data_dir) if req.val_dataset else None
    if prepared and req.val_fraction is None and not val_files:
        req.val_fraction = open_prepared(prepared).index["split"]["val_fraction"]
    folder = Path(req.out) if req.out else default_folder()
    if req.output:
        output = Path(req.output)
    else:
        output = folder / "final.npz" if req.out else Path(SEED_OUTPUT)
    if main_process and output.exists() and not force:
        raise UserError(f"{output} already exists (use --force to overwrite, or --output)")
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give a .npz file name")
    steps = req.steps
    loop = check_loop(
        {
            "steps": steps,
            "log_every": req.log_every,
            "eval_every": req.eval_every,
            "save_every": req.save_every,
            "keep": req.keep,
        }
    )
    lr = req.train.get("lr") or (6e-4 if req.init else 5e-5)
    train = {
        "lr": lr,
        "min_lr": lr / 10,
        "warmup": min(100, steps // 10),
        "decay_steps": steps,
        "seq_length": min(256, model_config.n_positions),
        **{k: v for k, v in req.train.items() if v is not None},
    }
    tc = TrainConfig.from_dict(train)
    if tc.seq_length > model_config.n_positions:
        raise UserError(
            f"--seq-length {tc.seq_length} exceeds the model's context of "
            f"{model_config.n_positions} positions"
        )
    if req.val_fraction is None:
        req.val_fraction = 0.05
    if not 0.0 <= req.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {req.val_fraction}")
    if req.eval_batches <= 0:
        raise UserError(f"--eval-batches must be a positive integer, got {req.eval_batches}")
    spec = {
        "model": {"source": req.model, "init": req.init, "config": model_config.to_hf()},
        "tokenizer": req.tokenizer,
        "data": {
            "dataset": [str(p.resolve()) for p in files],
            "prepared": prepared is not None,
            "val_dataset": [str(p.resolve()) for p in val_files] if val_files else None,
            "val_fraction": 0.0 if val_files else req.val_fraction,
            "errors": req.errors,
            "eval_batches": req.eval_batches,
        },
        "train": tc.to_dict(),
        "loop": loop,
        "output": str(output.resolve()),
    }
    if main_process:
        RunFolder.check_new(folder)
    return Plan(RunFolder(folder), spec, resumed=False)


def start_folder(plan: Plan) -> None:
    """Write run.json (a new run's folder is created here, once its data has loaded)."""
    if plan.resumed:
        plan.folder.write_spec(
            {k: v for k, v in plan.spec.items() if k not in ("format", "version")}
        )
    else:
        plan.folder = RunFolder.create(plan.folder.path, plan.spec)


def resume_plan(path: str, overrides: dict[str, Any]) -> Plan:
    """The run in `path`, with the allowed settings (steps, cadences, parallel mode) changed."""
    folder = RunFolder.open(Path(path))
    spec = folder.spec()
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "parallel":
            spec["train"]["parallel"] = value
        else:
            spec["loop"][key] = value
    check_loop(spec["loop"])
    return Plan(folder, spec, resumed=True)


def check_loop(loop: dict[str, int]) -> dict[str, int]:
    """Step counts and cadences: positive; evaluating and saving may be 0 (only at the end)."""
    for name, value in loop.items():
        flag = "--" + name.replace("_", "-")
        zero_ok = name in ("eval_every", "save_every")
        if value < 0 or (value == 0 and not zero_ok):
            allowed = "0 or a positive integer" if zero_ok else "a positive integer"
            raise UserError(f"{flag} must be {allowed}, got {value}")
    return loop


def initial_weights(plan: Plan, trainer: Trainer, load_model) -> TrainState:
    """The latest checkpoint's state when resuming, else the starting model's weights."""
    latest = plan.folder.latest() if plan.resumed else None
    source = plan.spec["model"]
    if latest is not None:
        step_file, path = latest
        like = _params_like(plan.model_config)
        step, params, opt_state = load_checkpoint(path, like, trainer.opt_state_template(like))
        if step != step_file:
            raise UserError(f"checkpoint {path} says step {step}; its name says {step_file}")
        return trainer.create_state(params, opt_state, step)
    return trainer.create_state(starting_params(plan.model_config, source, plan, load_model))


def starting_params(config: GPT2Config, source: dict, plan: Plan, load_model) -> Any:
    if source["init"]:
        from gpt2cli.model import init_params

        return init_params(config, seed=plan.train_config.seed)
    loaded_config, params = load_model(source["source"])
    if loaded_config != config:
        raise UserError(
            f"model {source['source']} no longer has the run's shape ({loaded_config} "
            f"differs from {config})"
        )
    return params


def _params_like(config: GPT2Config) -> Any:
    import jax

    from gpt2cli.model import init_params

    return jax.eval_shape(lambda: init_params(config))


def source_config(model: str | None, init: str | None, load_model) -> tuple[GPT2Config, Any]:
    """(config, params or None) of the starting model: a preset, or a loaded model."""
    if init:
        return preset(init), None
    return load_model(model)


def load_data(plan: Plan, tokenizer, progress=None) -> TrainData:
    d, tc = plan.spec["data"], plan.train_config
    files = [Path(f) for f in d["dataset"]]
    if d.get("prepared"):
        tokens, digest = _prepared_tokens(files[0], tokenizer)
    else:
        tokens = datalib.load_tokens(files, tokenizer, errors=d["errors"], progress=progress)
        digest = hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()[:16]
    if d["val_dataset"]:
        val_tokens = datalib.load_tokens(
            [Path(f) for f in d["val_dataset"]], tokenizer, errors=d["errors"], progress=progress
        )
        train, _ = datalib.split(tokens, tc.seq_length, 0.0)
        val, _ = datalib.split(val_tokens, tc.seq_length, 0.0)
    else:
        train, val = datalib.split(tokens, tc.seq_length, d["val_fraction"])
    if d.setdefault("token_hash", digest) != digest:
        raise UserError(
            "the dataset files changed since this run started (their tokens differ); "
            "a resumed run needs the same data: restore the files or start a new run"
        )
    sampler = datalib.Sampler(len(train), tc.seed)
    return TrainData(train, val, sampler, tc.batch_size, tc.grad_accum, d["eval_batches"])


def _prepared_folder(dataset: list[str], data_dir: str | None) -> Path | None:
    """The folder of a `gpt2 prepare`d dataset, when that is what --dataset names."""
    import os

    folders = [Path(data_dir or "", os.path.expanduser(d)) for d in dataset]
    prepared = [f for f in folders if is_prepared(f)]
    if prepared and len(dataset) > 1:
        raise UserError(
            f"--dataset {prepared[0]} is a prepared folder: give it alone (prepare the other "
            "files into it, or into a folder of their own)"
        )
    return prepared[0] if prepared else None


def _prepared_tokens(folder: Path, tokenizer) -> tuple[Any, str]:
    """The memory-mapped token stream of a prepared folder and the stream's fingerprint."""
    prepared = open_prepared(folder)
    prepared.check_tokenizer(tokenizer)
    return prepared.tokens, prepared.fingerprint


def _data_dir() -> str | None:
    import os

    return os.environ.get("DATA_DIR") or None
