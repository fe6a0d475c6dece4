"""The demo's training data and its code (mlx_deepseek/demo_train/): the held-out split is
never trained on, the training rows are what the product's chat format renders, the tool
exchanges are consistent, and the training loop's pieces (export, YaRN switch, routing)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tokenizers import Tokenizer

from mlx_deepseek import load
from mlx_deepseek.demo_train import data, dialogues, tools
from mlx_deepseek.demo_train.config import CONFIG, count_parameters
from mlx_deepseek.demo_train.dialogues import TASKS, Drills, TurnSampler
from mlx_deepseek.demo_train.packing import Packer, Renderer, learnt_spans
from mlx_deepseek.demo_train.tokenizer import CHAT_TEMPLATE, END_THINK, TOOL_TOKENS
from mlx_deepseek.formats import BUILTIN_TEMPLATES, chat_format
from mlx_deepseek.loading import demo_path
from mlx_deepseek.models.config import ModelArgs
from mlx_deepseek.models.deepseek_v3 import Model

DEMO = demo_path()


@pytest.fixture(scope="module")
def renderer():
    return Renderer()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """The tokenizer train.py trains (the shipped demo's: stage 2 of the README's recipe)."""
    from mlx_deepseek.demo_train.packing import corpus
    from mlx_deepseek.demo_train.tokenizer import save_tokenizer, train_tokenizer

    folder = tmp_path_factory.mktemp("demo_tokenizer")
    save_tokenizer(train_tokenizer(corpus()), folder)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


@pytest.fixture(scope="module")
def demo_tokenizer(tok_dir: Path):
    return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


def training_conversations(renderer: Renderer, n: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        yield renderer.sample(rng, rng.choice([300, 1500, 3000]))


# ---- the held-out split ----------------------------------------------------------------------


def test_held_out_data_never_appears_in_training_conversations(renderer):
    split, tool_split = data.make_split(), tools.make_tool_split()
    assert split.add_is_held(23, 45) and split.sub_is_held(71, 38)
    assert "Lisbon" in tool_split.held_cities and "serene" in tool_split.held_words
    held_names = re.compile(
        r"\b(" + "|".join(re.escape(w) for w in tool_split.held_cities | tool_split.held_words)
        + r")\b"
    )  # fmt: skip
    problem = re.compile(r"(?<![\d])(\d+) ([+-]) (\d+) = ")
    two_digit = 0
    for conv in training_conversations(renderer, 500):
        for turn in conv.turns:
            text = "\n".join([turn.user, turn.answer, turn.reasoning, *turn.results])
            text += json.dumps([args for _, args in turn.calls])
            assert not held_names.search(text), (turn.user, turn.answer)
            for a, op, b in problem.findall(turn.answer):
                a, b = int(a), int(b)
                if 10 <= a <= 99 and 10 <= b <= 99:
                    two_digit += 1
                    held = split.add_is_held(a, b) if op == "+" else split.sub_is_held(a, b)
                    assert not held, turn.answer
    assert two_digit > 600  # the check saw plenty of 2-digit problems


def test_held_out_sampler_draws_only_held_out_items():
    split, tool_split = data.make_split(), tools.make_tool_split()
    sampler = TurnSampler(split, tool_split, held=True)
    rng = random.Random(3)
    names = tools.TOOL_NAMES
    for _ in range(300):
        t = sampler.turn(rng, names, rng.choice(["add2", "sub2", "weather", "lookup"]))
        if t.task in ("add2", "sub2"):
            a, op, b = re.match(r"(\d+) ([+-]) (\d+)", t.answer).groups()
            held = split.add_is_held if op == "+" else split.sub_is_held
            assert held(int(a), int(b))
        for name, args in t.calls:
            value = args["city"] if name == "get_weather" else args["word"]
            assert value in tool_split.held_cities | tool_split.held_words


# ---- the training rows are the chat format's text --------------------------------------------


def incremental_spans(renderer: Renderer, conv) -> list[str]:
    """What the model writes at each point the server asks it to generate: render every
    prefix that ends before an assistant message with add_generation_prompt, and take what
    the next message adds."""
    msgs = conv.messages()
    full = renderer.render(conv, msgs, False, False)
    spans = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = renderer.render(conv, msgs[:k], True, False)
        upto = renderer.render(conv, msgs[: k + 1], False, False)
        assert full.startswith(prompt) and full.startswith(upto)
        spans.append(upto[len(prompt) :])
    return spans


def test_learnt_spans_are_what_the_server_asks_the_model_to_write(renderer):
    seen_tasks = set()
    for conv in training_conversations(renderer, 40, seed=1):
        conv.thinking = False
        segs = renderer.segments(conv)
        assert "".join(t for t, _ in segs) == renderer.render(conv, conv.messages(), False, False)
        assert [t for t, learn in segs if learn] == incremental_spans(renderer, conv)
        seen_tasks.update(t.task for t in conv.turns)
    assert {"weather", "lookup", "add_tool", "no_tool", "add2"} <= seen_tasks


def test_thinking_rows_end_with_reasoning_after_the_thinking_prompt(renderer):
    rng = random.Random(2)
    kinds = set()
    for _ in range(60):
        conv = renderer.sample(rng, 600, thinking=True)
        segs = renderer.segments(conv)
        last = conv.turns[-1]
        head = conv.messages()[: len(conv.messages()) - len(last.messages()) + 1]
        prompt = renderer.render(conv, head, True, True)
        assert prompt.endswith("<｜Assistant｜><think>")
        assert "".join(t for t, _ in segs[:-1]) == prompt
        text, learnt = segs[-1]
        assert learnt and text.startswith(last.reasoning + END_THINK)
        if last.calls:  # the call block, then the row ends (the next prompt drops reasoning)
            assert text.endswith("<｜tool▁calls▁end｜><｜end▁of▁sentence｜>")
            kinds.add("call")
        else:
            assert text.endswith(last.answer + "<｜end▁of▁sentence｜>")
            kinds.add("answer")
    assert kinds == {"call", "answer"}


def test_learnt_spans_of_a_hand_written_tool_round():
    text = (
        "<｜begin▁of▁sentence｜>sys<｜User｜>q<｜Assistant｜></think><｜tool▁calls▁begin｜>"
        "CALLS<｜tool▁calls▁end｜><｜end▁of▁sentence｜><｜tool▁output▁begin｜>R1"
        "<｜tool▁output▁end｜><｜tool▁output▁begin｜>R2<｜tool▁output▁end｜>answer"
        "<｜end▁of▁sentence｜><｜User｜>q2<｜Assistant｜></think>a2<｜end▁of▁sentence｜>"
    )
    learnt = [t for t, learn in learnt_spans(text) if learn]
    assert learnt == [
        "<｜tool▁calls▁begin｜>CALLS<｜tool▁calls▁end｜><｜end▁of▁sentence｜>",
        "answer<｜end▁of▁sentence｜>",
        "a2<｜end▁of▁sentence｜>",
    ]


def test_rows_tokenize_as_the_whole_rendered_text(renderer, demo_tokenizer):
    packer = Packer(demo_tokenizer, renderer)
    rng = random.Random(4)
    for length in (128, 512, 1024):
        conv, ids, mask = packer.conversation(rng, length)
        assert len(ids) <= length and any(mask)
        text = "".join(t for t, _ in renderer.segments(conv))
        assert ids == demo_tokenizer.encode(text, add_special_tokens=False).ids
        learnt = demo_tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m],
                                       skip_special_tokens=False)  # fmt: skip
        assert learnt.endswith("<｜end▁of▁sentence｜>")
    ids, mask = packer.batch(rng, 3, 257)
    assert ids.shape == mask.shape == (3, 257) and ids.dtype == np.int32


def test_the_trained_template_is_the_formats_v31_template(tok_dir: Path):
    from mlx_deepseek.loading import load_tokenizer

    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE == BUILTIN_TEMPLATES["v3.1"]
    tokenizer = load_tokenizer(tok_dir)
    fmt = chat_format(tokenizer, CONFIG, "demo")
    assert fmt.family == "v3.1" and fmt.has_thinking_switch and fmt.source == "checkpoint"
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    assert fmt.render(tokenizer, msgs, thinking=True).endswith("<｜Assistant｜><think>")
    assert fmt.render(tokenizer, msgs).endswith("<｜Assistant｜></think>")
    # transformers renders the shipped template as the formats package does
    msgs += [{"role": "assistant", "content": "2 + 3 = 5."}, {"role": "user", "content": "Hi"}]
    for thinking in (False, True):
        hf = tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True, thinking=thinking
        )
        assert hf == fmt.render(tokenizer, msgs, thinking=thinking)


def test_tool_markers_are_single_tokens_that_decode_as_text(demo_tokenizer):
    for marker in [*TOOL_TOKENS, "<think>", "</think>"]:
        ids = demo_tokenizer.encode(marker, add_special_tokens=False).ids
        assert len(ids) == 1, marker
        assert demo_tokenizer.decode(ids, skip_special_tokens=True) == marker


# ---- the exchanges -----------------------------------------------------------------------------


def _read_trace(trace: str) -> int:
    """The answer a trace spells: the last line's result, then the other lines' last digits."""
    results = [line.rsplit(" = ", 1)[1] for line in trace.split("\n")]
    return int(results[-1] + "".join(r[-1] for r in reversed(results[:-1])))


def test_traces_spell_the_right_answer():
    assert data.add_trace(345, 278) == "5 + 8 + 0 = 13\n4 + 7 + 1 = 12\n3 + 2 + 1 = 6"
    assert data.sub_trace(71, 38) == "11 - 8 - 0 = 3\n7 - 3 - 1 = 3"
    rng = random.Random(5)
    for _ in range(2000):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        assert _read_trace(data.add_trace(a, b)) == a + b
        a, b = max(a, b), min(a, b)
        assert _read_trace(data.sub_trace(a, b)) == a - b


def test_tool_exchanges_follow_the_schemas_and_answer_from_the_results():
    sampler = TurnSampler(data.make_split(), tools.make_tool_split())
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools.TOOLS}
    rng = random.Random(6)
    counts = {"call": 0, "refusal": 0}
    for _ in range(600):
        declared = rng.sample(tools.TOOL_NAMES, rng.randint(0, 3))
        t = sampler.turn(rng, declared, rng.choice(["weather", "lookup", "add_tool"]))
        if not t.calls:
            counts["refusal"] += 1
            assert t.task == "no_tool" and t.results == []
            continue
        counts["call"] += 1
        assert len(t.results) == len(t.calls)
        for name, args in t.calls:
            assert name in declared
            schema = schemas[name]
            assert set(args) == set(schema["required"])
            for key, value in args.items():
                kind = schema["properties"][key]["type"]
                assert isinstance(value, int if kind == "integer" else str)
        for must in t.expect:  # the answer quotes what the results say
            assert must in t.answer and any(must in r or must.split(" °")[0] in r
                                            for r in t.results)  # fmt: skip
    assert counts["call"] > 200 and counts["refusal"] > 50


def test_made_up_names_are_copied_only_on_the_training_side():
    tool_split = tools.make_tool_split()
    known = set(tools.CITIES) | set(tools.WORDS)
    held_meanings = {tools.DEFINITIONS[w] for w in tool_split.held_words}
    rng = random.Random(8)
    for held in (False, True):
        sampler = TurnSampler(data.make_split(), tool_split, held=held)
        made = 0
        for _ in range(300):
            t = sampler.turn(rng, tools.TOOL_NAMES, rng.choice(["weather", "lookup"]))
            for _, args in t.calls:
                value = args.get("city") or args.get("word")
                assert value in t.user  # the call copies the name from the question
                if value not in known:
                    made += 1
                    # a made-up word means what a training word means, never a held-out one
                    assert not any(m in r for r in t.results for m in held_meanings)
        if held:
            assert made == 0
        else:
            assert 60 < made < 200, made


def test_task_weights_are_distributions():
    for column in (1, 2):
        assert sum(row[column] for row in TASKS) == pytest.approx(1.0)


def test_tool_focused_rows_declare_tools_and_call_them_more_often(renderer, demo_tokenizer):
    """Stage 3's rows (train.py --tool-focus): tools always declared, several times the
    calls of the usual rows, held-out names never used, the usual task mix otherwise."""
    packer = Packer(demo_tokenizer, renderer)
    held = tools.make_tool_split()
    counts = {}
    for focus in (False, True):
        rng = random.Random(5)
        calls = declared = 0
        for _ in range(60):
            conv, ids, _ = packer.conversation(rng, 513, True, tool_focus=focus)
            assert len(ids) <= 513
            declared += bool(conv.tools)
            for t in conv.turns:
                calls += len(t.calls)
                for _, args in t.calls:
                    assert args.get("city") not in held.held_cities
                    assert args.get("word") not in held.held_words
        counts[focus] = calls, declared
    assert counts[True][1] >= 57  # a too-long tools block may drop them from a rare row
    assert counts[True][0] > 2 * counts[False][0], counts
    sampler = TurnSampler(data.make_split(), held)
    rng = random.Random(6)
    drawn = [sampler.task(rng, tools.TOOL_NAMES, focus=True) for _ in range(4000)]
    for task, share in dialogues.FOCUS_TASKS.items():
        assert abs(drawn.count(task) / len(drawn) - share) < 0.03, task


def test_tool_focused_rows_with_a_short_tool_list_mostly_call():
    """A focused row that declares one or two tools calls them more often than it refuses
    the undeclared ones (the model must not learn "a short list: refuse")."""
    sampler = TurnSampler(data.make_split(), tools.make_tool_split())
    rng = random.Random(11)
    short = calls = refusals = 0
    for _ in range(400):
        conv = dialogues.sample_conversation(rng, sampler, 600, tool_focus=True)
        assert conv.tools
        if len(conv.tools) == len(tools.TOOLS):
            continue
        short += 1
        calls += sum(bool(t.calls) for t in conv.turns)
        refusals += sum(t.task == "no_tool" for t in conv.turns)
    assert 120 < short < 280, short
    assert calls > 2 * refusals > 0, (calls, refusals)


def test_made_up_meanings_are_quoted_from_the_result():
    """Most made-up words have made-up meanings too: the answer can only copy them."""
    tool_split = tools.make_tool_split()
    sampler = TurnSampler(data.make_split(), tool_split)
    known = set(tools.DEFINITIONS.values())
    rng = random.Random(12)
    made = 0
    for _ in range(400):
        t = sampler.turn(rng, ["lookup"], "lookup")
        if t.task != "lookup" or any(m in r for r in t.results for m in known):
            continue
        made += 1
        (must,) = t.expect
        assert must in t.results[0] and must in t.answer
        assert 3 <= len(must.split()) <= 7
    assert 80 < made < 160, made


def test_echo_turns_repeat_the_users_text_exactly():
    """The echo task (copying drill): the answer is the text after the phrase, character for
    character; its pieces mix made-up words, numbers and training names, never held-out ones."""
    tool_split = tools.make_tool_split()
    sampler = TurnSampler(data.make_split(), tool_split)
    held = tool_split.held_cities | tool_split.held_words | sampler.held_meanings
    phrases = {p.format(t="").lower() for p in data.ECHO_PHRASES}
    rng = random.Random(14)
    lengths, numbers, capitals = set(), 0, 0
    for _ in range(300):
        t = sampler.turn(rng, rng.choice([[], tools.TOOL_NAMES]), "echo")
        assert t.task == "echo" and not t.calls and t.expect == [t.answer]
        assert t.user.endswith(t.answer) and t.user[: -len(t.answer)].lower() in phrases
        pieces = t.answer.split()
        lengths.add(len(pieces))
        numbers += any(p.isdigit() for p in pieces)
        capitals += any(p[:1].isupper() for p in pieces)
        assert not any(re.search(rf"\b{re.escape(h)}\b", t.answer) for h in held), t.answer
    assert set(range(1, 9)) <= lengths  # a city may be two words
    assert numbers > 100 and capitals > 100, (numbers, capitals)
    rng = random.Random(15)
    drawn = [sampler.task(rng, []) for _ in range(4000)]
    assert 0.02 < drawn.count("echo") / len(drawn) < 0.06


def test_random_letters_split_into_more_pieces_than_made_up_names(demo_tokenizer):
    """tools.letters, the copying drills' hardest pieces: no demo word or city, 3 to 9 lower
    case letters, split into more tokens per letter than the pronounceable made-up names,
    and present in the echo texts and made-up meanings."""
    rng = random.Random(16)
    known = {w.lower() for w in tools.CITIES + tools.WORDS}
    drawn = [tools.letters(rng) for _ in range(1500)]
    assert all(3 <= len(w) <= 9 and w.isalpha() and w.islower() for w in drawn)
    assert not known & set(drawn) and len(set(drawn)) > 1400
    named = [tools.made_up(rng, False) for _ in range(1500)]

    def per_letter(words):
        pieces = [len(demo_tokenizer.encode(" " + w, add_special_tokens=False).ids) for w in words]
        return sum(pieces) / sum(map(len, words))

    assert per_letter(drawn) > per_letter(named) + 0.08, (per_letter(drawn), per_letter(named))
    sampler = TurnSampler(data.make_split(), tools.make_tool_split())
    onset, vowel = "|".join(tools._ONSETS), "|".join(tools._VOWELS)
    named = re.compile(rf"({onset})({vowel})(({onset})({vowel}))+({'|'.join(tools._CODAS)})")
    usual = set(sampler.meaning_words) | set(tools.EVERYDAY)
    usual |= {p for c in tools.CITIES for p in c.split()}

    def random_letters(text):  # pieces that are no name, number or word of the data's
        return sum(
            not (p in usual or p.isdigit() or named.fullmatch(p.lower())) for p in text.split()
        )

    echoed = [sampler.turn(rng, [], "echo").answer for _ in range(300)]
    meant = [tools.made_up_meaning(rng, sampler.meaning_words, set()) for _ in range(300)]
    assert sum(map(random_letters, echoed)) > 60
    assert sum(map(random_letters, meant)) > 60


def test_everyday_words_in_the_copying_drills_leave_out_every_held_out_word():
    """Everyday English words (tools.EVERYDAY) join the echo texts and made-up meanings, but
    never a word of a held-out meaning, lookup word or city: the held-out definitions stay
    unseen, and their words are copied, not recalled."""
    tool_split = tools.make_tool_split()
    sampler = TurnSampler(data.make_split(), tool_split)
    held_texts = sampler.held_meanings | tool_split.held_words | tool_split.held_cities
    held = {w.strip(",;").lower() for t in held_texts for w in t.split()}
    assert len(tools.EVERYDAY) == len(set(tools.EVERYDAY)) > 500
    assert not held & set(sampler.everyday)
    assert len(sampler.everyday) > len(tools.EVERYDAY) - 20
    # a word that a held-out meaning uses is left out
    assert tools.everyday_words({"a cold bright morning"}) == [
        w for w in tools.EVERYDAY if w not in {"a", "cold", "bright", "morning"}
    ]
    everyday = set(tools.EVERYDAY) - set(sampler.meaning_words)
    rng = random.Random(17)
    echoed = [sampler.turn(rng, [], "echo").answer for _ in range(300)]
    meant = [
        tools.made_up_meaning(rng, sampler.meaning_words, set(), sampler.everyday)
        for _ in range(300)
    ]
    for texts in (echoed, meant):
        words = [w for t in texts for w in t.split()]
        assert not held & {w.lower() for w in words if w not in sampler.meaning_words}
        share = sum(w in everyday for w in words) / len(words)
        assert 0.08 < share < 0.3, share
    # without everyday words (the old drills), none turn up
    plain = [tools.made_up_meaning(rng, sampler.meaning_words, set()) for _ in range(100)]
    assert not any(w in everyday for t in plain for w in t.split())


def test_spliced_words_are_unseen_words_of_common_pieces(demo_tokenizer):
    """train.py --splice: echo texts and made-up meanings of spliced words (the start of one
    training word and the end of another), never a word of the demo's, of the data's or of a
    held-out text; split into commoner, longer pieces than random letters, as a held-out
    definition's words are. --splice 0 draws exactly what the sampler drew before it."""
    tool_split = tools.make_tool_split()
    sampler = TurnSampler(data.make_split(), tool_split, drills=Drills(splice=1.0))
    words = sampler.meaning_words + sampler.everyday
    rng = random.Random(18)
    drawn = [tools.spliced(rng, words, sampler.banned) for _ in range(1500)]
    known = {w.lower() for w in tools.CITIES + tools.WORDS} | set(words) | sampler.banned
    assert all(4 <= len(w) <= 10 and w.isalpha() and w.islower() for w in drawn)
    assert not known & set(drawn) and len(set(drawn)) > 1400
    assert {"anchor", "together", "object"} <= sampler.banned  # held-out word, meaning words

    def per_letter(ws):
        pieces = [len(demo_tokenizer.encode(" " + w, add_special_tokens=False).ids) for w in ws]
        return sum(pieces) / sum(map(len, ws))

    letters = [tools.letters(rng) for _ in range(1500)]
    assert per_letter(drawn) < per_letter(letters) - 0.05, (per_letter(drawn), per_letter(letters))
    # every echo text and made-up meaning spliced at --splice 1; none of a held-out text
    held = sampler.held_meanings | tool_split.held_words | tool_split.held_cities
    texts = [sampler.turn(rng, [], "echo") for _ in range(200)]
    texts += [sampler.turn(rng, ["lookup"], "lookup") for _ in range(200)]
    n_spliced = 0
    for t in texts:
        if t.task == "echo":
            text = t.answer
        else:
            if not t.results or t.calls[0][1]["word"] in tool_split.words(False):
                continue  # no call, or a training word's own meaning
            raw = t.results[0]  # the definition, as JSON or as plain text
            text = json.loads(raw).get("definition", "") if raw.startswith("{") else raw
            if not text or "error" in raw:
                continue
        assert not any(h in text for h in held), text
        new = [w for w in text.split() if w not in words]
        assert all(4 <= len(w) <= 10 and w.isalpha() and w not in known for w in new), text
        assert 2 <= len(text.split()) <= 7
        n_spliced += bool(new)
    assert n_spliced > 200  # half of 2-7 words spliced: nearly every text has one
    # --splice 0: the same draws as a sampler without the option
    plain, zero = (
        TurnSampler(data.make_split(), tool_split),
        TurnSampler(data.make_split(), tool_split, drills=Drills(splice=0.0)),
    )
    r1, r2 = random.Random(19), random.Random(19)
    for task in ["echo", "lookup", "weather"] * 40:
        assert plain.turn(r1, tools.TOOL_NAMES, task) == zero.turn(r2, tools.TOOL_NAMES, task)


def test_token_texts_draw_every_word_piece_of_the_vocabulary(demo_tokenizer):
    """train.py --token-text: echo texts and made-up meanings of random vocabulary pieces.
    Every lower-case word piece's token turns up in them, the rare pieces of held-out
    definitions ("ob" "ject") far more often than in the training texts; none holds a
    held-out text. --token-text 0 draws exactly what the sampler drew before it."""
    tok = demo_tokenizer
    pieces = tuple(tools.vocab_pieces(tok))
    assert {"ject", "mod"} <= set(pieces) and all(p.isalpha() and p.islower() for p in pieces)
    rng = random.Random(20)
    texts = [tools.token_text(rng, pieces, set(), set()) for _ in range(2000)]
    ids = [i for t in texts for i in tok.encode(" " + t, add_special_tokens=False).ids]
    piece_ids = {i for i in range(tok.get_vocab_size()) if tok.decode([i]).strip() in pieces}
    assert len(piece_ids) > 300 and piece_ids <= set(ids)  # every piece's token, drawn alike
    ject = ids.count(tok.token_to_id("ject")) / len(ids)
    renderer = Renderer()
    ordinary = [
        i
        for conv in training_conversations(renderer, 60, seed=3)
        for text, _ in renderer.segments(conv)
        for i in tok.encode(text, add_special_tokens=False).ids
    ]
    assert ject > 10 * ordinary.count(tok.token_to_id("ject")) / len(ordinary)

    tool_split = tools.make_tool_split()
    with pytest.raises(ValueError, match="vocab_pieces"):
        TurnSampler(data.make_split(), tool_split, drills=Drills(token_share=0.5))
    sampler = TurnSampler(
        data.make_split(), tool_split, drills=Drills(token_share=1.0, pieces=pieces)
    )
    held = sampler.held_meanings | tool_split.held_words | tool_split.held_cities
    echoes = [sampler.turn(rng, [], "echo").answer for _ in range(200)]
    for text in echoes:
        assert not any(h in text for h in held) and not sampler.banned & set(text.split())
        assert 2 <= len(text.split()) <= 6 and text.replace(" ", "").isalpha(), text
    assert len(set(echoes)) == 200
    # --token-text 0: the same draws as a sampler without the option
    plain = TurnSampler(data.make_split(), tool_split)
    zero = TurnSampler(data.make_split(), tool_split, drills=Drills(token_share=0.0, pieces=pieces))
    r1, r2 = random.Random(21), random.Random(21)
    for task in ["echo", "lookup", "weather"] * 40:
        assert plain.turn(r1, tools.TOOL_NAMES, task) == zero.turn(r2, tools.TOOL_NAMES, task)


def test_punct_puts_commas_and_semicolons_into_the_drill_texts(demo_tokenizer):
    """train.py --punct: a share of the drill texts (--splice, --token-text) gets a comma or
    semicolon after one or two words, never after the last and never making a held-out text;
    the marks are tokens of their own, as in a held-out definition ("proud" ";" "modest").
    --punct 0 draws exactly what the sampler drew before it."""
    rng = random.Random(22)
    for _ in range(300):
        text = " ".join(tools.made_up(rng, False) for _ in range(rng.randint(1, 6)))
        marked = tools.punctuate(rng, text, set())
        words = marked.split()
        assert [w.rstrip(",;") for w in words] == text.split()  # the same words, in order
        n = sum(w[-1] in tools.PUNCTUATION for w in words)
        assert n == 0 if len(words) == 1 else 1 <= n <= 2 and words[-1][-1].isalpha()
    drawn = {
        tools.punctuate(random.Random(s), "not proud modest", {"proud; modest"}) for s in range(60)
    }
    assert "not proud; modest" not in drawn and "not, proud, modest" in drawn  # held-out: never
    ids = demo_tokenizer.encode(" not proud; modest", add_special_tokens=False).ids
    assert demo_tokenizer.token_to_id(";") in ids and demo_tokenizer.token_to_id(",") is not None

    tool_split = tools.make_tool_split()
    pieces = tuple(tools.vocab_pieces(demo_tokenizer))
    sampler = TurnSampler(data.make_split(), tool_split, drills=Drills(0.5, 1.0, pieces, punct=1.0))
    held = sampler.held_meanings | tool_split.held_words | tool_split.held_cities
    echoes = [sampler.turn(rng, [], "echo").answer for _ in range(200)]
    assert all(any(m in t for m in tools.PUNCTUATION) for t in echoes)  # every drill text
    assert {";", ","} <= {c for t in echoes for c in t}
    assert not any(h in t for t in echoes for h in held)
    half = TurnSampler(data.make_split(), tool_split, drills=Drills(0.5, 1.0, pieces, punct=0.5))
    marked = sum(any(m in half.turn(rng, [], "echo").answer for m in ",;") for _ in range(400))
    assert 140 < marked < 260  # about half
    # --punct 0: the same draws as a sampler without the option
    plain = TurnSampler(data.make_split(), tool_split, drills=Drills(0.3, 0.3, pieces))
    zero = TurnSampler(data.make_split(), tool_split, drills=Drills(0.3, 0.3, pieces, punct=0.0))
    r1, r2 = random.Random(23), random.Random(23)
    for task in ["echo", "lookup", "weather"] * 40:
        assert plain.turn(r1, tools.TOOL_NAMES, task) == zero.turn(r2, tools.TOOL_NAMES, task)


def test_phrase_texts_put_short_words_in_places_no_phrase_puts_them(demo_tokenizer):
    """train.py --phrase: echo texts and made-up meanings of which about half the words are
    the short words of the training definitions ("a", "with", "in": where held-out copies
    slip), in random order and repeated; never a held-out text. --phrase 0 draws exactly
    what the sampler drew before it."""
    rng = random.Random(24)
    drawn = [
        tools.phrase_text(rng, ["and", "in"], ["neat", "order"], {"and in order"})
        for _ in range(400)
    ]
    assert not any("and in order" in t for t in drawn)  # the held-out text: never
    assert any("in order" in t for t in drawn) and any("in in" in t for t in drawn)
    assert all(3 <= len(t.split()) <= 9 for t in drawn)

    tool_split = tools.make_tool_split()
    sampler = TurnSampler(data.make_split(), tool_split, drills=Drills(phrase=1.0))
    assert {"a", "with", "in", "or", "not"} <= set(sampler.function_words)
    assert set(sampler.function_words) <= set(sampler.meaning_words)  # training words only
    held = sampler.held_meanings | tool_split.held_words | tool_split.held_cities
    echoes = [sampler.turn(rng, [], "echo").answer for _ in range(300)]
    words = [w for t in echoes for w in t.split()]
    assert set(words) <= set(sampler.function_words) | set(sampler.splice_words)
    short = sum(w in sampler.function_words for w in words) / len(words)
    assert 0.4 < short < 0.65, short  # half drawn from them, and some everyday words are
    assert not any(h in t for t in echoes for h in held) and len(set(echoes)) > 290
    # drawn after --splice and --token-text: with both at 1 no phrase text is drawn
    both = TurnSampler(data.make_split(), tool_split, drills=Drills(1.0, 0.0, phrase=1.0))
    assert all(len(t.split()) <= 7 for t in (both.turn(rng, [], "echo").answer for _ in range(50)))
    # --phrase 0: the same draws as a sampler without the option
    pieces = tuple(tools.vocab_pieces(demo_tokenizer))
    plain = TurnSampler(data.make_split(), tool_split, drills=Drills(0.3, 0.3, pieces))
    zero = TurnSampler(data.make_split(), tool_split, drills=Drills(0.3, 0.3, pieces, phrase=0.0))
    r1, r2 = random.Random(25), random.Random(25)
    for task in ["echo", "lookup", "weather"] * 40:
        assert plain.turn(r1, tools.TOOL_NAMES, task) == zero.turn(r2, tools.TOOL_NAMES, task)


def test_boost_multiplies_a_tasks_weight_and_names_bad_tasks():
    """train.py --boost "sub2=3": that task is drawn ~3x as often as before."""
    assert dialogues.parse_boost(" sub2=3, add2=1.5 ,") == {"sub2": 3.0, "add2": 1.5}
    for bad in ("sub=2", "sub2", "sub2="):
        with pytest.raises(ValueError, match="TASK=FACTOR"):
            dialogues.parse_boost(bad)
    split, tool_split = data.make_split(), tools.make_tool_split()
    shares = []
    for boost in (None, {"sub2": 3.0}):
        sampler = TurnSampler(split, tool_split, boost=boost)
        rng = random.Random(13)
        drawn = [sampler.task(rng, []) for _ in range(6000)]
        shares.append(drawn.count("sub2") / len(drawn))
    w = next(plain for t, _, plain in TASKS if t == "sub2")
    assert shares[0] == pytest.approx(w, abs=0.02)
    assert shares[1] == pytest.approx(3 * w / (1 + 2 * w), abs=0.02)


# ---- the training loop -----------------------------------------------------------------------


def test_export_round_trips_through_the_loader(tmp_path: Path, tok_dir: Path):
    from mlx_deepseek.demo_train.export import export_hf

    mx.random.seed(3)
    args = ModelArgs.from_dict(CONFIG)
    model = Model(args)
    for i in (1, 2):  # non-zero routers and biases so that routing is exercised
        gate = model.layers[i].mlp.gate
        gate.weight = mx.random.normal(gate.weight.shape)
        gate.e_score_correction_bias = mx.random.normal((args.n_routed_experts,)) * 0.1
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((tok_dir / f).read_bytes())
    export_hf(model, CONFIG, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    n = args.num_hidden_layers
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.1.self_attn.kv_b_proj.weight" in names
    assert f"model.layers.{n}.embed_tokens.weight" in names
    assert f"model.layers.{n}.shared_head.head.weight" in names
    assert not any("switch_mlp" in k or "embed_q" in k for k in names)

    loaded, _ = load(str(tmp_path))
    x = mx.array([[0, 3, 40, 50, 60, 4, 70, 80]])
    ref_logits, ref_h = model.forward_with_hidden(x)
    got_logits, got_h = loaded.forward_with_hidden(x)
    assert np.allclose(np.array(ref_logits), np.array(got_logits), atol=1e-4)
    ref_mtp, _ = model.mtp_forward(ref_h[:, :-1], x[:, 1:])
    got_mtp, _ = loaded.mtp_forward(got_h[:, :-1], x[:, 1:])
    assert np.allclose(np.array(ref_mtp), np.array(got_mtp), atol=1e-4)


def test_the_long_phase_keeps_the_weights_and_switches_yarn_on():
    from mlx.utils import tree_flatten

    from mlx_deepseek.demo_train.train import DEFAULTS, Trainer, phase_config

    assert phase_config(long=False)["rope_scaling"] is None
    assert phase_config(long=True)["rope_scaling"]["type"] == "yarn"
    trainer = Trainer(dict(DEFAULTS))
    before = dict(tree_flatten(trainer.model.parameters()))
    short_logits = trainer.model(mx.array([[0, 5, 6, 7]]))
    trainer.extend()
    after = dict(tree_flatten(trainer.model.parameters()))
    assert before.keys() == after.keys()
    assert all(np.array_equal(np.array(before[k]), np.array(after[k])) for k in before)
    assert trainer.model.args.rope_type == "yarn"
    # the same weights, another rope: the logits change (YaRN's attention scale at least)
    assert not np.allclose(
        np.array(short_logits), np.array(trainer.model(mx.array([[0, 5, 6, 7]])))
    )
    ids = np.array([[0, 5, 6, 7, 8, 9, 10, 11, 12]], dtype=np.int32)
    stats, loads = trainer.step(ids, np.ones_like(ids, dtype=np.float32), 1e-3, pad=2)
    assert np.isfinite(stats[0]) and loads


def test_a_checkpoint_resumes_with_its_own_hyperparameters_and_older_ones_with_defaults():
    from mlx_deepseek.demo_train.train import DEFAULTS, resumable

    hp = dict(DEFAULTS, steps=900, punct=0.0)
    assert resumable(dict(hp), hp)
    older = {k: v for k, v in hp.items() if k not in ("punct", "token_text")}  # before them
    assert resumable(older, hp)
    assert not resumable(older, dict(hp, punct=0.5))  # the run would draw other data
    assert not resumable(dict(hp, lr=1e-4), hp)


def test_parameter_count_matches_the_model():
    from mlx.utils import tree_flatten

    total, mtp, active = count_parameters()
    model = Model(ModelArgs.from_dict(CONFIG))
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == total + mtp
    assert active < total


def test_load_balancer_moves_bias_towards_the_idle_experts():
    from mlx_deepseek.demo_train.routing import LoadBalancer

    model = Model(ModelArgs.from_dict(CONFIG))
    balancer = LoadBalancer(model, gamma=0.01)
    x = mx.array([[0, 3, 40, 50, 60, 4, 70, 80]])
    logits, h = model.forward_with_hidden(x)  # zero routers: the first experts always win
    model.mtp_forward(h[:, :-1], x[:, 1:])
    mask = np.ones((1, 8), dtype=bool)
    loads = balancer.update(
        {name: mask if name.startswith("model.") else mask[:, 1:] for name, _ in balancer.layers}
    )
    for name, moe in balancer.layers:
        bias = np.array(moe.gate.e_score_correction_bias)
        busy = loads[name] > loads[name].mean()
        assert (bias[busy] < 0).all() and (bias[~busy] > 0).all(), (name, loads[name], bias)
        assert moe.gate.e_score_correction_bias.dtype == mx.float32


def test_warm_start_maps_vocabulary_rows_by_token_string(tmp_path: Path):
    from mlx.utils import tree_flatten

    from mlx_deepseek.demo_train.warmstart import dequantized, warm_start

    # an "earlier package": the shipped weights under a tokenizer with two ids swapped and
    # one token the new vocabulary lacks
    for f in DEMO.iterdir():
        if f.suffix in (".json", ".safetensors") and f.name != "tokenizer.json":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    tok = json.loads((DEMO / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    new = dict(vocab)
    gone = next(k for k in vocab if len(k) > 3 and "<" not in k)  # a merged token
    vocab["2"], vocab["5"] = vocab["5"], vocab["2"]
    vocab["zz-not-a-token"] = vocab.pop(gone)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))

    model = Model(ModelArgs.from_dict(CONFIG))
    init = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    counts = warm_start(model, tmp_path, DEMO / "tokenizer.json")
    got = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    old = {k: np.array(v) for k, v in dequantized(tmp_path).items()}
    assert counts["tensors_copied"] == len(got)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert np.array_equal(got[name][new["2"]], old[name][new["5"]])
        assert np.array_equal(got[name][new["5"]], old[name][new["2"]])
        assert np.array_equal(got[name][new[gone]], init[name][new[gone]])
        assert np.array_equal(got[name][new["7"]], old[name][new["7"]])
    for name in ("model.layers.1.mlp.gate.weight", "model.layers.0.mlp.up_proj.weight"):
        assert np.array_equal(got[name], old[name]) and not np.array_equal(got[name], init[name])
