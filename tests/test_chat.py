"""The chat session core: window planning, reply ids, the prompt cache, long sessions."""

from __future__ import annotations

import pytest

from gpt2cli.chat import TEMPLATES, ChatSession, reply_ids, template, turns_to_drop
from gpt2cli.errors import UserError
from gpt2cli.tokenizer import bundled
from tests.helpers_chat import greedy_session

# ---- pure parts ----------------------------------------------------------------------


def test_turns_to_drop_keeps_everything_that_fits():
    assert turns_to_drop(10, [20, 20, 20], 10, room=80) == 0
    assert turns_to_drop(10, [20, 20, 20], 11, room=80) > 0


def test_turns_to_drop_frees_half_the_room_from_the_oldest_end():
    # room 100 - preamble 10 - new 10 = 80 free; keep the newest turns within 40 tokens
    assert turns_to_drop(10, [30, 15, 15, 15, 15], 10, room=100) == 3
    # a single turn larger than half the free room goes too
    assert turns_to_drop(10, [30, 50], 10, room=80) == 2


def test_reply_ids_keeps_the_generated_tokens_inside_the_text():
    tok = bundled()
    generated = tok.encode(" Hello there.\nUser: more")
    ids = reply_ids(tok, generated, " Hello there.")
    assert tok.decode(ids) == " Hello there."
    assert ids == generated[: len(ids)]  # the model's own tokens, not a re-encoding
    # a token straddling the end of the text: its kept part is encoded afresh
    straddle = [tok.encode(" Hi")[0]] + tok.encode(".\n")  # ".\n" may be one token
    assert tok.decode(reply_ids(tok, straddle, " Hi.")) == " Hi."


def test_unknown_template_is_a_user_error():
    assert template("qa") is TEMPLATES["qa"]
    with pytest.raises(UserError, match="unknown chat template 'llama'.*chat"):
        template("llama")


def test_turn_prompt_and_stop_of_the_default_template():
    chat = TEMPLATES["chat"]
    assert chat.turn_prompt("Hi") == "\nUser: Hi\nAssistant:"
    assert chat.stops == ("\nUser:",)
    qa = TEMPLATES["qa"]
    assert (qa.turn_prompt("Why?"), qa.stops) == ("\nQ: Why?\nA:", ("\nQ:",))


# ---- with the tiny fixture model -----------------------------------------------------


def _prompt_len(session: ChatSession, message: str) -> int:
    return len(session.tokenizer.encode(session.template.turn_prompt(message)))


def _reply(session: ChatSession, message: str) -> str:
    return "".join(session.send(message))


def test_prompt_cache_gives_the_fresh_prefill_reply_and_prefills_only_the_new_turn():
    session = greedy_session(max_new_tokens=6)
    messages = ["Hello there", "What is the capital of France?", "Tell me more"]
    for message in messages[:-1]:
        _reply(session, message)
    history = list(session.turns)
    assert history[-1].finish_reason == "length"
    history_ids = session.transcript_ids()

    reply = _reply(session, messages[-1])
    new_turn = _prompt_len(session, messages[-1])
    assert session.last.prompt_tokens == len(history_ids) + new_turn
    # Computed: the new turn's tokens, plus the previous reply's last token (sampled, never fed
    # back) and the end-of-turn token after it. Everything before came from the cache.
    assert history[-1].ids[-1] == session.tokenizer.eos_id
    assert session.last.prefilled_tokens == new_turn + 2

    fresh = greedy_session(max_new_tokens=6)
    fresh.turns = history
    assert _reply(fresh, messages[-1]) == reply
    assert fresh.turns[-1].ids == session.turns[-1].ids
    assert fresh.last.prefilled_tokens == fresh.last.prompt_tokens  # a full prefill


def test_sixty_turns_in_a_small_window_keep_the_preamble_and_rebuild_only_on_drops():
    session = greedy_session(max_new_tokens=8, system="A short chat.")
    preamble = list(session.preamble_ids)
    room = session.n_positions - session.max_new_tokens
    drops = 0
    for i in range(60):
        message = f"message number {i}"
        _reply(session, message)
        stats = session.last
        assert session.transcript_ids()[: len(preamble)] == preamble
        assert stats.prompt_tokens <= room
        if stats.dropped_turns:
            drops += 1  # positions shifted: the kept turns are computed again, once
            oldest_kept = len(session.turns[0].ids)
            assert stats.prefilled_tokens >= stats.prompt_tokens - len(preamble) - oldest_kept
            assert stats.prefilled_tokens > _prompt_len(session, message) + 2
        elif i > 0:  # the new turn and at most the last reply (its ids are re-encoded where
            # the model's own tokens do not spell the rendered text) and its end-of-turn token
            before = session.turns[-2]
            last_reply = len(before.ids) - _prompt_len(session, before.user)
            assert stats.prefilled_tokens <= _prompt_len(session, message) + last_reply
    assert session.turns[-1].user == "message number 59"
    assert 5 <= drops <= 20  # the window filled again and again, and each drop freed room
    assert session.context_tokens <= room


def test_a_reply_ends_before_a_stop_string_and_the_next_turn_reuses_the_cache():
    probe = greedy_session(max_new_tokens=8)
    words = _reply(probe, "Hi").split()
    stop = words[-1][:2]
    session = greedy_session(max_new_tokens=8, stops=(stop,))
    reply = _reply(session, "Hi")
    assert stop not in reply
    assert " ".join(words).startswith(reply)
    assert session.turns[-1].finish_reason == "stop"
    turn = session.turns[-1]
    assert session.tokenizer.decode(list(turn.ids)).endswith(reply)

    _reply(session, "And then?")
    # the new turn, the end-of-turn token after the reply, the reply's last token (never fed)
    assert session.last.prefilled_tokens <= _prompt_len(session, "And then?") + 2


def test_closing_a_reply_early_keeps_what_was_shown_and_the_cache_stays_right():
    session = greedy_session(max_new_tokens=12)
    _reply(session, "Hello")
    stream = session.send("Tell me a story")
    shown = [next(stream), next(stream)]
    stream.close()
    turn = session.turns[-1]
    assert turn.finish_reason == "interrupted"
    assert turn.reply == "".join(shown).strip()
    history = list(session.turns)

    reply = _reply(session, "Go on")
    fresh = greedy_session(max_new_tokens=12)
    fresh.turns = history
    assert _reply(fresh, "Go on") == reply


def test_reset_forgets_the_turns_but_reuses_the_cached_preamble():
    session = greedy_session()
    first = _reply(session, "Hi")
    _reply(session, "How are you?")
    session.reset()
    assert session.transcript_ids() == list(session.preamble_ids)
    assert _reply(session, "Hi") == first
    assert session.last.prefilled_tokens < session.last.prompt_tokens - len(session.preamble_ids)


def test_a_new_system_preamble_is_used_from_the_next_turn():
    session = greedy_session()
    _reply(session, "Hi")
    session.set_system("You are a pirate.")
    assert session.transcript_ids()[: len(session.preamble_ids)] == session.tokenizer.encode(
        "You are a pirate."
    )
    _reply(session, "Hi again")
    assert session.last.prefilled_tokens == session.last.prompt_tokens  # nothing shared


def test_what_cannot_fit_is_refused_in_one_line_and_the_session_goes_on():
    session = greedy_session(max_new_tokens=8)
    with pytest.raises(UserError, match="the message is \\d+ tokens.*shorten it"):
        session.send("word " * 200)
    with pytest.raises(UserError, match="max-new-tokens.*window"):
        session.set_max_new_tokens(session.n_positions)
    with pytest.raises(UserError, match="preamble"):
        session.set_system("long " * 200)
    with pytest.raises(UserError, match="empty message"):
        session.send("   ")
    assert session.turns == [] and session.max_new_tokens == 8
    assert _reply(session, "Hi")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused():
    from gpt2cli.generate import Engine
    from gpt2cli.hub import load_model
    from tests.conftest import TINY_B

    engine = Engine(*load_model(str(TINY_B)))  # vocab 512, no tokenizer of its own
    with pytest.raises(UserError, match="token id \\d+ but the model's vocabulary has 512 ids"):
        ChatSession(engine, bundled(), max_new_tokens=8)
