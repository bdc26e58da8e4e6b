"""Instruction and chat data: the three row forms, one rendering for chat, serve and training,
the loss mask, and SFT runs that resume exactly and evaluate over the counted tokens."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2cli.chat import TEMPLATES, render
from gpt2cli.errors import UserError
from gpt2cli.serve.protocol import APIError, chat_ids
from gpt2cli.tokenizer import bundled
from gpt2cli.training import examples
from tests.conftest import cli as gpt2
from tests.helpers_chat import greedy_session
from tests.helpers_train import TINY_A, isolate, losses

CHAT = TEMPLATES["chat"]
CONVERSATION = [
    ("system", "You answer in one word."),
    ("user", "What colour is the sky?"),
    ("assistant", "Blue."),
    ("user", "And  the grass?\nPlease."),
    ("assistant", "Green."),
]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    isolate(tmp_path, monkeypatch)


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def qa_rows(n: int = 24) -> list[dict]:
    words = ["red", "blue", "green", "black", "white", "gold"]
    return [
        {"prompt": f"Repeat the word: {words[i % 6]}", "completion": words[i % 6]} for i in range(n)
    ]


# ---- one rendering -------------------------------------------------------------------------


def test_serve_sends_what_render_writes():
    tok = bundled()
    asked = CONVERSATION[:-1]
    body = [{"role": r, "content": c} for r, c in asked]
    assert chat_ids(body, tok) == render(asked, CHAT, tok).ids
    text = tok.decode(render(asked, CHAT, tok).ids)
    assert text == (
        "You answer in one word.\nUser: What colour is the sky?\nAssistant: Blue.<|endoftext|>"
        "\nUser: And the grass? Please.\nAssistant:"
    )


def test_a_chat_session_holds_the_transcript_render_writes():
    session = greedy_session(max_new_tokens=4, system="You answer in one word.")
    reply = "".join(session.send("What colour is the sky?"))
    rendered = render(
        [CONVERSATION[0], CONVERSATION[1], ("assistant", reply)], CHAT, session.tokenizer
    )
    held = session.transcript_ids()
    assert held[-1] == session.tokenizer.eos_id  # the end-of-turn marker follows the reply
    # the reply's ids are the model's own tokens; their text is the rendered one
    assert session.tokenizer.decode(held) == session.tokenizer.decode(rendered.ids)
    prompt = render(CONVERSATION[:2], CHAT, session.tokenizer).ids
    assert held[: len(prompt)] == prompt  # the first turn sent exactly the rendered prompt


def test_training_rows_are_rendered_as_chat_renders_them(tmp_path):
    tok = bundled()
    messages = [{"role": r, "content": c} for r, c in CONVERSATION]
    chat = write_rows(tmp_path / "chat.jsonl", [{"messages": messages}])
    pairs = write_rows(tmp_path / "pc.jsonl", [{"prompt": "Hi there", "completion": "Hello."}])
    got = examples.read_examples(
        [tmp_path / "chat.jsonl", tmp_path / "pc.jsonl"], CHAT, tok, mask_prompt=True,
        max_tokens=128,
    )  # fmt: skip
    whole = render(CONVERSATION, CHAT, tok)
    pc = render([("user", "Hi there"), ("assistant", "Hello.")], CHAT, tok)
    assert got.ids.tolist() == whole.ids + pc.ids
    assert got.counts.tolist() == [int(c) for c in whole.replies + pc.replies]
    assert chat and pairs


# ---- the three forms, the mask -----------------------------------------------------------


def counted_text(ex: examples.Examples, i: int) -> str:
    a, b = ex.offsets[i], ex.offsets[i + 1]
    return bundled().decode([int(t) for t, c in zip(ex.ids[a:b], ex.counts[a:b], strict=True) if c])


def test_each_form_counts_what_it_should(tmp_path):
    tok = bundled()
    files = [
        write_rows(tmp_path / "t.jsonl", [{"text": "Once upon a time."}]),
        write_rows(tmp_path / "p.jsonl", [{"prompt": "Say hi", "completion": "hi"}]),
        write_rows(
            tmp_path / "m.jsonl",
            [
                {
                    "messages": [
                        {"role": "user", "content": "a"},
                        {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"},
                        {"role": "assistant", "content": "d"},
                    ]
                }
            ],
        ),  # fmt: skip
    ]
    paths = [tmp_path / f for f in ("t.jsonl", "p.jsonl", "m.jsonl")]
    masked = examples.read_examples(paths, CHAT, tok, mask_prompt=True, max_tokens=128)
    assert len(masked) == 3 and files
    assert counted_text(masked, 0) == "Once upon a time.<|endoftext|>"
    assert counted_text(masked, 1) == " hi<|endoftext|>"
    assert counted_text(masked, 2) == " b<|endoftext|> d<|endoftext|>"
    whole = examples.read_examples(paths, CHAT, tok, mask_prompt=False, max_tokens=128)
    assert whole.counts.all() and (whole.ids == masked.ids).all()
    cut = examples.read_examples(paths, CHAT, tok, mask_prompt=True, max_tokens=8)
    assert cut.cut == 2 and (np.diff(cut.offsets) <= 8).all()


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"messages": [{"role": "robot", "content": "x"}]}'], "line 1: messages[0] has role 'robot'"),
        (['{"messages": [{"role": "user"}]}'], "line 1: messages[0] must be an object with role and"),
        (['{"prompt": "a", "completion": "b"}', "", '{"text": "c"}'],
         "line 3: a text row in a file of completion rows (line 1)"),
        (['{"text": "a"}', "{oops"], "line 2 is not JSON"),
        (['{"text": "a"}', "[" * 100_000], "line 2 is nested too deeply to read as JSON"),
        (['{"prompt": "a"}'], "line 1: a row needs text, prompt and completion, or messages"),
        (['{"messages": [{"role": "user", "content": "a"}]}'], "line 1: has no assistant message"),
        (['{"messages": [{"role": "assistant", "content": "a"}]}'],
         "line 1: messages[0]: an assistant message must follow a user message"),
        (['{"prompt": "a", "completion": 3}'], "line 1: completion must be a string"),
    ],
)  # fmt: skip
def test_a_bad_row_is_named_with_its_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="bad.jsonl " + message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)").replace("]", r"\]")):  # fmt: skip
        examples.read_examples([path], CHAT, bundled(), mask_prompt=True, max_tokens=64)


def test_train_refuses_a_bad_row_in_one_line_and_writes_nothing(tmp_path):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    write_rows(
        tmp_path / "bad.jsonl", [good] * 3 + [{"messages": [{"role": "bot", "content": "x"}]}]
    )
    done = gpt2("train", "--dataset", "bad.jsonl", "-m", str(TINY_A), "--steps", "1", "--out", "r")
    assert done.exit_code == 1
    assert "bad.jsonl line 4: messages[0] has role 'bot'" in done.output
    assert len(done.output.strip().splitlines()) == 1, done.output
    assert not (tmp_path / "r").exists()


def test_mask_prompt_needs_instruction_rows(tmp_path):
    (tmp_path / "plain.txt").write_text("Just some text. " * 50)
    done = gpt2("train", "--dataset", "plain.txt", "-m", str(TINY_A), "--mask-prompt", "--out", "r")
    assert done.exit_code == 1
    assert "--mask-prompt needs prompt/completion or messages rows" in done.output
    assert not (tmp_path / "r").exists()


def test_serve_still_names_an_unknown_role():
    with pytest.raises(APIError) as caught:
        chat_ids([{"role": "robot", "content": "x"}, {"role": "user", "content": "y"}], bundled())
    assert caught.value.param == "messages[0].role"


# ---- the masked loss --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from gpt2cli.hub import load_model
    from gpt2cli.model import GPT2

    config, params = load_model(str(TINY_A))
    return GPT2(config, jnp.float32), params


def batch_of(ex, pad: int):
    return examples.gather(ex, np.arange(len(ex)), 32, pad)


def test_the_loss_is_the_mean_over_the_counted_tokens_only(tmp_path, tiny):
    from gpt2cli.training.trainer import masked_loss

    model, params = tiny
    write_rows(tmp_path / "qa.jsonl", qa_rows(4))
    ex = examples.read_examples([tmp_path / "qa.jsonl"], CHAT, bundled(), mask_prompt=True,
                                max_tokens=33)  # fmt: skip
    tokens, weights = batch_of(ex, pad=0)
    total, count = masked_loss(model, params, (tokens, weights), None, True)
    # outside the training code: the full logits, the log-probability of each counted target
    logits, _ = model.apply({"params": params}, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], axis=-1)[..., 0]
    counted = weights > 0
    assert count == counted.sum() == 4 * 2  # " word" and <|endoftext|> per row
    np.testing.assert_allclose(total / count, -picked[counted].mean(), rtol=1e-5)

    # prompt and padding tokens give no gradient: the gradient of the loss with respect to
    # the logits is zero at every position that does not count
    def from_logits(logits):
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum((lse - target) * weights)

    grad = jax.grad(from_logits)(logits.astype(jnp.float32))
    assert np.abs(np.asarray(grad)[~counted]).max() == 0
    assert np.abs(np.asarray(grad)[counted]).max() > 0


def test_padding_and_prompt_targets_change_nothing(tmp_path, tiny):
    from gpt2cli.training.trainer import masked_loss

    model, params = tiny
    write_rows(tmp_path / "qa.jsonl", qa_rows(4))
    ex = examples.read_examples([tmp_path / "qa.jsonl"], CHAT, bundled(), mask_prompt=True,
                                max_tokens=33)  # fmt: skip

    def loss_and_grads(batch):
        return jax.value_and_grad(
            lambda p: masked_loss(model, p, batch, None, True)[0]
        )(params)  # fmt: skip

    tokens, weights = batch_of(ex, pad=0)
    (loss, grads) = loss_and_grads((tokens, weights))
    other, _ = batch_of(ex, pad=1234)  # other padding ids
    (loss2, grads2) = loss_and_grads((other, weights))
    assert loss == loss2
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), grads, grads2)))
    # the last token's target is padding: any id there leaves the loss alone; a counted one not
    last = np.asarray(tokens)
    changed = last.copy()
    changed[:, -1] = 99
    assert masked_loss(model, params, (changed, weights), None, True)[0] == loss


def test_grad_accumulation_means_over_the_step_s_counted_tokens(tmp_path):
    from gpt2cli.hub import load_model
    from gpt2cli.training.plan import train_config_for
    from gpt2cli.training.trainer import Trainer

    config, params = load_model(str(TINY_A))
    rows = qa_rows(3) + [{"prompt": "Repeat the words: red blue", "completion": "red blue"}]
    write_rows(tmp_path / "qa.jsonl", rows)
    ex = examples.read_examples([tmp_path / "qa.jsonl"], CHAT, bundled(), mask_prompt=True,
                                max_tokens=33)  # fmt: skip
    tokens, weights = batch_of(ex, pad=0)
    results = []
    for rows_, accum in ((4, 1), (2, 2)):
        tc = train_config_for(config, batch_size=rows_, grad_accum=accum, seq_length=32,
                              lr=1e-3, dropout=0.0, steps=1)  # fmt: skip
        trainer = Trainer(config, tc)
        state = trainer.create_state(params)
        batch = (tokens.reshape(accum, rows_, -1), weights.reshape(accum, rows_, -1))
        state, metrics = trainer.step(state, batch)
        results.append((float(metrics["loss"]), jax.device_get(state.params)))
    (loss1, p1), (loss2, p2) = results
    np.testing.assert_allclose(loss1, loss2, rtol=1e-5)
    k1, k2 = p1["h_0"]["mlp"]["c_fc"]["kernel"], p2["h_0"]["mlp"]["c_fc"]["kernel"]
    np.testing.assert_allclose(k1, k2, atol=1e-6)


# ---- runs ----------------------------------------------------------------------------------

RUN = ("-m", str(TINY_A), "--batch-size", "2", "--seq-length", "32", "--log-every", "1",
       "--lr", "1e-3", "--warmup", "0", "--decay-steps", "6", "--mask-prompt", "--eval-every",
       "3")  # fmt: skip


def test_an_sft_run_resumes_exactly_and_eval_scores_its_counted_tokens(tmp_path):
    write_rows(tmp_path / "qa.jsonl", qa_rows(40))
    data = ("--dataset", "qa.jsonl")
    done = gpt2("train", *data, *RUN, "--steps", "6", "--out", "whole")
    assert done.exit_code == 0, done.output
    assert "38 train examples" in done.output  # 5% held out
    done = gpt2("train", *data, *RUN, "--steps", "3", "--save-every", "3", "--out", "cut")
    assert done.exit_code == 0, done.output
    done = gpt2("train", "--resume", "cut", "--steps", "6")
    assert done.exit_code == 0, done.output
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    spec = json.loads((tmp_path / "whole" / "run.json").read_text())
    assert spec["settings"]["mask_prompt"] is True
    assert spec["settings"]["chat_template"] == "chat"

    scored = gpt2("eval", "-m", "whole/final.npz", *data, "--mask-prompt", "--json",
                  "--seq-length", "32")  # fmt: skip
    assert scored.exit_code == 0, scored.output
    figures = json.loads(scored.output.strip().splitlines()[-1])
    assert figures["tokens_scored"] == 40 * 2 and figures["examples"] == 40
    whole = gpt2("eval", "-m", "whole/final.npz", *data, "--json", "--seq-length", "32")
    assert json.loads(whole.output.strip().splitlines()[-1])["tokens_scored"] > 40 * 10


def test_a_changed_sft_file_refuses_to_resume(tmp_path):
    write_rows(tmp_path / "qa.jsonl", qa_rows(20))
    done = gpt2("train", "--dataset", "qa.jsonl", *RUN, "--steps", "1", "--out", "r")
    assert done.exit_code == 0, done.output
    write_rows(tmp_path / "qa.jsonl", qa_rows(21))
    done = gpt2("train", "--resume", "r", "--steps", "2")
    assert done.exit_code == 1 and "the dataset files changed" in done.output


def test_a_prepared_folder_carries_the_mask(tmp_path):
    write_rows(tmp_path / "qa.jsonl", qa_rows(20))
    done = gpt2("prepare", "qa.jsonl", "--mask-prompt", "--out", "sft")
    assert done.exit_code == 0, done.output
    spec = json.loads((tmp_path / "sft" / "examples.json").read_text())
    assert spec["mask_prompt"] is True and spec["examples"] == 20
    flags = [f for f in RUN if f != "--mask-prompt"]
    done = gpt2("train", "--dataset", "sft", *flags, "--steps", "2", "--out", "from-folder")
    assert done.exit_code == 0, done.output
    done = gpt2("train", "--dataset", "qa.jsonl", *RUN, "--steps", "2", "--out", "from-rows")
    assert done.exit_code == 0, done.output
    assert losses(tmp_path / "from-folder") == losses(tmp_path / "from-rows")
    recorded = json.loads((tmp_path / "from-folder" / "run.json").read_text())["settings"]
    assert recorded["mask_prompt"] is True

    done = gpt2("prepare", "qa.jsonl", "--out", "plain")
    assert done.exit_code == 0, done.output
    done = gpt2("train", "--dataset", "plain", *RUN, "--steps", "1", "--out", "r")
    assert done.exit_code == 1
    assert "--mask-prompt asks for a mask that" in done.output
    assert not (tmp_path / "r").exists()

    # eval scores the folder's examples with the folder's mask, as it scores the rows
    score = ("-m", "from-folder/final.npz", "--json", "--seq-length", "32")
    from_folder = gpt2("eval", *score, "--dataset", "sft")
    from_rows = gpt2("eval", *score, "--dataset", "qa.jsonl", "--mask-prompt")
    assert from_folder.exit_code == 0 and from_rows.exit_code == 0, from_folder.output
    figures = json.loads(from_folder.output.strip().splitlines()[-1])
    assert figures == json.loads(from_rows.output.strip().splitlines()[-1])
    assert figures["examples"] == 20 and figures["tokens_scored"] == 20 * 2
    done = gpt2("eval", *score, "--dataset", "plain", "--mask-prompt")
    assert done.exit_code == 1 and "--mask-prompt asks for a mask that" in done.output


def test_a_run_json_from_before_sft_resumes(tmp_path):
    (tmp_path / "plain.txt").write_text("The cat sat on the mat. " * 40)
    flags = [f for f in RUN if f != "--mask-prompt"]
    done = gpt2("train", "--dataset", "plain.txt", *flags, "--steps", "1", "--out", "old")
    assert done.exit_code == 0, done.output
    spec_file = tmp_path / "old" / "run.json"
    spec = json.loads(spec_file.read_text())
    del spec["settings"]["mask_prompt"], spec["settings"]["chat_template"]
    spec_file.write_text(json.dumps(spec))
    done = gpt2("train", "--resume", "old", "--steps", "2")
    assert done.exit_code == 0, done.output
    assert sorted(losses(tmp_path / "old")) == [1, 2]


MULTI = """
import dataclasses, json, sys
import jax, numpy as np
from pathlib import Path
from gpt2cli.chat import TEMPLATES
from gpt2cli.hub import load_model
from gpt2cli.tokenizer import bundled
from gpt2cli.training import data, examples
from gpt2cli.training.loop import ExampleData
from gpt2cli.training.plan import train_config_for
from gpt2cli.training.trainer import Trainer

config, params = load_model(sys.argv[1])
ex = examples.read_examples([Path(sys.argv[2])], TEMPLATES["chat"], bundled(),
                            mask_prompt=True, max_tokens=33)
single = train_config_for(config, batch_size=4, seq_length=32, lr=1e-2, min_lr=1e-3,
                          warmup=0, decay_steps=3, grad_accum=2)
out = {"devices": jax.device_count()}
for mode in ("single", "data-parallel", "fsdp"):
    trainer = Trainer(config, dataclasses.replace(single, parallel=mode))
    state = trainer.create_state(params)
    feed = ExampleData(ex, None, data.Sampler(len(ex), 0), 4, 2, 32, 50256)
    losses = []
    for step in range(3):
        state, metrics = trainer.step(state, feed.batch(step))
        losses.append(float(metrics["loss"]))
    out[mode] = losses
print(json.dumps(out))
"""


@pytest.mark.slow
def test_sft_steps_match_on_one_and_four_devices(tmp_path):
    import os
    import subprocess
    import sys

    rows = qa_rows(12) + [{"prompt": "Say: a b c d e f", "completion": "a b c d e f"}] * 4
    write_rows(tmp_path / "qa.jsonl", rows)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "GPT2_NO_COMPILE_CACHE": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
                        "--xla_backend_optimization_level=0"}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", MULTI, str(TINY_A), str(tmp_path / "qa.jsonl")],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    assert out["single"][0] > out["single"][-1]  # it learns
    for mode in ("data-parallel", "fsdp"):
        np.testing.assert_allclose(out[mode], out["single"], rtol=2e-5)


def test_text_rows_alone_are_documents_of_the_packed_corpus(tmp_path):
    from gpt2cli.training.data import tokenize_file

    tok = bundled()
    write_rows(tmp_path / "docs.jsonl", [{"text": "First doc."}, {"text": "Second one."}])
    ids = tokenize_file(tmp_path / "docs.jsonl", tok).tolist()
    assert ids == tok.encode("First doc.") + [tok.eos_id] + tok.encode("Second one.")
    assert not examples.is_examples([tmp_path / "docs.jsonl"], mask_prompt=False)
    write_rows(tmp_path / "mixed.jsonl", [{"text": "a"}, {"prompt": "b", "completion": "c"}])
    with pytest.raises(UserError, match="mixed.jsonl line 2: a row of text rows needs"):
        tokenize_file(tmp_path / "mixed.jsonl", tok)
