"""Model references -> files: a .npz checkpoint, a local HF folder, or a Hub repo id."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gpt2cli.config import GPT2Config
from gpt2cli.errors import UserError
from gpt2cli.tokenizer import GPT2Tokenizer, bundled, from_folder
from gpt2cli.weights import Params

if TYPE_CHECKING:
    from tqdm.auto import tqdm

MODEL_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json"]
TOKENIZER_FILES = ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"]


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.endswith(".npz") or ref.count("/") > 1


# Models that ship in the wheel, by name: they work offline, from the first minute.
BUNDLED = {"shakespeare": Path(__file__).parent / "assets" / "shakespeare.npz"}


def resolve(
    ref: str, patterns: list[str] | None = None, *, tqdm_class: type[tqdm] | None = None
) -> Path:
    """A local file or folder for `ref`, a bundled model by name, else a Hub repo id (fetched).

    `tqdm_class` draws the download's progress; without one nothing is drawn: this module
    knows no terminal, so the command that owns one passes it.
    """
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if ref in BUNDLED:
        return BUNDLED[ref]
    if _looks_like_path(ref):
        raise UserError(f"{ref} does not exist (expected a .npz file or a Hugging Face folder)")
    return download(ref, patterns or MODEL_FILES + TOKENIZER_FILES, tqdm_class)


def download(repo_id: str, patterns: list[str], tqdm_class: type[tqdm] | None = None) -> Path:
    """Fetch only the files we read (never pickles) from the Hub; one line on any failure."""
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download

    hint = (
        "; pass a local .npz file or Hugging Face folder instead, or try the bundled demo "
        "model: -m shakespeare"
    )
    try:
        folder = snapshot_download(
            repo_id, allow_patterns=patterns, tqdm_class=tqdm_class or _quiet_class()
        )
    except hub_errors.HFValidationError:
        raise UserError(
            f"{repo_id!r} is neither an existing path nor a valid Hub repo id"
        ) from None
    except (hub_errors.OfflineModeIsEnabled, hub_errors.LocalEntryNotFoundError):
        raise UserError(
            f"cannot download {repo_id!r}: offline and not in the local cache{hint}"
        ) from None
    except hub_errors.GatedRepoError:
        raise UserError(f"{repo_id!r} is gated: log in with `hf auth login` first{hint}") from None
    except hub_errors.RepositoryNotFoundError:
        raise UserError(f"no Hub repo {repo_id!r} (or it is private){hint}") from None
    except hub_errors.RevisionNotFoundError:
        raise UserError(f"{repo_id!r}: revision not found{hint}") from None
    except (hub_errors.HfHubHTTPError, OSError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot download {repo_id!r}: {first_line}{hint}") from None
    return Path(folder)


def _quiet_class() -> type[tqdm]:
    """huggingface_hub's bars, switched off (given no class, it would draw its own)."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class Quiet(hub_tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    return Quiet


def load_model(
    ref: str,
    *,
    finite: bool = False,
    tqdm_class: type[tqdm] | None = None,
    adapter: str | Path | None = None,
) -> tuple[GPT2Config, Params]:
    """(config, params as numpy) for any model reference; `finite`: refuse NaN/inf weights,
    which would only ever generate garbage. `tqdm_class`: see `resolve`. `adapter`: a LoRA
    adapter folder merged into the weights (adapter.py)."""
    from gpt2cli.checkpoint import describe_nonfinite, load_npz, nonfinite
    from gpt2cli.weights import load_hf_folder

    path = resolve(ref, tqdm_class=tqdm_class)
    config, params = load_hf_folder(path) if path.is_dir() else load_npz(path)
    if adapter is not None:
        from gpt2cli.adapter import apply_adapter

        params = apply_adapter(config, params, adapter)
    if finite and (bad := nonfinite(params)):
        raise UserError(f"model {ref} is broken: {describe_nonfinite(bad)}; load another model")
    return config, params


def load_tokenizer(
    tokenizer_ref: str | None = None,
    model_ref: str | None = None,
    *,
    tqdm_class: type[tqdm] | None = None,
) -> GPT2Tokenizer:
    """The named tokenizer, else the model folder's own, else the bundled GPT-2 one.
    `tqdm_class`: see `resolve`."""
    if tokenizer_ref is not None:
        folder = resolve(tokenizer_ref, TOKENIZER_FILES, tqdm_class=tqdm_class)
        tokenizer = from_folder(folder) if folder.is_dir() else None
        if tokenizer is None:
            raise UserError(
                f"{tokenizer_ref} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt)"
            )
        return tokenizer
    if model_ref is not None:
        folder = Path(model_ref).expanduser()
        if not folder.exists() and not _looks_like_path(model_ref):
            # already downloaded with the model: a cache hit
            folder = resolve(model_ref, tqdm_class=tqdm_class)
        if folder.is_dir() and (tokenizer := from_folder(folder)) is not None:
            return tokenizer
    return bundled()
