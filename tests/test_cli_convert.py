"""`gpt2 convert` and `gpt2 inspect`: the real console script, and the error paths via CliRunner."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import TINY_A, TINY_B, cli, run_gpt2
from tests.helpers_train import assert_opens_in_transformers


def test_convert_inspect_and_export_through_the_console_script(tmp_path):
    out = tmp_path / "tiny"  # no .npz suffix: must be written at exactly this path
    done = run_gpt2("convert", str(TINY_A), str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out) and out.is_file()

    shown = run_gpt2("inspect", str(out), "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["total_params"] == 812_752
    assert report["params"]["h_1/attn/c_attn/kernel"] == {
        "shape": [16, 48],
        "dtype": "float32",
        "count": 768,
    }
    assert report["size_bytes"] == out.stat().st_size

    back = run_gpt2("convert", str(out), str(tmp_path / "hf"), "--to", "hf")
    assert back.returncode == 0, back.stderr
    original = load_file(TINY_A / "model.safetensors")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert all(exported[k].tobytes() == v.tobytes() for k, v in original.items())


@pytest.mark.parametrize("source", ["npz", "hf"])
def test_an_hf_export_carries_the_tokenizer_and_generation_config(tmp_path, source):
    model = TINY_A  # an HF folder with GPT-2's vocab.json and merges.txt
    if source == "npz":  # no tokenizer of its own: the bundled one
        assert cli("convert", str(TINY_A), str(tmp_path / "a.npz")).exit_code == 0
        model = tmp_path / "a.npz"
    done = cli("convert", str(model), str(tmp_path / "hf"), "--to", "hf")
    assert done.exit_code == 0, done.output
    context = json.loads((TINY_A / "config.json").read_text())["n_positions"]
    assert_opens_in_transformers(tmp_path / "hf", context)
    hf = {p.name for p in (tmp_path / "hf").iterdir()}
    assert hf == {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"}  # fmt: skip


def test_a_path_that_is_there_but_not_a_file_or_a_folder_for_files_says_so():
    line = _one_error_line(cli("inspect", "/dev/null"))
    assert line == "error: /dev/null is not a regular file (expected a .npz checkpoint)"
    line = _one_error_line(cli("convert", str(TINY_A), "/proc/x.npz"))
    assert line == "error: cannot write /proc/x.npz: /proc takes no new files"


def test_inspect_prints_a_table_and_tree(tmp_path):
    done = run_gpt2("inspect", str(TINY_B))
    assert done.returncode == 0, done.stderr
    assert "n_inner" in done.stdout and "c_attn" in done.stdout
    assert "total parameters: 39,448" in done.stdout


def test_convert_to_bfloat16(tmp_path):
    result = cli(*["convert", str(TINY_B), str(tmp_path / "b.npz"), "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    report = cli(*["inspect", str(tmp_path / "b.npz"), "--json"])
    assert json.loads(report.stdout)["params"]["wte/embedding"]["dtype"] == "bfloat16"


def _one_error_line(result, exit_code=1):
    assert result.exit_code == exit_code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def _folder_with(tmp_path, config=True, weights=None, config_patch=None):
    folder = tmp_path / "model"
    folder.mkdir()
    if config:
        hf = json.loads((TINY_B / "config.json").read_text())
        hf.update(config_patch or {})
        (folder / "config.json").write_text(json.dumps(hf))
    if weights is not None:
        (folder / weights[0]).write_bytes(weights[1])
    return folder


def _npz_variant(tmp_path, change):
    cli(*["convert", str(TINY_B), str(tmp_path / "good.npz")])
    with np.load(tmp_path / "good.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    change(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    return tmp_path / "bad.npz"


BAD_SOURCES = {
    "missing source": (lambda p: p / "absent", "does not exist"),
    "no config.json": (
        lambda p: _folder_with(p, config=False, weights=("model.safetensors", b"x")),
        "no config.json",
    ),
    "pytorch_model.bin only": (
        lambda p: _folder_with(p, weights=("pytorch_model.bin", b"\x80\x02")),
        "safetensors only",
    ),
    "truncated safetensors": (
        lambda p: _folder_with(
            p, weights=("model.safetensors", (TINY_B / "model.safetensors").read_bytes()[:5000])
        ),
        "corrupt or incomplete download",
    ),
    "npz not ours": (
        lambda p: (np.savez(p / "x.npz", a=np.zeros(2)), p / "x.npz")[1],
        "not a gpt2 checkpoint",
    ),
    "pickled npz": (
        lambda p: _npz_variant(p, lambda a: a.update(w=np.array([object()], dtype=object))),
        "pickled objects",
    ),
    "wrong-shaped npz": (
        lambda p: _npz_variant(p, lambda a: a.update({"h_0/ln_1/bias": np.zeros(5, np.float32)})),
        "wrong shapes: h_0/ln_1/bias (5,)",
    ),
    "missing array npz": (
        lambda p: _npz_variant(p, lambda a: a.pop("ln_f/scale")),
        "missing 1 array(s): ln_f/scale",
    ),
    "unsupported config field": (
        lambda p: _folder_with(
            p, weights=("model.safetensors", b"x"), config_patch={"add_cross_attention": True}
        ),
        "add_cross_attention",
    ),
}


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_bad_sources_fail_with_one_line(tmp_path, case):
    make, message = BAD_SOURCES[case]
    source = make(tmp_path)
    out = tmp_path / "out.npz"
    result = cli(*["convert", str(source), str(out)])
    assert message in _one_error_line(result)
    assert not out.exists()


def test_existing_output_is_kept_without_force(tmp_path):
    out = tmp_path / "out.npz"
    out.write_bytes(b"keep me")
    result = cli(*["convert", str(TINY_B), str(out)])
    assert "already exists (use --force" in _one_error_line(result)
    assert out.read_bytes() == b"keep me"
    hf_out = tmp_path / "hf"
    hf_out.mkdir()
    (hf_out / "config.json").write_text("{}")
    result = cli(*["convert", str(TINY_B), str(hf_out), "--to", "hf"])
    assert "already exists" in _one_error_line(result)
    assert (hf_out / "config.json").read_text() == "{}"


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    result = cli(*["convert", str(TINY_B), str(blocker / "out.npz")])
    assert "cannot write" in _one_error_line(result)


def test_offline_hub_id_is_one_line_without_network(tmp_path):
    done = run_gpt2(
        "convert", "gpt2", str(tmp_path / "gpt2.npz"), env={"HF_HOME": str(tmp_path / "hf")}
    )
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert "offline" in done.stderr and "local .npz file" in done.stderr


def test_usage_errors_exit_2(tmp_path):
    assert cli(*["convert", str(TINY_B)]).exit_code == 2
    assert cli(*["convert", str(TINY_B), str(tmp_path / "x"), "--to", "onnx"]).exit_code == 2


def test_debug_shows_the_traceback(tmp_path):
    done = run_gpt2("--debug", "convert", str(tmp_path / "absent"), str(tmp_path / "o.npz"))
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_hub_layout_copy_converts(tmp_path):
    shutil.copytree(TINY_B, tmp_path / "copy")
    result = cli(*["convert", str(tmp_path / "copy"), str(tmp_path / "o.npz")])
    assert result.exit_code == 0, result.output
