"""The generation loop and API on a tiny random model and on a scripted model."""

import mlx.core as mx
import numpy as np
import pytest
from tiny_chat import ScriptedModel, tiny_model, tokenizer_only

import mlx_deepseek  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_deepseek.decoding import Step, cache_length, make_cache
from mlx_deepseek.errors import DeepSeekError
from mlx_deepseek.generation import generate, stream_generate
from mlx_deepseek.sampling import SamplingSettings
from mlx_deepseek.speculative import Drafting

PROMPT = "Tell me a story about a dragon."


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def greedy_reference(model, tokens: list[int], n: int) -> list[int]:
    """Greedy continuation with a full forward pass per token (no cache)."""
    out = list(tokens)
    for _ in range(n):
        logits = model(mx.array([out]))
        out.append(int(mx.argmax(logits[0, -1]).item()))
    return out[len(tokens) :]


def test_stream_matches_generate_and_an_uncached_greedy_reference(tiny):
    model, tok = tiny
    responses = list(stream_generate(model, tok, PROMPT, max_tokens=12))
    assert len(responses) == 12
    assert [r.finish_reason for r in responses] == [None] * 11 + ["length"]
    assert [r.generation_tokens for r in responses] == list(range(1, 13))
    text = "".join(r.text for r in responses)
    assert generate(model, tok, PROMPT, max_tokens=12) == text
    prompt = tok.encode(PROMPT)  # BOS added: a plain text prompt
    assert prompt[0] == tok.bos_token_id
    assert responses[0].prompt_tokens == len(prompt)
    assert [r.token for r in responses] == greedy_reference(model, prompt, 12)
    assert text == tok.decode([r.token for r in responses])
    assert responses[-1].prompt_tps > 0 and responses[-1].generation_tps > 0


def test_chunked_prefill_equals_unchunked(tiny):
    model, tok = tiny
    prompt = tok.encode(PROMPT * 3)
    whole = list(stream_generate(model, tok, prompt, max_tokens=6, prefill_step_size=4096))
    chunked = list(stream_generate(model, tok, prompt, max_tokens=6, prefill_step_size=5))
    assert [r.token for r in whole] == [r.token for r in chunked]
    np.testing.assert_allclose(
        np.array(whole[0].logprobs), np.array(chunked[0].logprobs), atol=1e-4, rtol=1e-4
    )


def test_a_kept_cache_continues_the_conversation(tiny):
    model, tok = tiny
    first, second = tok.encode(PROMPT), tok.encode(" And then?", add_special_tokens=False)
    cache = make_cache(model)
    # prefill the first part (max 1 token; then drop what the loop computed ahead)
    list(stream_generate(model, tok, first, max_tokens=1, prompt_cache=cache))
    for c in cache:
        c.trim(c.offset - len(first))
    assert cache_length(cache) == len(first)
    cont = list(stream_generate(model, tok, second, max_tokens=5, prompt_cache=cache))
    assert cont[0].prompt_tokens == len(second)  # only the new tokens were prefilled
    fresh = list(stream_generate(model, tok, first + second, max_tokens=5))
    assert [r.token for r in cont] == [r.token for r in fresh]


def test_seeded_sampling_is_reproducible(tiny):
    model, tok = tiny
    kw = dict(max_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    assert generate(model, tok, PROMPT, **kw) == generate(model, tok, PROMPT, **kw)


def test_prompt_longer_than_the_context_is_a_clear_error(tiny):
    model, tok = tiny
    with pytest.raises(DeepSeekError, match="max_position_embeddings"):
        generate(model, tok, "dragon " * 3000, max_tokens=4)


def test_generation_stops_at_the_context_end(tiny):
    model, tok = tiny
    limit = model.args.max_position_embeddings
    prompt = [5] * (limit - 3)
    responses = list(stream_generate(model, tok, prompt, max_tokens=100))
    assert len(responses) == 3 and responses[-1].finish_reason == "length"


def test_bad_arguments(tiny):
    model, tok = tiny
    with pytest.raises(DeepSeekError, match="max_tokens"):
        generate(model, tok, PROMPT, max_tokens=0)
    with pytest.raises(DeepSeekError, match="top_p"):
        generate(model, tok, PROMPT, top_p=0)
    with pytest.raises(DeepSeekError, match="chat messages"):
        generate(model, tok, [{"text": "no role"}])


def test_settings_objects_and_their_keyword_shorthand_are_the_same(tiny):
    model, tok = tiny
    settings = SamplingSettings(temperature=1.0, top_p=0.9, top_k=7, seed=5)
    by_object = generate(model, tok, PROMPT, max_tokens=8, sampling=settings)
    by_keywords = generate(
        model, tok, PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, top_k=7, seed=5
    )
    assert by_object == by_keywords
    # a keyword replaces that one field of the object; the others stay
    changed = generate(model, tok, PROMPT, max_tokens=8, sampling=settings, seed=6)
    assert changed == generate(model, tok, PROMPT, max_tokens=8, sampling=settings.with_(seed=6))
    greedy = generate(model, tok, PROMPT, max_tokens=8, sampling=settings, temperature=0.0)
    assert greedy == generate(model, tok, PROMPT, max_tokens=8)
    # drafting off by object or by keyword: the tiny model has no MTP layer, both plain
    plain = generate(model, tok, PROMPT, max_tokens=8, drafting=Drafting(mtp=False))
    assert plain == generate(model, tok, PROMPT, max_tokens=8, mtp=False) == greedy


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"temprature": 0.5}, TypeError, "unexpected keyword argument 'temprature'"),
        ({"sampling": {"temperature": 0.5}}, TypeError, "must be a SamplingSettings"),
        ({"drafting": 2}, TypeError, "must be a Drafting"),
        ({"sampling": SamplingSettings(top_p=0.0)}, ValueError, "top_p=0.0"),
        ({"drafting": Drafting(draft_tokens=9)}, ValueError, "draft_tokens=9"),
        ({"draft_tokens": "2"}, TypeError, "draft_tokens='2'"),
        ({"mtp": "yes"}, TypeError, "mtp='yes'"),
        ({"thinking": 1}, TypeError, "thinking=1"),
    ],
)
def test_bad_settings_are_one_clear_error(tiny, kwargs, error, match):
    model, tok = tiny
    with pytest.raises(error, match=match):
        generate(model, tok, PROMPT, max_tokens=2, **kwargs)


# ---- scripted model: exact control of what is generated ------------------------------------


def scripted(reply: str):
    tok = tokenizer_only()
    return ScriptedModel(tok, [reply]), tok


MESSAGES = [{"role": "user", "content": "Hi"}]


def test_eos_stops_and_is_not_printed():
    model, tok = scripted("Hello there.")
    responses = list(stream_generate(model, tok, MESSAGES, max_tokens=50))
    assert responses[-1].finish_reason == "stop"
    assert responses[-1].token == tok.eos_token_id
    assert "".join(r.text for r in responses) == "Hello there."


def test_messages_go_through_the_chat_template():
    model, tok = scripted("ok")
    list(stream_generate(model, tok, MESSAGES, max_tokens=5, system="Be brief."))
    text = tok.decode(model.context, skip_special_tokens=False)
    assert text.startswith("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>")
    assert text.count("<｜begin▁of▁sentence｜>") == 1


def test_stop_string_cuts_the_text_and_never_leaks_its_start():
    model, tok = scripted("Hello world. STOP and more")
    responses = list(stream_generate(model, tok, MESSAGES, max_tokens=50, stop=["STOP"]))
    assert responses[-1].finish_reason == "stop"
    assert "".join(r.text for r in responses) == "Hello world. "
    assert not any("S" in r.text for r in responses)


def test_a_stop_string_prefix_that_does_not_complete_is_released():
    model, tok = scripted("a ST b")
    responses = list(stream_generate(model, tok, MESSAGES, max_tokens=50, stop="STOP"))
    assert "".join(r.text for r in responses) == "a ST b"
    assert responses[-1].finish_reason == "stop"  # EOS


def test_max_tokens_ends_with_length():
    model, tok = scripted("one two three four five six seven")
    responses = list(stream_generate(model, tok, MESSAGES, max_tokens=3))
    assert len(responses) == 3 and responses[-1].finish_reason == "length"


def test_streamed_text_never_splits_a_utf8_character():
    reply = "日本語 and 🙂 and café"
    model, tok = scripted(reply)
    reply_ids = tok.encode(reply, add_special_tokens=False)
    # the tokenizer splits these characters into byte tokens
    assert any("\ufffd" in tok.decode([t]) for t in reply_ids)
    responses = list(stream_generate(model, tok, MESSAGES, max_tokens=100))
    assert all("\ufffd" not in r.text for r in responses)
    assert "".join(r.text for r in responses) == reply


def test_a_step_function_plugs_into_the_same_loop():
    """The hook speculative decoding uses: any step function, same text handling."""
    _, tok = scripted("x")
    ids = tok.encode("draft tokens", add_special_tokens=False) + [tok.eos_token_id]

    def fake_speculative(model, prompt, cache, opts):
        assert opts.max_tokens == 20 and prompt.tolist() == [1, 2, 3]
        for i, t in enumerate(ids):
            yield Step(t, mx.zeros((len(tok),)), from_draft=i % 2 == 1)

    model = ScriptedModel(tok, ["x"])
    responses = list(stream_generate(model, tok, [1, 2, 3], 20, step_fn=fake_speculative))
    assert "".join(r.text for r in responses) == "draft tokens"
    assert [r.from_draft for r in responses] == [i % 2 == 1 for i in range(len(ids))]
    assert responses[-1].finish_reason == "stop"
