"""ChatSession: only new tokens are prefilled, reasoning leaves the history, interruptions
keep the cache consistent, save/load round-trips; and the chat formats."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_deepseek.chat.session import ChatSession, ReasoningSplitter
from tiny_chat import ScriptedModel, tiny_model, tokenizer_only

import mlx_deepseek  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_deepseek.decoding import cache_length, make_cache
from mlx_deepseek.errors import DeepSeekError
from mlx_deepseek.formats import (
    BUILTIN_TEMPLATES,
    ChatFormat,
    chat_format,
    detect_family,
)
from mlx_deepseek.formats.chat import _model_name

EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
BOS = "<｜begin▁of▁sentence｜>"
QUESTIONS = ["What is two plus two?", "Tell me a story", "Thanks!"]


def n_tokens(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


def session_for(family_name: str, replies: list[str], **kw):
    tok = tokenizer_only()
    model = ScriptedModel(tok, replies)
    return ChatSession(model, tok, name=family_name, **kw), model, tok


def run(session, text, **kw) -> tuple[str, str]:
    chunks = list(session.respond(text, **kw))
    reasoning = "".join(c.text for c in chunks if c.kind == "reasoning")
    answer = "".join(c.text for c in chunks if c.kind == "answer")
    return reasoning, answer


def assert_consistent(session):
    """The cache holds exactly session.tokens, and they read as the conversation so far."""
    assert cache_length(session.cache) == len(session.tokens)
    assert all(c.offset == len(session.tokens) for c in session.cache)
    assert session.model.context[: len(session.tokens)] == session.tokens


# ---- the prefill count ---------------------------------------------------------------------


def test_turns_two_and_three_prefill_only_the_new_tokens():
    replies = ["Four.", "Once upon a time.", "You are welcome."]
    s, model, tok = session_for("tiny-v3", replies, system="Be brief.")
    counts, cached = [], []
    for q, reply in zip(QUESTIONS, replies, strict=True):
        _, answer = run(s, q)
        assert answer == reply
        counts.append((s.last.prompt_tokens, s.last.reused_tokens))
        cached.append(len(s.tokens))
        assert_consistent(s)
    first = n_tokens(tok, f"{BOS}Be brief.{USER}{QUESTIONS[0]}{ASSISTANT}")
    assert counts[0] == (first, 0)
    # turn N: the reply and its EOS are in the cache already; only user turn + glue is new
    for i in (1, 2):
        new = n_tokens(tok, f"{USER}{QUESTIONS[i]}{ASSISTANT}")
        assert counts[i] == (new, cached[i - 1]), counts
    assert sum(model.calls) == len(s.tokens)  # every token went through the model once
    text = tok.decode(s.tokens, skip_special_tokens=False)
    assert text.count(BOS) == 1 and text.count("Be brief.") == 1
    assert text == s.render(s.conversation(), False)  # the cache reads as the history
    assert s.totals.turns == 3
    assert s.totals.prompt_tokens == sum(c[0] for c in counts)


def test_a_changed_system_prompt_re_prefills_from_the_change():
    s, model, tok = session_for("tiny-v3", ["A."], system="One.")
    run(s, "Hi")
    s.set_system("Two.")
    run(s, "Again")
    assert s.last.reused_tokens == 1  # just BOS: the system prompt is the first difference
    text = tok.decode(s.tokens, skip_special_tokens=False)
    assert "Two." in text and "One." not in text
    assert_consistent(s)


# ---- reasoning -----------------------------------------------------------------------------

R1_REPLIES = [
    "Two and two make four.</think>\n\nFour.",
    "A short story then.</think>\n\nOnce upon a time.",
    "Polite.</think>\n\nWelcome!",
]


def test_r1_reasoning_is_split_and_dropped_from_history():
    s, model, tok = session_for("DeepSeek-R1-tiny", R1_REPLIES)
    assert (s.fmt.family, s.settings.temperature, s.settings.top_p) == ("r1", 0.6, 0.95)
    reasoning, answer = run(s, QUESTIONS[0])
    assert reasoning == "Two and two make four."
    assert answer == "\n\nFour."
    assert s.messages[-1] == {"role": "assistant", "content": "\n\nFour."}
    assert s.reasoning[1] == "Two and two make four."
    counts = [s.last.prompt_tokens]
    for q in QUESTIONS[1:]:
        run(s, q)
        counts.append(s.last.prompt_tokens)
        assert_consistent(s)
    # The template drops the reasoning, so the cache is cut after <｜Assistant｜> and the
    # previous answer alone is prefilled again with the new user turn.
    for i in (1, 2):
        prev = s.messages[2 * i - 1]["content"]
        expected = n_tokens(tok, f"{prev}{EOS}{USER}{QUESTIONS[i]}{ASSISTANT}<think>\n")
        assert counts[i] == expected
    history = s.render(s.messages[:-1], False)
    assert "</think>" not in history and "make four" not in history


def test_v3_1_thinking_switch():
    s, model, tok = session_for("DeepSeek-V3.1-tiny", R1_REPLIES)
    assert s.fmt.family == "v3.1" and s.fmt.has_thinking_switch
    reasoning, answer = run(s, "Hi")  # thinking off: the prompt closes the block
    assert tok.decode(model.context, skip_special_tokens=False).count("</think>") >= 1
    s.set_thinking(True)
    reasoning, answer = run(s, "Again")
    assert reasoning == "A short story then." and answer == "\n\nOnce upon a time."
    prompt = s.render(s.conversation()[:-1], True)
    assert prompt.endswith(f"{ASSISTANT}<think>")
    assert_consistent(s)
    r1, _, _ = session_for("DeepSeek-R1", R1_REPLIES)
    with pytest.raises(DeepSeekError, match="always reasons"):
        r1.set_thinking(False)


def test_splitter_handles_markers_cut_anywhere():
    text = "<think>abc</think>answer"
    for cut in range(len(text) + 1):
        sp = ReasoningSplitter(False)
        pieces = sp.feed(text[:cut]) + sp.feed(text[cut:]) + sp.flush()
        assert (sp.reasoning, sp.answer) == ("abc", "answer")
        assert "".join(p.text for p in pieces) == "abcanswer"


# ---- interruptions -------------------------------------------------------------------------


def test_stop_mid_answer_keeps_the_partial_answer_and_a_consistent_cache():
    s, model, tok = session_for("tiny-v3", ["one two three four five six seven eight", "ok"])
    seen = []
    chunks = s.respond("Count", stop=lambda: len(seen) >= 5)
    for c in chunks:
        seen.append(c.text)
    assert s.last.finish_reason == "interrupted" and s.last.kept
    partial = s.messages[-1]["content"]
    assert partial and "one two three four five six seven eight".startswith(partial)
    assert_consistent(s)
    run(s, "More")
    # the partial answer stayed cached: only EOS + the new user turn were prefilled
    assert s.last.prompt_tokens == n_tokens(tok, f"{EOS}{USER}More{ASSISTANT}")
    assert s.messages[-1]["content"] == "ok"
    assert_consistent(s)


def test_closing_the_stream_is_an_interruption_too():
    s, model, tok = session_for("tiny-v3", ["alpha beta gamma delta epsilon", "ok"])
    gen = s.respond("Go")
    for _ in range(3):
        next(gen)
    gen.close()
    assert s.last.finish_reason == "interrupted" and s.messages[-1]["role"] == "assistant"
    assert_consistent(s)
    run(s, "Next")
    assert s.last.prompt_tokens == n_tokens(tok, f"{EOS}{USER}Next{ASSISTANT}")


def test_stop_during_reasoning_drops_the_turn():
    s, model, tok = session_for("DeepSeek-R1-tiny", R1_REPLIES)
    chunks = []
    for c in s.respond("Hi", stop=lambda: len(chunks) >= 3):
        chunks.append(c)
    assert all(c.kind == "reasoning" for c in chunks)
    assert s.messages == [] and s.last.finish_reason == "interrupted" and not s.last.kept
    assert_consistent(s)
    reasoning, answer = run(s, "Hi")
    assert answer == "\n\nFour."
    assert s.last.reused_tokens > 0  # the prompt prefix of the dropped turn was reused


def test_stop_during_prefill_keeps_whole_chunks_only():
    s, model, tok = session_for("tiny-v3", ["ok"], prefill_step_size=4)
    calls = []
    chunks = list(s.respond("a long question " * 6, stop=lambda: calls.append(1) or True))
    assert chunks == [] and s.messages == []
    assert len(s.tokens) == 4  # one prefill chunk went in before the stop was seen
    assert_consistent(s)
    run(s, "Hi")
    assert s.messages[-1]["content"] == "ok"


# ---- errors --------------------------------------------------------------------------------


def test_context_overflow_is_an_error_and_the_session_survives():
    tok = tokenizer_only()
    model = ScriptedModel(tok, ["ok"], context=40)
    s = ChatSession(model, tok, name="tiny-v3")
    with pytest.raises(DeepSeekError, match="context holds 40"):
        run(s, "word " * 60)
    assert s.messages == []
    run(s, "Hi")
    assert s.messages[-1]["content"] == "ok"
    with pytest.raises(DeepSeekError, match="empty"):
        run(s, "   ")


# ---- save / load ---------------------------------------------------------------------------


def test_save_and_load_round_trip_keeps_the_cache(tmp_path):
    s, model, tok = session_for("tiny-v3", ["Four.", "Once.", "Bye."], system="Sys.")
    run(s, QUESTIONS[0])
    run(s, QUESTIONS[1])
    path = s.save(tmp_path / "chat")
    assert path.name == "chat.safetensors" and path.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["chat.safetensors"]  # no temp files left
    s.save(path)  # overwrite in place
    t = ChatSession(model, tok, name="tiny-v3")
    t.load(tmp_path / "chat")
    assert (t.messages, t.system, t.tokens) == (s.messages, s.system, s.tokens)
    assert cache_length(t.cache) == len(t.tokens)
    model.context = list(t.tokens)  # the scripted model's view of the loaded cache
    run(t, QUESTIONS[2])
    assert t.last.prompt_tokens == n_tokens(tok, f"{USER}{QUESTIONS[2]}{ASSISTANT}")
    assert t.messages[-1]["content"] == "Bye."


def test_save_of_an_empty_session_and_load_errors(tmp_path):
    s, model, tok = session_for("tiny-v3", ["x"])
    s.save(tmp_path / "empty.safetensors")
    s.load(tmp_path / "empty.safetensors")
    assert s.tokens == [] and s.messages == []
    with pytest.raises(DeepSeekError, match="no such session file"):
        s.load(tmp_path / "missing.safetensors")
    mx.save_safetensors(str(tmp_path / "other.safetensors"), {"a": mx.zeros(2)})
    with pytest.raises(DeepSeekError, match="not a chat session"):
        s.load(tmp_path / "other.safetensors")
    with pytest.raises(DeepSeekError, match="no such folder"):
        s.save(tmp_path / "nope" / "x.safetensors")
    other = ScriptedModel(tok, ["x"])
    other.args.hidden_size = 99
    with pytest.raises(DeepSeekError, match="another model"):
        ChatSession(other, tok, name="tiny-v3").load(tmp_path / "empty.safetensors")


# ---- the real tiny model -------------------------------------------------------------------


def test_real_model_cache_after_three_turns_equals_a_fresh_prefill(tmp_path):
    model, tok = tiny_model()
    s = ChatSession(model, tok, name="tiny", max_tokens=6, prefill_step_size=8)
    s.settings = s.settings.with_(temperature=0.0)
    counts = []
    for q in QUESTIONS:
        run(s, q)
        counts.append(s.last.prompt_tokens)
        assert cache_length(s.cache) == len(s.tokens)
    # the last reply hit max tokens, so its final token is prefilled with the next turn
    assert counts[1] <= 1 + n_tokens(tok, f"{EOS}{USER}{QUESTIONS[1]}{ASSISTANT}")
    # a saved and reloaded session holds the same cache, in the model's own cache type
    loaded = ChatSession(model, tok, name="tiny")
    loaded.load(s.save(tmp_path / "s.safetensors"))
    assert type(loaded.cache) is type(make_cache(model)) and loaded.tokens == s.tokens
    probe = tok.encode(f"{EOS}{USER}next{ASSISTANT}", add_special_tokens=False)
    fresh = model(mx.array([s.tokens + probe]), cache=make_cache(model))[0, -1]
    for cache in (s.cache, loaded.cache):
        kept = model(mx.array([probe]), cache=cache)[0, -1]
        np.testing.assert_allclose(np.array(kept), np.array(fresh), atol=1e-4, rtol=1e-4)


# ---- chat formats --------------------------------------------------------------------------

MSGS = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "u1"},
    {"role": "assistant", "content": "r</think>a1"},
    {"role": "user", "content": "u2"},
]


@pytest.mark.parametrize(
    "family, expected",
    [
        ("v2", f"{BOS}S\n\nUser: u1\n\nAssistant: r</think>a1{EOS}User: u2\n\nAssistant:"),
        ("v3", f"{BOS}S{USER}u1{ASSISTANT}r</think>a1{EOS}{USER}u2{ASSISTANT}"),
        ("r1", f"{BOS}S{USER}u1{ASSISTANT}a1{EOS}{USER}u2{ASSISTANT}<think>\n"),
        ("v3.1", f"{BOS}S{USER}u1{ASSISTANT}</think>a1{EOS}{USER}u2{ASSISTANT}</think>"),
    ],
)
def test_builtin_templates_write_deepseeks_formats(family, expected):
    tok = tokenizer_only()
    fmt = ChatFormat(family, BUILTIN_TEMPLATES[family], "built-in", 0.3, 0.95, family == "v3.1")
    assert fmt.render(tok, MSGS) == expected
    if family == "v3.1":
        assert fmt.render(tok, MSGS, thinking=True).endswith(f"{ASSISTANT}<think>")


def test_family_detection_and_defaults():
    v2, v3 = {"model_type": "deepseek_v2"}, {"model_type": "deepseek_v3"}
    assert detect_family(v2, "deepseek-ai/DeepSeek-V2-Lite-Chat") == "v2"
    assert detect_family(v2, "deepseek-ai/DeepSeek-V2.5") == "v2.5"
    assert detect_family(v2, "DeepSeek-Coder-V2-Instruct-0724") == "v2.5"
    assert detect_family(v3, "deepseek-ai/DeepSeek-V3") == "v3"
    assert detect_family(v3, "deepseek-ai/DeepSeek-R1-0528") == "r1-0528"
    assert detect_family(v3, "deepseek-ai/DeepSeek-V3.1-Terminus") == "v3.1"
    assert detect_family(v3, "x", BUILTIN_TEMPLATES["r1"]) == "r1"
    assert detect_family(v3, "x", BUILTIN_TEMPLATES["v3.1"]) == "v3.1"
    assert detect_family(v2, "my-model", BUILTIN_TEMPLATES["v2"]) == "v2"
    hub = "/hf/hub/models--deepseek-ai--DeepSeek-R1/snapshots/0123abc"
    assert _model_name(hub) == "deepseek-ai/DeepSeek-R1"
    assert _model_name("/tmp/run-r1x/tiny-v3") == "tiny-v3"  # only the folder's own name


def test_the_checkpoints_own_template_wins_and_generation_config_sets_defaults():
    own = "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    tok = tokenizer_only(own)
    fmt = chat_format(tok, {"model_type": "deepseek_v3", "generation_config": {"temperature": 0.7}})
    assert fmt.source == "checkpoint" and fmt.temperature == 0.7 and fmt.top_p == 0.95
    assert fmt.render(tok, [{"role": "user", "content": "q"}]) == f"{BOS}[q]"
    fallback = chat_format(tokenizer_only(), {"model_type": "deepseek_v3"}, "DeepSeek-R1")
    assert fallback.source == "built-in r1" and fallback.temperature == 0.6


def test_v2_answers_lose_the_space_the_template_adds_back():
    tok = tokenizer_only()
    model = ScriptedModel(tok, [" Four.", " Bye."], markers=("User:", "Assistant:"))
    model.args.model_type = "deepseek_v2"
    s = ChatSession(model, tok, name="DeepSeek-V2-Lite-Chat")
    assert s.fmt.source == "built-in v2"
    run(s, "Q1")
    assert s.messages[-1]["content"] == "Four."  # rendered back as 'Assistant: Four.'
    run(s, "Q2")
    assert s.last.prompt_tokens == n_tokens(tok, "User: Q2\n\nAssistant:")
    assert_consistent(s)
