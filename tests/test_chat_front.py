"""The chat as a new user meets it: /save and /load names, folders and the default file;
what Ctrl-C keeps (and that /help says so); the stats line's context against the next turn's
cached count; the banner's context length and max_tokens defaults; /think's words."""

from __future__ import annotations

import io

import pytest
from mlx_deepseek.chat.repl import Repl, help_text
from mlx_deepseek.chat.session import DEFAULT_MAX_TOKENS, ChatSession
from rich.console import Console
from tiny_chat import ScriptedModel, tiny_model, tokenizer_only
from typer.testing import CliRunner

from mlx_deepseek import cli
from mlx_deepseek.decoding import cache_length
from mlx_deepseek.errors import DeepSeekError

QUESTIONS = ["What is two plus two?", "Tell me a story", "Thanks!"]
R1_REPLIES = [
    "Two and two make four.</think>\n\nFour.",
    "A short story then.</think>\n\nOnce upon a time.",
    "Polite.</think>\n\nWelcome!",
]
V2_MARKERS = ("User:", "Assistant:")


def session(name="tiny-v3", replies=("Four.", "Once.", "Bye."), context=4096, **kw):
    tok = tokenizer_only()
    markers = kw.pop("markers", None)
    model = ScriptedModel(
        tok, list(replies), context=context, **({"markers": markers} if markers else {})
    )
    return ChatSession(model, tok, name=name, **kw)


def repl(s: ChatSession) -> tuple[Repl, io.StringIO]:
    out = io.StringIO()
    return Repl(s, console=Console(file=out, width=200, highlight=False)), out


def talk(s: ChatSession, text: str, **kw) -> str:
    return "".join(c.text for c in s.respond(text, **kw))


# ---- /save and /load -----------------------------------------------------------------------

NAMES = ["chat", "chat.v2", "my chat.session", "notes.txt", "a.b.safetensors", "ünï/cödé"]


@pytest.mark.parametrize("name", NAMES)
def test_save_and_load_round_trip_for_any_name(tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ünï").mkdir()
    s = session(system="Sys.")
    talk(s, QUESTIONS[0])
    r, out = repl(s)
    r.command(f"/save {name}")
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 1 and written[0].name.endswith(".safetensors")
    added = not name.endswith(".safetensors")
    assert ("(.safetensors added to the name)" in out.getvalue()) == added
    assert str(written[0].relative_to(tmp_path)) == name + (".safetensors" if added else "")
    t = session()
    r2, out2 = repl(t)
    r2.command(f"/load {name}")
    assert (t.messages, t.system, t.tokens) == (s.messages, s.system, s.tokens)
    assert cache_length(t.cache) == len(t.tokens) and f"from {name}" in out2.getvalue()


@pytest.mark.parametrize("form", ["{d}", "{d}/", "{d}/."])
def test_save_to_a_folder_is_refused_and_writes_nothing(tmp_path, form):
    folder = tmp_path / "sessions"
    folder.mkdir()
    s = session()
    talk(s, QUESTIONS[0])
    with pytest.raises(DeepSeekError, match="is a folder: give a file name"):
        s.save(form.format(d=folder))
    assert list(tmp_path.rglob("*")) == [folder]  # nothing inside, nothing beside


def test_the_default_file_is_named_in_help_and_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = session()
    talk(s, QUESTIONS[0])
    r, out = repl(s)
    r.command("/help")
    default = tmp_path / "chat.safetensors"
    assert str(default) in out.getvalue()
    r.command("/save")
    assert default.is_file() and str(default) in out.getvalue()
    t = session()
    repl(t)[0].command("/load")
    assert t.messages == s.messages


# ---- Ctrl-C and what /help says about it ---------------------------------------------------


def test_ctrl_c_while_reasoning_drops_the_turn_as_help_says():
    s = session("DeepSeek-R1-tiny", R1_REPLIES)
    talk(s, QUESTIONS[0])
    before = (list(s.messages), dict(s.reasoning), len(s.tokens))
    r, out = repl(s)
    respond, polls = s.respond, iter(range(1000))

    def ctrl_c_after_three_tokens(text, stop=None, progress=None):  # Ctrl-C sets the flag
        return respond(text, stop=lambda: next(polls) >= 3, progress=progress)

    s.respond = ctrl_c_after_three_tokens
    r.answer(QUESTIONS[1])
    assert s.last.finish_reason == "interrupted" and not s.last.kept
    assert (s.messages, s.reasoning) == before[:2]
    said = " ".join(help_text().split())
    assert "Stopped before the answer begins" in said
    assert "the turn is dropped: neither your message nor its reasoning is kept" in said
    assert "[interrupted: before the answer began" in out.getvalue()


# ---- the stats line's context and the next turn's cached count -----------------------------

FAMILIES = [
    ("tiny-v3", ["Four.", "Once.", "Bye."], {}),
    ("tiny-v3", ["<think>hmm</think>\n\nFour.", "<think>x</think>Once.", "Ok."], {}),
    ("DeepSeek-R1-tiny", R1_REPLIES, {}),
    ("DeepSeek-V3.1-tiny", R1_REPLIES, {"thinking": True}),
    ("DeepSeek-V2-Chat", [" Four.", " Once.", " Bye."], {"markers": V2_MARKERS}),
]


@pytest.mark.parametrize(
    "name, replies, kw", FAMILIES, ids=[f[0] + str(i) for i, f in enumerate(FAMILIES)]
)
def test_stats_context_is_the_next_turns_cached_count(name, replies, kw):
    s = session(name, replies, **kw)
    shown = []
    for q in QUESTIONS:
        talk(s, q)
        if shown:
            assert s.last.reused_tokens == shown[-1]
        shown.append(s.last.context_tokens)
        assert shown[-1] == len(s.tokens) == cache_length(s.cache)


def test_stats_context_with_the_real_tiny_model():
    model, tok = tiny_model()
    s = ChatSession(model, tok, name="tiny", max_tokens=6)
    s.settings = s.settings.with_(temperature=0.0)
    shown = None
    for q in QUESTIONS:
        talk(s, q)
        if shown is not None:
            assert s.last.reused_tokens == shown
        shown = s.last.context_tokens


# ---- the banner, max_tokens defaults, /think -----------------------------------------------


@pytest.mark.parametrize("context, expected", [(300, 300), (2048, 2048), (100_000, 4096)])
def test_banner_shows_the_context_and_max_tokens_never_exceeds_it(context, expected):
    s = session(context=context)
    assert s.max_tokens == expected == min(DEFAULT_MAX_TOKENS, context)
    r, out = repl(s)
    r.banner()
    assert f"context {context} tokens" in out.getvalue()
    assert f"max_tokens {expected}." in out.getvalue()
    assert session(context=context, max_tokens=7).max_tokens == 7  # a value given is kept


def test_the_demo_chat_banner_caps_max_tokens_at_its_context():
    import json

    from mlx_deepseek.loading import demo_path

    context = json.loads((demo_path() / "config.json").read_text())["max_position_embeddings"]
    r = CliRunner().invoke(cli.app, ["chat", "demo"], input="", env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    expected = min(DEFAULT_MAX_TOKENS, context)
    assert f"context {context} tokens" in r.output and f"max_tokens {expected}." in r.output


@pytest.mark.parametrize(
    "name, why", [("tiny-v3", "still shown"), ("DeepSeek-R1-tiny", "always reasons")]
)
def test_think_without_a_switch_says_why_without_denying_reasoning(name, why):
    s = session(name)
    r, out = repl(s)
    with pytest.raises(DeepSeekError) as e:
        r.command("/think on")
    message = str(e.value)
    assert message.startswith("/think: this model's chat format") and why in message
    assert "has no thinking mode" not in message
