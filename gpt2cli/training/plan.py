"""A run's plan: from settings to a run folder, weights and data, and back from run.json.

A new run records every setting in run.json once its data has loaded; `--resume` rebuilds the
very same run from that file, so a resumed run needs no flags besides (optionally) --steps.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from gpt2cli.config import GPT2Config, new_model_config
from gpt2cli.errors import UserError
from gpt2cli.fields import check_types
from gpt2cli.training import data as datalib
from gpt2cli.training import settings as S
from gpt2cli.training.loop import TrainData
from gpt2cli.training.run_folder import RUN_FILE, RunFolder, RunLock, load_checkpoint
from gpt2cli.training.shards import is_prepared, open_prepared
from gpt2cli.training.trainer import TrainConfig, Trainer, TrainState

SEED_OUTPUT = "gpt2_finetuned.npz"  # where the original script saved; kept without --out


@dataclass
class Plan:
    folder: RunFolder
    spec: dict[str, Any]
    resumed: bool
    start_params: Any = None  # a new run's starting weights (host copy), when already loaded
    lock: RunLock | None = None  # held by the process that writes the folder

    @property
    def model_config(self) -> GPT2Config:
        return GPT2Config.from_hf(self.spec["model"]["config"])

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.spec["train"])

    @property
    def loop(self) -> S.LoopSettings:
        loop = self.spec["loop"]
        return S.LoopSettings(
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
        """The trained model's path; a relative one lies in the run folder (see `new_plan`)."""
        output = Path(self.spec["output"])
        return output if output.is_absolute() else self.folder.path / output

    @property
    def owns_output(self) -> bool:
        """An output inside the run folder is the run's own: resuming may replace it."""
        return self.output.resolve().is_relative_to(self.folder.path.resolve())

    @property
    def settings(self) -> S.Settings:
        return S.Settings.from_flat(self.spec.get("settings", {}))


def parallel_mode(p: S.ParallelSettings) -> str:
    """One of sharding.MODES."""
    if p.fsdp:
        return "fsdp"
    return "data-parallel" if (p.data_parallel or p.num_processes > 1) else "single"


def train_config(s: S.Settings) -> TrainConfig:
    """The trainer's settings (every one that changes the numbers a step computes)."""
    return TrainConfig.from_dict({**s.flat(), "parallel": parallel_mode(s.parallel)})


def default_folder() -> Path:
    return Path("runs") / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def new_plan(s: S.Settings, model_config: GPT2Config, *, force: bool, main_process: bool) -> Plan:
    """Check everything that could fail late; the folder is created by `start_folder`.

    Only the main process checks for existing outputs: the others may look after it wrote them.
    """
    data_dir = _data_dir()
    d, loop = s.data, s.loop
    prepared = _prepared_folder(d.dataset, data_dir)
    files = [prepared] if prepared else datalib.resolve_files(d.dataset, data_dir)
    val_files = datalib.resolve_files(d.val_dataset, data_dir) if d.val_dataset else None
    if val_files:
        val_fraction = 0.0
    elif prepared:
        val_fraction = open_prepared(prepared).val_fraction
    else:
        val_fraction = S.VAL_FRACTION
    folder = Path(loop.out) if loop.out else default_folder()
    if loop.output:
        output = Path(loop.output)
    else:
        output = folder / "final.npz" if loop.out else Path(SEED_OUTPUT)
    if main_process and output.exists() and not force:
        raise UserError(f"{output} already exists (use --force to overwrite, or --output)")
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give a .npz file name")
    s = S.resolve(s, model_config, val_fraction).replace(
        out=str(folder.resolve()), output=str(output.resolve())
    )
    loop_spec = check_loop(
        {k: getattr(s.loop, k) for k in ("steps", "log_every", "eval_every", "save_every", "keep")}
    )
    tc = train_config(s)
    model_config.check_fits(tc.seq_length, "--seq-length")
    if not 0.0 <= s.data.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {s.data.val_fraction}")
    if s.data.eval_batches <= 0:
        raise UserError(f"--eval-batches must be a positive integer, got {s.data.eval_batches}")
    m = s.model
    spec = {
        "model": {"source": m.model, "init": m.init, "config": model_config.to_hf()},
        "tokenizer": m.tokenizer,
        "data": {
            "dataset": [str(p.resolve()) for p in files],
            "prepared": prepared is not None,
            "val_dataset": [str(p.resolve()) for p in val_files] if val_files else None,
            "val_fraction": s.data.val_fraction,
            "errors": s.data.errors,
            "eval_batches": s.data.eval_batches,
        },
        "train": tc.to_dict(),
        "loop": loop_spec,
        "output": _output_entry(output, folder),
        "settings": s.flat(),
    }
    if main_process:
        RunFolder.check_new(folder)
    return Plan(RunFolder(folder), spec, resumed=False)


def _output_entry(output: Path, folder: Path) -> str:
    """Relative to the run folder when inside it, so a copied run folder writes its own."""
    output, folder = output.resolve(), folder.resolve()
    return str(output.relative_to(folder) if output.is_relative_to(folder) else output)


def start_folder(plan: Plan) -> None:
    """Write run.json (a new run's folder is created here, once its data has loaded)."""
    if plan.resumed:
        plan.folder.write_spec(
            {k: v for k, v in plan.spec.items() if k not in ("format", "version")}
        )
    else:
        plan.folder, plan.lock = RunFolder.create(plan.folder.path, plan.spec)


def close(plan: Plan) -> None:
    """Let go of the run folder; a new run that saved no checkpoint leaves nothing behind that
    would block its retry."""
    if plan.lock is None:
        return
    try:
        if not plan.resumed:
            plan.folder.remove_unstarted()
    finally:
        plan.lock.release()
        plan.lock = None
    if not plan.resumed and not any(plan.folder.path.iterdir()):
        plan.folder.path.rmdir()


def recorded_settings(path: str) -> dict[str, Any] | None:
    """The settings a run recorded in its run.json (None for runs made before settings were)."""
    return RunFolder.open(Path(path)).spec().get("settings")


def resume_plan(
    path: str, overrides: dict[str, Any], *, force: bool = False, main_process: bool = True
) -> Plan:
    """The run in `path`, with settings that leave its numbers alone (steps, cadences, the
    parallel mode, --plot) changed.

    The main process holds the folder's lock from here on (released by `close`).
    """
    folder = RunFolder.open(Path(path))
    lock = folder.lock() if main_process else None
    try:
        plan = _resume_plan(folder, overrides, force=force)
    except BaseException:
        if lock:
            lock.release()
        raise
    plan.lock = lock
    return plan


def _resume_plan(folder: RunFolder, overrides: dict[str, Any], *, force: bool) -> Plan:
    spec = folder.spec()
    check_spec(spec, folder.path / RUN_FILE)
    recorded = S.Settings.from_flat(spec.get("settings", {}))
    changed = S.Settings.from_flat({**recorded.flat(), **overrides})
    for key in spec["loop"]:
        spec["loop"][key] = getattr(changed.loop, key) if key in overrides else spec["loop"][key]
    if any(name in overrides for name in S.flat_names("parallel")):
        spec["train"]["parallel"] = parallel_mode(changed.parallel)
    if "settings" in spec:
        spec["settings"] = changed.flat()
    check_loop(spec["loop"])
    plan = Plan(folder, spec, resumed=True)
    if plan.output.exists() and not (force or plan.owns_output):
        raise UserError(
            f"this run writes its model to {plan.output}, outside {folder.path}, and that file "
            "exists (another run's?): add --force to overwrite it"
        )
    return plan


_SECTIONS = {"model": dict, "data": dict, "train": dict, "loop": dict, "output": str}


@dataclass
class _DataSpec:
    dataset: list
    val_dataset: list | None
    val_fraction: float
    errors: str
    eval_batches: int


@dataclass
class _LoopSpec:
    steps: int
    log_every: int
    eval_every: int
    save_every: int
    keep: int


@dataclass
class _ModelSpec:
    source: str | None
    init: str | None
    config: dict


def check_spec(spec: dict[str, Any], file: Path) -> None:
    """Every section and field a resumed run reads, of the right type, its data files present."""
    for key, kind in _SECTIONS.items():
        if not isinstance(spec.get(key), kind):
            raise UserError(f"{file}: {key} is missing or not a {kind.__name__}")
    for section, cls in (("data", _DataSpec), ("loop", _LoopSpec), ("model", _ModelSpec)):
        missing = [f for f in cls.__dataclass_fields__ if f not in spec[section]]
        if missing:
            raise UserError(f"{file}: {section}.{missing[0]} is missing")
        check_types(cls, spec[section], f"{file}: {section}.")
    check_types(TrainConfig, spec["train"], f"{file}: train.")
    for name, value in spec.get("settings", {}).items():
        if name not in S.FIELDS:
            raise UserError(f"{file}: settings.{name} is not a setting")
        S.check_value(name, value, f"{file}: settings.")
    prepared = spec["data"].get("prepared") is True
    for name in spec["data"]["dataset"] + (spec["data"]["val_dataset"] or []):
        if not isinstance(name, str):
            raise UserError(f"{file}: data.dataset holds {name!r}, not a file name")
        if not (is_prepared(name) if prepared else Path(name).is_file()):
            raise UserError(
                f"{file}: the run's dataset file {name} is gone; restore it to resume "
                "(a resumed run reads the same data), or start a new run"
            )


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


def source_config(
    model: str | None, init: str | None, load_model, shape: dict[str, int | None]
) -> tuple[GPT2Config, Any]:
    """(config, params or None) of the starting model: a new shape, or a loaded model."""
    if init:
        return new_model_config(init, **shape), None
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
