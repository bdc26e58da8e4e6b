"""The importable Python API, without the CLI."""

import subprocess
import sys

import numpy as np
import pytest

import gpt2cli
from gpt2cli.errors import UserError
from tests.conftest import TINY_B


def test_load_logits_save_load(tmp_path, golden):
    config, params = gpt2cli.load(str(TINY_B))
    ids = golden["arrays"]["tiny_b/input_ids"]
    out = gpt2cli.logits(config, params, ids)
    assert out.shape == (2, 16, 512)
    np.testing.assert_allclose(out, golden["arrays"]["tiny_b/logits"], atol=1e-4)
    path = gpt2cli.save(tmp_path / "m.npz", config, params)
    config2, params2 = gpt2cli.load(str(path))
    np.testing.assert_array_equal(gpt2cli.logits(config2, params2, ids), out)


def test_logits_accepts_one_sequence_and_rejects_bad_ids():
    config, params = gpt2cli.load(str(TINY_B))
    assert gpt2cli.logits(config, params, [1, 2, 3]).shape == (1, 3, 512)
    with pytest.raises(UserError, match=r"token ids must lie in \[0, 512\)"):
        gpt2cli.logits(config, params, [[1, 600]])
    with pytest.raises(
        UserError, match="input_ids length 65 exceeds the model.s context window of 64 tokens"
    ):
        gpt2cli.logits(config, params, np.ones((1, 65), int))


def test_importing_the_package_and_the_cli_does_not_import_jax():
    code = (
        "import sys, gpt2cli, gpt2cli.cli.app; "
        "print(sorted(m for m in ('jax', 'flax', 'transformers', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
