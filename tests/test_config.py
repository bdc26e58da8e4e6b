import json

import pytest

from gpt2cli.config import PRESETS, GPT2Config, preset
from gpt2cli.errors import UserError
from tests.conftest import TINY_A, TINY_B

KNOWN_TOTALS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "distilgpt2": 81_912_576,
}


@pytest.mark.parametrize("name,total", KNOWN_TOTALS.items())
def test_preset_param_counts_match_published_totals(name, total):
    assert preset(name).num_params() == total


def test_fixture_param_counts_match_transformers(golden):
    for key, folder in (("tiny_a", TINY_A), ("tiny_b", TINY_B)):
        config = GPT2Config.from_json_file(folder / "config.json")
        assert config.num_params() == golden["models"][key]["param_count"]


def test_hf_config_fields_are_read(golden):
    config = GPT2Config.from_json_file(TINY_B / "config.json")
    assert (config.n_inner, config.activation_function, config.eos_token_id) == (40, "gelu", 511)
    assert GPT2Config.from_json_file(TINY_A / "config.json").scale_attn_by_inverse_layer_idx


def test_to_hf_round_trips():
    for config in PRESETS.values():
        assert GPT2Config.from_hf(json.loads(json.dumps(config.to_hf()))) == config


@pytest.mark.parametrize(
    "field,value",
    [
        ("add_cross_attention", True),
        ("reorder_and_upcast_attn", True),
        ("tie_word_embeddings", False),
        ("activation_function", "mish"),
        ("model_type", "llama"),
    ],
)
def test_math_changing_fields_are_refused_by_name(field, value):
    with pytest.raises(UserError, match=field):
        GPT2Config.from_hf({**GPT2Config().to_hf(), field: value})


def test_heads_must_divide_width():
    with pytest.raises(UserError, match="n_embd must be divisible by n_head .* n_embd=100 is not"):
        GPT2Config(n_embd=100, n_head=3)


def test_unknown_preset_lists_choices():
    with pytest.raises(UserError, match="gpt2-medium"):
        preset("gpt3")


def test_token_ids_in_the_vocabulary_pass_and_others_are_named():
    config = GPT2Config(vocab_size=512, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    config.check_ids([0, 511], "ids")
    config.check_ids([], "ids")
    message = "has token id {} but the model's vocabulary has 512 ids: token ids must lie in"
    with pytest.raises(UserError, match=r"^input_ids " + message.format(512) + r" \[0, 512\)$"):
        config.check_ids([[3, 512]], "input_ids")
    with pytest.raises(UserError, match=r"^prompt " + message.format(-1) + r" .*; try again$"):
        config.check_ids([-1, 9999], "prompt", "; try again")
