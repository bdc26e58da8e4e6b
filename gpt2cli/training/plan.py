"""A run's plan: from settings to a run folder, weights and data, and back from run.json.

A new run records its settings in run.json once its data has loaded; `--resume` rebuilds the
very same run from that file, so a resumed run needs no flags besides (optionally) --steps.

run.json (version 2) holds each setting once, resolved, and what they resolved to that cannot
be worked out again (the model's shape, the dataset's files and the fingerprint of their tokens):

    {"format": "gpt2cli-run", "version": 2,
     "settings": {"batch_size": 8, "lr": 5e-05, ...},  # all but out and output (see _PLACES)
     "model_config": {...},  # Hugging Face config.json's fields
     "data": {"dataset": ["/abs/a.txt"], "val_dataset": null, "prepared": false,
              "token_hash": "..."},
     "output": "final.npz"}  # relative to the folder when inside it

Version 1 kept a setting in up to three places; `_from_version_1` reads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from gpt2cli.config import GPT2Config, new_model_config
from gpt2cli.errors import ParameterError, UserError
from gpt2cli.fields import check_types
from gpt2cli.lora import LoraSpec, parse_targets
from gpt2cli.training import data, examples, settings
from gpt2cli.training.loop import ExampleData, TrainData
from gpt2cli.training.run_folder import RUN_FILE, RunFolder, RunLock, load_checkpoint
from gpt2cli.training.shards import is_prepared, open_prepared
from gpt2cli.training.trainer import TrainConfig, Trainer, TrainState

SEED_OUTPUT = "gpt2_finetuned.npz"  # where the original script saved; kept without --out
ADAPTER_FOLDER = "adapter"  # in the run folder: what a --lora run writes

# Settings that say where the run lies: run.json does not store them (the folder is where it
# lies, and the output is stored relative to it), so a copied run folder writes into itself.
_PLACES = ("out", "output")


@dataclass
class DataFiles:
    """What the dataset settings resolved to when the run started."""

    dataset: list[str]  # absolute paths: one prepared folder, or text files
    val_dataset: list[str] | None
    prepared: bool
    token_hash: str | None = None  # the tokens' fingerprint, once read: a resume checks it


@dataclass
class Plan:
    """A run, parsed once: its settings, the model's shape, its data files and the trainer's
    view of the settings (a new run's from the command, a resumed one's from run.json)."""

    folder: RunFolder
    settings: settings.Settings  # resolved; out and output name the folder and the model file
    model_config: GPT2Config
    files: DataFiles
    resumed: bool
    start_params: Any = None  # a new run's starting weights (host copy), when already loaded
    lock: RunLock | None = None  # held by the process that writes the folder
    train_config: TrainConfig = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.train_config = train_config(self.settings)

    @property
    def output(self) -> Path:
        return Path(self.settings.loop.output)

    @property
    def owns_output(self) -> bool:
        """An output inside the run folder is the run's own: resuming may replace it."""
        return self.output.resolve().is_relative_to(self.folder.path.resolve())


def parallel_mode(p: settings.ParallelSettings) -> str:
    """One of sharding.MODES."""
    if p.fsdp:
        return "fsdp"
    return "data-parallel" if (p.data_parallel or p.num_processes > 1) else "single"


def train_config(s: settings.Settings) -> TrainConfig:
    """The trainer's settings (every one that changes the numbers a step computes)."""
    flat = s.flat()
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("parallel", "lora")]
    return TrainConfig(
        **{name: flat[name] for name in names},
        parallel=parallel_mode(s.parallel),
        lora=lora_spec(s.lora),
    )


def lora_spec(s: settings.LoraSettings) -> LoraSpec | None:
    """The adapters --lora trains (None without --lora)."""
    if not s.lora:
        return None
    alpha = float(s.lora_rank) if s.lora_alpha is None else s.lora_alpha
    return LoraSpec(s.lora_rank, alpha, s.lora_dropout, parse_targets(s.lora_targets))


def train_config_for(model_config: GPT2Config, **values: Any) -> TrainConfig:
    """What `gpt2 train` with these settings (by field name) trains `model_config` with."""
    given = settings.Settings.from_flat(values)
    return train_config(settings.resolve(given, model_config))


def default_folder() -> Path:
    return Path("runs") / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def new_plan(
    s: settings.Settings, model_config: GPT2Config, *, force: bool, main_process: bool
) -> Plan:
    """Check everything that could fail late; the folder is created by `start_folder`.

    Only the main process checks for existing outputs: the others may look after it wrote them.
    """
    data_dir = _data_dir()
    d, loop = s.data, s.loop
    prepared = _prepared_folder(d.dataset, data_dir)
    if prepared and examples.is_prepared_examples(prepared):
        s = _with_folder_mask(s, prepared)
    files = [prepared] if prepared else data.resolve_files(d.dataset, data_dir)
    val_files = data.resolve_files(d.val_dataset, data_dir) if d.val_dataset else None
    if val_files:
        val_fraction = 0.0
    elif prepared and not examples.is_prepared_examples(prepared):
        val_fraction = open_prepared(prepared).val_fraction
    else:
        val_fraction = settings.VAL_FRACTION
    folder = Path(loop.out) if loop.out else default_folder()
    lora = s.lora.lora
    if loop.output:
        output = Path(loop.output)
    elif lora:  # the adapter alone, in PEFT's format
        output = folder / ADAPTER_FOLDER
    else:
        output = folder / "final.npz" if loop.out else Path(SEED_OUTPUT)
    if main_process and output.exists() and not force:
        raise UserError(f"{output} already exists (use --force to overwrite, or --output)")
    if output.is_dir() and not lora:
        raise ParameterError("output", f"{output} is a folder; give a .npz file name")
    if lora and (output.is_file() or output.suffix == ".npz"):
        raise ParameterError("output", f"{output} is a file name; --lora writes an adapter folder")
    s = settings.resolve(s, model_config, val_fraction).replace(
        out=str(folder.resolve()), output=str(output.resolve())
    )
    resolved = DataFiles(
        dataset=[str(p.resolve()) for p in files],
        val_dataset=[str(p.resolve()) for p in val_files] if val_files else None,
        prepared=prepared is not None,
    )
    plan = Plan(RunFolder(folder), s, model_config, resolved, resumed=False)
    model_config.check_fits(plan.train_config.seq_length, "seq_length")
    if plan.train_config.lora is not None:
        plan.train_config.lora.check_fits(model_config)
    if main_process:
        RunFolder.check_new(folder)
    return plan


def _with_folder_mask(s: settings.Settings, folder: Path) -> settings.Settings:
    """The settings with the mask and template a prepared folder of examples was made with."""
    import json

    spec = json.loads((folder / examples.PREPARED).read_text())
    if s.data.mask_prompt and not spec.get("mask_prompt"):
        raise ParameterError(
            "mask_prompt", f"asks for a mask that {folder} lacks: prepare it with --mask-prompt"
        )
    return s.replace(
        mask_prompt=bool(spec.get("mask_prompt")), chat_template=spec.get("chat_template")
    )


def start_folder(plan: Plan) -> None:
    """Write run.json (a new run's folder is created here, once its data has loaded)."""
    if plan.resumed:
        plan.folder.write_spec(_to_json(plan))
    else:
        plan.folder, plan.lock = RunFolder.create(plan.folder.path, _to_json(plan))


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


def recorded_settings(path: str) -> settings.Settings:
    """The settings of the run in `path`, as its run.json records them."""
    return _read(RunFolder.open(Path(path))).settings


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
    recorded = _read(folder)
    changed = recorded.settings.replace(**overrides)  # each value's range checked
    plan = Plan(folder, changed, recorded.model_config, recorded.files, resumed=True)
    if plan.output.exists() and not (force or plan.owns_output):
        raise UserError(
            f"this run writes its model to {plan.output}, outside {folder.path}, and that file "
            "exists (another run's?): add --force to overwrite it"
        )
    return plan


# ---- run.json -------------------------------------------------------------------------------


def _to_json(plan: Plan) -> dict[str, Any]:
    output, folder = plan.output.resolve(), plan.folder.path.resolve()
    return {
        "settings": {k: v for k, v in plan.settings.flat().items() if k not in _PLACES},
        "model_config": plan.model_config.to_hf(),
        "data": dataclasses.asdict(plan.files),
        "output": str(output.relative_to(folder) if output.is_relative_to(folder) else output),
    }


def _read(folder: RunFolder) -> Plan:
    """The run recorded in the folder's run.json, checked; any version this gpt2 reads."""
    file = folder.path / RUN_FILE
    spec = folder.spec()
    if spec["version"] == 1:
        spec = _from_version_1(spec, file)
    if isinstance(spec.get("settings"), dict):
        spec = {**spec, "settings": {**_ADDED_LATER, **spec["settings"]}}
    check_spec(spec, file)
    output = folder.path / spec["output"]  # an absolute output stays as it is
    places = {"out": str(folder.path.resolve()), "output": str(output.resolve())}
    recorded = settings.Settings.from_flat({**spec["settings"], **places})
    model_config = GPT2Config.from_hf(spec["model_config"])
    files = DataFiles(**{f.name: spec["data"][f.name] for f in dataclasses.fields(DataFiles)})
    return Plan(folder, recorded, model_config, files, resumed=True)


# Settings that came after a run.json could be written without them: such a run had them off
_ADDED_LATER = {"mask_prompt": False, "chat_template": "chat"}
_SECTIONS = {"settings": dict, "model_config": dict, "data": dict, "output": str}


def check_spec(spec: dict[str, Any], file: Path) -> None:
    """Every section and setting of a version 2 run.json, of the right type, its data files
    present. A setting that may change on --resume, or one of --lora's, takes its default where
    the file lacks it (written by a gpt2 from before that setting)."""
    for key, kind in _SECTIONS.items():
        if not isinstance(spec.get(key), kind):
            raise UserError(f"{file}: {key} is missing or not a {kind.__name__}")
    stored = [name for name in settings.FIELDS if name not in _PLACES]
    # A run.json from before --lora lacks its settings: that run trained without adapters
    later = settings.flat_names("lora")
    needed = [name for name in settings.fixed_names() if name not in (*_PLACES, *later)]
    for section, names in (("settings", needed), ("data", DataFiles.__dataclass_fields__)):
        missing = [name for name in names if name not in spec[section]]
        if missing:
            raise UserError(f"{file}: {section}.{missing[0]} is missing")
    for name, value in spec["settings"].items():
        if name not in stored:
            raise UserError(f"{file}: settings.{name} is not a setting")
        settings.check_value(name, value, f"{file}: settings.")
    check_types(DataFiles, spec["data"], f"{file}: data.")
    files = spec["data"]
    for name in files["dataset"] + (files["val_dataset"] or []):
        if not isinstance(name, str):
            raise UserError(f"{file}: data.dataset holds {name!r}, not a file name")
        prepared = is_prepared(name) or examples.is_prepared_examples(name)
        if not (prepared if files["prepared"] else Path(name).is_file()):
            raise UserError(
                f"{file}: the run's dataset file {name} is gone; restore it to resume "
                "(a resumed run reads the same data), or start a new run"
            )


def _from_version_1(spec: dict[str, Any], file: Path) -> dict[str, Any]:
    """Version 2's shape of a version 1 run.json (gpt2 before each setting was stored once).

    Version 1 kept a run's numbers in sections ("model", "data", "train", "loop") and,
    from some point on, every setting again under "settings". The sections are what the run
    trained with, so they win; a file without "settings" takes the defaults for the rest, its
    dataset files as the dataset and its parallel mode from "train".
    """
    for key in ("model", "data", "train", "loop"):
        if not isinstance(spec.get(key), dict):
            raise UserError(f"{file}: {key} is missing or not a dict")
    model, files, train = spec["model"], spec["data"], spec["train"]
    values = spec.get("settings") or {
        **settings.Settings().flat(),
        "dataset": files.get("dataset"),
        "val_dataset": files.get("val_dataset") or [],
        "fsdp": train.get("parallel") == "fsdp",
        "data_parallel": train.get("parallel") == "data-parallel",
    }
    values = {
        **values,
        **{k: v for k, v in train.items() if k != "parallel"},
        **spec["loop"],
        **{k: files[k] for k in ("val_fraction", "errors", "eval_batches") if k in files},
        "model": model.get("source"),
        "init": model.get("init"),
        "tokenizer": spec.get("tokenizer"),
    }
    return {
        "settings": {k: v for k, v in values.items() if k not in _PLACES},
        "model_config": model.get("config"),
        "data": {
            "dataset": files.get("dataset"),
            "val_dataset": files.get("val_dataset"),
            "prepared": files.get("prepared", False),
            "token_hash": files.get("token_hash"),
        },
        "output": spec.get("output"),
    }


def initial_weights(plan: Plan, trainer: Trainer, load_model) -> TrainState:
    """The latest checkpoint's state when resuming, else the starting model's weights."""
    latest = plan.folder.latest() if plan.resumed else None
    if latest is not None:
        step_file, path = latest
        like = trainer.trained_template()
        step, params, opt_state = load_checkpoint(path, like, trainer.opt_state_template(like))
        if step != step_file:
            raise UserError(f"checkpoint {path} says step {step}; its name says {step_file}")
        base = starting_params(plan, load_model) if trainer.lora else None  # LoRA: not saved
        return trainer.create_state(params, opt_state, step, base)
    return trainer.fresh_state(starting_params(plan, load_model))


def starting_params(plan: Plan, load_model) -> Any:
    m, config = plan.settings.model, plan.model_config
    if m.init:
        from gpt2cli.model import init_params

        return init_params(config, seed=plan.train_config.seed)
    loaded_config, params = load_model(m.model)
    if loaded_config != config:
        raise UserError(
            f"model {m.model} no longer has the run's shape ({loaded_config} differs from {config})"
        )
    return params


def source_config(
    model: str | None, init: str | None, load_model, shape: dict[str, int | None]
) -> tuple[GPT2Config, Any]:
    """(config, params or None) of the starting model: a new shape, or a loaded model."""
    if init:
        return new_model_config(init, **shape), None
    return load_model(model)


def load_data(plan: Plan, tokenizer, progress=None) -> TrainData | ExampleData:
    d, tc, files = plan.settings.data, plan.train_config, plan.files
    paths = [Path(f) for f in files.dataset]
    if files.prepared and examples.is_prepared_examples(paths[0]):
        return _load_examples(plan, tokenizer)
    if not files.prepared and examples.is_examples(paths, d.mask_prompt):
        return _load_examples(plan, tokenizer)
    if files.prepared:
        tokens, digest = _prepared_tokens(paths[0], tokenizer)
    else:
        tokens = data.load_tokens(paths, tokenizer, errors=d.errors, progress=progress)
        digest = hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()[:16]
    if files.val_dataset:
        val_paths = [Path(f) for f in files.val_dataset]
        val_tokens = data.load_tokens(val_paths, tokenizer, errors=d.errors, progress=progress)
        train, _ = data.split(tokens, tc.seq_length, 0.0)
        val, _ = data.split(val_tokens, tc.seq_length, 0.0)
    else:
        train, val = data.split(tokens, tc.seq_length, d.val_fraction)
    _check_digest(files, digest)
    sampler = data.Sampler(len(train), tc.seed)
    return TrainData(train, val, sampler, tc.batch_size, tc.grad_accum, d.eval_batches)


def _load_examples(plan: Plan, tokenizer) -> ExampleData:
    from gpt2cli.chat import template

    d, tc, files = plan.settings.data, plan.train_config, plan.files
    chat = template(d.chat_template)

    def read(paths: list[str]) -> examples.Examples:
        if files.prepared and paths is files.dataset:
            fingerprint = data.tokenizer_fingerprint(tokenizer)
            return examples.read_prepared(Path(paths[0]), fingerprint, tc.seq_length + 1)[1]
        return examples.read_examples(
            [Path(p) for p in paths],
            chat,
            tokenizer,
            mask_prompt=d.mask_prompt,
            max_tokens=tc.seq_length + 1,
        )

    train = read(files.dataset)
    if files.val_dataset:
        val = read(files.val_dataset)
    else:
        held = int(len(train) * d.val_fraction)
        if held >= len(train):
            raise ParameterError("val_fraction", f"{d.val_fraction} leaves no example to train on")
        val = train.subset(len(train) - held, len(train)) if held else None
        train = train.subset(0, len(train) - held)
    digest = hashlib.sha256()
    for array in (train.ids, train.counts, train.offsets):
        digest.update(np.ascontiguousarray(array).tobytes())
    _check_digest(files, digest.hexdigest()[:16])
    sampler = data.Sampler(len(train), tc.seed)
    return ExampleData(
        train,
        val,
        sampler,
        tc.batch_size,
        tc.grad_accum,
        tc.seq_length,
        tokenizer.eos_id,
        d.eval_batches,
    )


def _check_digest(files: DataFiles, digest: str) -> None:
    """Record the tokens' fingerprint (a new run), or check it is the recorded one (resume)."""
    if files.token_hash is None:
        files.token_hash = digest
    elif files.token_hash != digest:
        raise UserError(
            "the dataset files changed since this run started (their tokens differ); "
            "a resumed run needs the same data: restore the files or start a new run"
        )


def _prepared_folder(dataset: list[str], data_dir: str | None) -> Path | None:
    """The folder of a `gpt2 prepare`d dataset, when that is what --dataset names."""
    import os

    folders = [Path(data_dir or "", os.path.expanduser(d)) for d in dataset]
    prepared = [f for f in folders if is_prepared(f) or examples.is_prepared_examples(f)]
    if prepared and len(dataset) > 1:
        raise ParameterError(
            "dataset",
            f"{prepared[0]} is a prepared folder: give it alone (prepare the other files into "
            "it, or into a folder of their own)",
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
