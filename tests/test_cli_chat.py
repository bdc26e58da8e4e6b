"""`gpt2 chat` through the real console script: in a pseudo-terminal, and with piped stdin."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from gpt2cli.cli.chat_cmd import PROMPT, save_transcript
from gpt2cli.errors import UserError
from tests.conftest import TINY_A, gpt2_exe, run_gpt2
from tests.helpers_chat import greedy_session

pexpect = pytest.importorskip("pexpect", reason="pexpect drives the terminal (a dev dependency)")

# Greedy, and nothing else that changes the logits: the replies can be predicted in-process.
# A repetition penalty keeps tiny-a from repeating one token; temperature 0 stays deterministic.
# pexpect forks this (JAX-threaded) test process; the child execs `gpt2` at once, so the
# warning about locks held by other threads does not apply.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")

GREEDY = ["--top-p", "1", "--repetition-penalty", "1.3", "--max-new-tokens", "6"]


def _session(**kwargs):
    from gpt2cli.generate import SamplingParams

    return greedy_session(sampling=SamplingParams(repetition_penalty=1.3), **kwargs)


@pytest.fixture(scope="module")
def expected() -> dict:
    """What the CLI must print, computed in-process: a stop string the model reaches, and the
    greedy replies of a scripted conversation."""
    probe = _session()
    probe_reply = "".join(probe.send("Hi"))
    words = probe_reply.split()
    assert len(words) >= 2, probe_reply
    stop = words[-1][:3]  # the model writes it in its first reply: a reply that ends at a stop

    session = _session(stops=(stop,))
    first = "".join(session.send("Hi"))
    assert session.turns[-1].finish_reason == "stop"
    second = "".join(session.send("How are you?"))
    with_history = "".join(session.send("Hi"))
    assert with_history != first  # so a reply equal to `first` shows the history was emptied
    return {"stop": stop, "first": first, "second": second}


def _reply(child: pexpect.spawn, message: str) -> str:
    child.sendline(message)
    child.expect_exact(message + "\r\n")  # the echo of the typed line
    child.expect_exact(PROMPT)
    return child.before.replace("\r\n", "\n").strip()


def _spawn_model(model, *args: str) -> pexpect.spawn:
    """`gpt2 chat` in a pseudo-terminal, waiting for its first prompt."""
    child = pexpect.spawn(
        gpt2_exe(),
        ["chat", "-m", str(model), *args],
        encoding="utf-8",
        timeout=90,
        dimensions=(40, 300),
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    child.expect_exact(PROMPT)
    return child


def test_chat_in_a_terminal(expected):
    child = _spawn_model(TINY_A, *GREEDY, "--temperature", "1", "--stop", expected["stop"])

    child.sendline("/frobnicate")
    child.expect_exact("unknown command /frobnicate")
    child.expect_exact("/reset")  # the help follows
    child.expect_exact(PROMPT)

    child.sendline("/set top_p 2")
    child.expect_exact("top_p must be in (0, 1]")  # one line, and the chat goes on
    child.expect_exact(PROMPT)

    child.sendline("/set temperature 0")
    child.expect_exact("temperature = 0.0")
    child.expect_exact(PROMPT)

    assert _reply(child, "Hi") == expected["first"]  # streamed, ended at the stop string
    assert _reply(child, "How are you?") == expected["second"]

    child.sendline("/reset")
    child.expect_exact("history cleared")
    child.expect_exact(PROMPT)
    assert _reply(child, "Hi") == expected["first"]  # deterministic, and the history is gone

    child.sendline("/stats")
    child.expect(r"last reply: \d+ tokens in .* tokens/s.* tokens in the context")
    child.expect_exact(PROMPT)

    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """tiny-a with an 8192-token window (its 128 position rows repeated): a reply long enough
    to be interrupted on any machine."""
    from gpt2cli.checkpoint import save_npz
    from gpt2cli.hub import load_model

    config, params = load_model(str(TINY_A))
    params = dict(params, wpe={"embedding": np.tile(params["wpe"]["embedding"], (64, 1))})
    path = tmp_path_factory.mktemp("long") / "long.npz"
    return save_npz(path, config.replace(n_positions=8192), params)


def test_ctrl_c_stops_a_reply_keeps_it_and_the_chat_goes_on(long_model, tmp_path):
    child = _spawn_model(long_model, "--max-new-tokens", "8000", "--temperature", "1")
    child.sendline("Tell me a long story")
    child.expect_exact("Tell me a long story\r\n")
    child.expect(r"\S")  # the reply has started
    child.sendintr()
    started = child.after
    child.expect_exact("(reply interrupted")
    # the terminal echoes ^C wherever the stream was when the key arrived: not part of the reply
    shown = (started + child.before).replace("\r\n", "\n").replace("^C", "")
    child.expect_exact(PROMPT)

    saved = tmp_path / "chat.json"
    child.sendline(f"/save {saved}")
    child.expect_exact("saved 1 turn to")
    child.expect_exact(PROMPT)
    (turn,) = json.loads(saved.read_text())["turns"]
    assert turn["finish_reason"] == "interrupted"  # not "length": it stopped early
    assert turn["assistant"].split()[-1] in shown  # the partial reply, as shown, is kept

    child.sendline("/set max_new_tokens 5")
    child.expect_exact(PROMPT)
    assert _reply(child, "Still there?")  # the session goes on

    child.send("half a line")
    child.expect_exact("half a line")
    child.sendintr()  # Ctrl-C on a typed line drops the line, not the chat
    child.expect_exact(PROMPT)
    child.sendintr()  # on an empty prompt it ends the chat
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_piped_stdin_is_one_turn_per_line_and_one_block_per_reply(expected):
    result = run_gpt2(
        "chat",
        "-m",
        str(TINY_A),
        *GREEDY,
        "--temperature",
        "0",
        "--stop",
        expected["stop"],
        input="Hi\nHow are you?\n/reset\nHi\n",
    )
    assert result.returncode == 0, result.stderr
    first, second = expected["first"], expected["second"]
    assert result.stdout == f"{first}\n\n{second}\n\n{first}\n\n"
    assert "history cleared" in result.stderr


def test_piped_json_is_one_object_per_reply_and_a_closed_pipe_ends_quietly():
    child = subprocess.Popen(
        [gpt2_exe(), "chat", "-m", str(TINY_A), *GREEDY, "--temperature", "0", "--json"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    child.stdin.write("Hi\n" * 300)
    child.stdin.close()
    record = json.loads(child.stdout.readline())
    child.stdout.close()  # like `| head -1`: the reader leaves while replies are still coming
    assert child.wait(timeout=120) == 0
    assert "rror" not in child.stderr.read()
    assert record["user"] == "Hi"
    assert record["finish_reason"] == "length"
    assert record["generated_tokens"] == 6


def test_save_writes_markdown_or_json_and_never_overwrites(tmp_path):
    session = _session()
    reply = "".join(session.send("Hi"))
    md = save_transcript(session, tmp_path / "chat.md", force=False)
    assert md.read_text() == (
        "# Chat (chat template)\n\n"
        "> A conversation between a curious user and a helpful assistant.\n\n"
        f"**User:** Hi\n\n**Assistant:** {reply}\n"
    )
    data = json.loads(save_transcript(session, tmp_path / "chat.json", force=False).read_text())
    assert data["turns"] == [{"user": "Hi", "assistant": reply, "finish_reason": "length"}]
    with pytest.raises(UserError, match="exists.*--force"):
        save_transcript(session, md, force=False)
    save_transcript(session, md, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json", "chat.md"]
