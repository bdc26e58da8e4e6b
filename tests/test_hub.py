"""Model references: local files and folders, and the Hub path with the network mocked out."""

import shutil

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import errors as hub_errors

from gpt2cli.errors import UserError
from gpt2cli.hub import load_model, load_tokenizer, resolve
from tests.conftest import TINY_A, TINY_B, cli


def _http_error(cls):
    request = httpx2.Request("GET", "https://hub.invalid/api/models/x")
    return cls("boom", response=httpx2.Response(404, request=request))


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace the download call; record what was asked for."""
    calls = []

    def install(result):
        def snapshot_download(repo_id, **kwargs):
            calls.append((repo_id, kwargs))
            if isinstance(result, BaseException):
                raise result
            return str(result)

        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        return calls

    return install


def test_local_folder_and_npz_resolve_without_the_network(fake_hub, tmp_path):
    calls = fake_hub(AssertionError("no download for local paths"))
    assert resolve(str(TINY_A)) == TINY_A
    assert load_model(str(TINY_B))[0].n_inner == 40
    assert calls == []


def test_missing_local_path_is_not_sent_to_the_hub(fake_hub):
    calls = fake_hub(AssertionError("no download"))
    with pytest.raises(UserError, match="does not exist"):
        resolve("./nowhere/model.npz")
    assert calls == []


def test_hub_download_fetches_only_safe_files(fake_hub, tmp_path):
    shutil.copytree(TINY_A, tmp_path / "snap")
    calls = fake_hub(tmp_path / "snap")
    config, _ = load_model("someone/tiny")
    assert config.n_embd == 16
    repo, kwargs = calls[0]
    assert repo == "someone/tiny"
    patterns = kwargs["allow_patterns"]
    assert "config.json" in patterns and "*.safetensors" in patterns
    assert not any(p.endswith((".bin", ".pt", ".pth", ".msgpack", ".h5")) for p in patterns)


def test_incomplete_cached_snapshot_is_reported(fake_hub, tmp_path):
    (tmp_path / "snap").mkdir()
    shutil.copy(TINY_A / "config.json", tmp_path / "snap")
    fake_hub(tmp_path / "snap")
    with pytest.raises(UserError, match="no model.safetensors"):
        load_model("someone/tiny")


@pytest.mark.parametrize(
    "error,message",
    [
        (hub_errors.LocalEntryNotFoundError("no network"), "offline and not in the local cache"),
        (hub_errors.OfflineModeIsEnabled("offline"), "offline and not in the local cache"),
        (_http_error(hub_errors.RepositoryNotFoundError), "no Hub repo 'someone/tiny'"),
        (_http_error(hub_errors.GatedRepoError), "is gated"),
        (_http_error(hub_errors.HfHubHTTPError), "cannot download 'someone/tiny': boom"),
    ],
)
def test_hub_failures_become_one_line_with_a_hint(fake_hub, error, message):
    fake_hub(error)
    with pytest.raises(UserError, match=message) as info:
        load_model("someone/tiny")
    assert "\n" not in str(info.value)
    assert "local .npz file or Hugging Face folder" in str(info.value)


def test_tokenizer_comes_from_the_model_folder_or_the_bundle(tmp_path):
    assert load_tokenizer(model_ref=str(TINY_A)).encode("Hello world") == [15496, 995]
    assert load_tokenizer(model_ref=str(TINY_B)).eos_id == 50256  # no files there: bundled
    with pytest.raises(UserError, match="no tokenizer files"):
        load_tokenizer(str(TINY_B))


def test_the_caller_chooses_what_draws_a_download(fake_hub, tmp_path):
    from gpt2cli.progress import hub_progress_class

    shutil.copytree(TINY_A, tmp_path / "snap")
    calls = fake_hub(tmp_path / "snap")
    bars = hub_progress_class()
    load_model("someone/tiny", tqdm_class=bars)
    load_tokenizer("someone/tiny", tqdm_class=bars)
    load_tokenizer(model_ref="someone/tiny", tqdm_class=bars)
    assert [kwargs["tqdm_class"] for _, kwargs in calls] == [bars, bars, bars]
    load_model("someone/tiny")  # the Python API: no terminal of its own, so nothing drawn
    quiet = calls[-1][1]["tqdm_class"](total=10, desc="model.safetensors")
    assert quiet is not bars and quiet.disable


def test_commands_draw_downloads_on_stderr(fake_hub, tmp_path):
    shutil.copytree(TINY_A, tmp_path / "snap")
    calls = fake_hub(tmp_path / "snap")
    assert cli("inspect", "someone/tiny").exit_code == 0
    assert cli("convert", "someone/tiny", str(tmp_path / "m.npz")).exit_code == 0
    assert all(hasattr(kwargs["tqdm_class"], "rich_progress") for _, kwargs in calls)
    assert len(calls) == 2


def test_download_progress_adapter_counts_bytes_like_tqdm():
    from gpt2cli.progress import hub_progress_class

    bar_class = hub_progress_class()
    bar = bar_class(total=100, desc="model.safetensors", unit="B", name="huggingface_hub")
    bar.update(40)
    bar.update(60)
    (task,) = bar_class.rich_progress.tasks
    assert (task.description, task.completed, task.total) == ("model.safetensors", 100, 100)
    bar.close()
    assert not bar_class.rich_progress.live.is_started
