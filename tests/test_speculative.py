"""Self-speculative decoding with the MTP head: greedy output identical to plain decoding,
exact cache rollback, and the speculative-sampling rule keeps the output distribution."""

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import add_mtp_layer, build_hf_model, save_hf_checkpoint

import mlx_deepseek
from mlx_deepseek import compiled
from mlx_deepseek.decoding import StepOptions, decode_steps
from mlx_deepseek.sampling import SamplingSettings, greedy, make_sampler
from mlx_deepseek.speculative import MTPDecoder

PROMPT = [5, 9, 33, 100, 7, 8]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = save_hf_checkpoint(build_hf_model("v3_noaux"), tmp_path_factory.mktemp("spec"))
    add_mtp_layer(path)
    return mlx_deepseek.load_model(path)


def run(model, step_fn, n=24, prompt=PROMPT, sampler=greedy, cache=None, prior=(), processors=()):
    cache = cache if cache is not None else model.make_cache()
    opts = StepOptions(
        sampler=sampler, logits_processors=list(processors), max_tokens=n, prior_tokens=prior
    )
    return [s.token for s in step_fn(model, mx.array(prompt), cache, opts)], cache


def use_oracle(model, monkeypatch, sequence, wrong=()):
    """Make the MTP head propose the true greedy continuation (wrong at positions `wrong`).

    Written in array operations on the MTP cache's offset, so that it works inside a
    compiled round too (there the offset is an array: compiled.TracedCache)."""
    vocab = model.args.vocab_size
    n = len(sequence) + 64
    truth = mx.array(list(sequence) + [0] * (n - len(sequence)))
    miss = mx.array([i in wrong for i in range(n)])
    real_hidden = model.mtp_hidden
    seen = {}

    def mtp_hidden(hidden, next_tokens, depth=0, cache=None):
        seen["cache"] = cache
        return real_hidden(hidden, next_tokens, depth, cache)

    def mtp_logits(h, depth=0):
        # the draft predicts the token after the one the MTP cache position pairs with
        pos = mx.array(seen["cache"].offset + 1)
        token = mx.where(miss[pos], (truth[pos] + 1) % vocab, truth[pos])
        return mx.where(mx.arange(vocab) == token, 10.0, -10.0)[None, None]

    monkeypatch.setattr(model, "mtp_hidden", mtp_hidden)
    monkeypatch.setattr(model, "mtp_logits", mtp_logits)
    compiled.forget(model)  # traces made with the real head


@pytest.fixture(params=["compiled", "uncompiled"])
def compiling(request, monkeypatch, model):
    """Each test once with the MTP rounds (and plain steps) compiled, once without."""
    monkeypatch.setenv(compiled.ENV, "1" if request.param == "compiled" else "0")
    yield request.param == "compiled"
    compiled.forget(model)  # a test may have traced a patched head


@pytest.mark.parametrize("draft_tokens,speculate", [(1, False), (2, False), (3, False), (2, True)])
def test_greedy_output_identical_with_random_drafts(model, compiling, draft_tokens, speculate):
    plain, plain_cache = run(model, decode_steps)
    decoder = MTPDecoder(draft_tokens, speculate=speculate)
    spec, spec_cache = run(model, decoder)
    assert spec == plain
    assert decoder.stats.drafted > 0
    assert ("mtp_round" in compiled.functions(model)) == compiling
    # rolled back exactly: same cache length and contents as plain decoding
    assert spec_cache.length == plain_cache.length
    n = plain_cache.length
    for a, b in zip(plain_cache, spec_cache, strict=True):
        np.testing.assert_allclose(
            np.array(a.keys[..., :n, :]), np.array(b.keys[..., :n, :]), atol=1e-5
        )


WRONG = {9, 10, 14, 15, 16, 21, 27, 28, 30}


@pytest.mark.parametrize(
    "draft_tokens,wrong,speculate",
    [(1, (), False), (3, (), False), (1, WRONG, False), (2, WRONG, False), (3, WRONG, False)]
    + [(1, (), True), (2, WRONG, True), (3, WRONG, True)],
)
def test_accepted_drafts_keep_greedy_output(
    model, monkeypatch, compiling, draft_tokens, wrong, speculate
):
    """Also with each round built before the previous one is read (speculate), where a
    rejected draft throws the next round away."""
    plain, plain_cache = run(model, decode_steps, n=30)
    sequence = PROMPT + plain
    cache = model.make_cache()
    use_oracle(model, monkeypatch, sequence, wrong)
    decoder = MTPDecoder(draft_tokens, speculate=speculate)
    spec, _ = run(model, decoder, n=30, cache=cache)
    assert spec == plain
    assert ("mtp_round" in compiled.functions(model)) == compiling
    stats = decoder.stats
    if not wrong:
        assert stats.accepted == stats.drafted  # a perfect draft is always accepted
        assert stats.tokens_per_step > draft_tokens  # k accepted + 1 per verification
    else:
        assert 0 < stats.accepted < stats.drafted
    # the cache holds the prompt and the answer but its last token, as plain decoding's
    n = len(PROMPT) + 30 - 1
    assert cache.length == n
    for a, b in zip(plain_cache, cache, strict=True):
        np.testing.assert_allclose(
            np.array(a.keys[..., :n, :]), np.array(b.keys[..., :n, :]), atol=1e-5
        )


@pytest.mark.parametrize("draft_tokens,speculate", [(1, False), (3, False), (2, True)])
def test_logits_processors_see_the_drafts_before_each_position(
    model, compiling, draft_tokens, speculate
):
    """A repetition penalty over drafted tokens (applied on the device, within the round)
    keeps greedy output identical to plain decoding with the same penalty."""
    from mlx_deepseek.sampling import make_logits_processors

    settings = SamplingSettings(repetition_penalty=3.0, repetition_context_size=6).validated()
    processors = make_logits_processors(settings)
    plain, _ = run(model, decode_steps, n=24, processors=processors)
    unpenalised, _ = run(model, decode_steps, n=24)
    assert plain != unpenalised  # the penalty changes the answer: it is tested
    decoder = MTPDecoder(draft_tokens, speculate=speculate)
    spec, _ = run(model, decoder, n=24, processors=processors)
    assert spec == plain


def test_continuing_a_cache_resyncs_the_mtp_state(model, compiling):
    """A second call on the same cache (the chat's next turn) keeps greedy output identical."""
    first, cache = run(model, decode_steps, n=10)
    full = PROMPT + first
    # plain continuation of the same context as reference
    ref, _ = run(model, decode_steps, n=12, prompt=full + [42])
    decoder = MTPDecoder(2)
    spec_cache = model.make_cache()
    first_spec, _ = run(model, decoder, n=10, cache=spec_cache)
    assert first_spec == first
    # continue with one new token; the cache holds the prompt and all but the last token
    held = spec_cache.length
    tokens_in_cache = full[:held]
    cont, _ = run(
        model, decoder, n=12, prompt=full[held:] + [42], cache=spec_cache, prior=tokens_in_cache
    )
    assert cont == ref


def test_acceptance_rule_gives_the_target_distribution():
    from mlx_deepseek.speculative import speculative_accept

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6) * 0.7)
    q = rng.dirichlet(np.ones(6) * 0.7)
    p_mx, q_mx = mx.array(p, mx.float32), mx.array(q, mx.float32)
    mx.random.seed(0)
    n = 6000
    counts = np.zeros(6)
    accepted = 0
    for d in rng.choice(6, size=n, p=q):
        ok, token = speculative_accept(p_mx, q_mx, int(d))
        accepted += ok
        counts[token] += 1
    assert 0.5 * np.abs(counts / n - p).sum() < 0.02
    # the acceptance rate is sum(min(p, q)) in expectation
    assert abs(accepted / n - np.minimum(p, q).sum()) < 0.03
    # a draft from the target itself is always accepted
    assert all(speculative_accept(p_mx, p_mx, d)[0] for d in range(6))


@pytest.mark.slow
def test_sampling_keeps_the_output_distribution(tmp_path):
    """Second-token marginal of speculative sampling equals plain sampling's exact one."""
    hf = build_hf_model("v3_noaux", vocab_size=12)
    path = save_hf_checkpoint(hf, tmp_path / "m")
    add_mtp_layer(path)
    model = mlx_deepseek.load_model(path)
    settings = SamplingSettings(temperature=1.0, top_p=0.9).validated()
    prompt = [3, 5, 7]

    # exact distribution of the 2nd generated token under plain sampling
    from mlx_deepseek.sampling import filter_logprobs

    def dist(tokens):
        lp = model(mx.array([tokens]))[:, -1].astype(mx.float32)
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        return np.array(mx.softmax(filter_logprobs(lp, settings), axis=-1))[0]

    p1 = dist(prompt)
    exact = sum(p1[t] * dist(prompt + [t]) for t in range(12) if p1[t] > 0)

    decoder = MTPDecoder(1, settings)
    counts = np.zeros(12)
    n = 1200
    mx.random.seed(0)
    sampler = make_sampler(settings)
    for _ in range(n):
        tokens, _ = run(model, decoder, n=3, prompt=prompt, sampler=sampler)
        counts[tokens[1]] += 1
    tv = 0.5 * np.abs(counts / n - exact).sum()
    assert decoder.stats.drafted == n and 0 < decoder.stats.accepted < n
    assert tv < 0.06, (tv, counts / n, exact)


# ---- the API and the chat ---------------------------------------------------------------


@pytest.fixture(scope="module")
def mtp_chat_model(tmp_path_factory):
    """The tiny chat checkpoint (tokenizer included) plus a random MTP layer."""
    import json
    import shutil

    from mlx.utils import tree_flatten
    from tiny_chat import tiny_checkpoint

    from mlx_deepseek.models.config import ModelArgs
    from mlx_deepseek.models.deepseek_v3 import Model

    src = tiny_checkpoint()
    path = tmp_path_factory.mktemp("mtp_chat")
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, path / f.name)
    config = {**json.loads((src / "config.json").read_text()), "num_nextn_predict_layers": 1}
    (path / "config.json").write_text(json.dumps(config))
    mx.random.seed(3)
    model = Model(ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    for k, v in mx.load(str(src / "model.safetensors")).items():
        weights[k] = v  # the main model as in the tiny chat checkpoint
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    return mlx_deepseek.load(path)


def test_generate_api_with_mtp_is_identical_and_reports_acceptance(mtp_chat_model):
    from mlx_deepseek import generate, stream_generate

    model, tokenizer = mtp_chat_model
    messages = [{"role": "user", "content": "Hello there"}]
    plain = generate(model, tokenizer, messages, max_tokens=20, mtp=False)
    for k in (1, 2):
        assert (
            generate(model, tokenizer, messages, max_tokens=20, mtp=True, draft_tokens=k) == plain
        )
    responses = list(stream_generate(model, tokenizer, messages, max_tokens=12, mtp=True))
    last = responses[-1]
    assert last.acceptance_rate is not None and 0.0 <= last.acceptance_rate <= 1.0
    assert last.tokens_per_step >= 1.0
    off = list(stream_generate(model, tokenizer, messages, max_tokens=5, mtp=False))
    assert off[-1].acceptance_rate is None


def test_mtp_on_a_checkpoint_without_mtp_is_a_clear_error(mtp_chat_model):
    from tiny_chat import tiny_model

    from mlx_deepseek import generate
    from mlx_deepseek.errors import DeepSeekError

    model, tokenizer = tiny_model()
    with pytest.raises(DeepSeekError, match="no MTP layer"):
        generate(model, tokenizer, "Hi", max_tokens=3, mtp=True)
    mtp_model, tokenizer = mtp_chat_model
    with pytest.raises(DeepSeekError, match="draft_tokens=0"):
        generate(mtp_model, tokenizer, "Hi", max_tokens=3, mtp=True, draft_tokens=0)


def test_chat_turns_with_mtp_match_plain_decoding_of_the_same_context(mtp_chat_model, monkeypatch):
    """Every MTP turn (cache kept between turns) equals greedy decoding of its whole context
    from scratch. (Contexts can differ from a plain session's: the chat re-encodes history
    text, and this random model's byte soup does not survive a decode/encode round trip.)"""
    import mlx_deepseek.chat.session as session_module
    from mlx_deepseek.chat.session import ChatSession

    from mlx_deepseek.sampling import SamplingSettings

    model, tokenizer = mtp_chat_model
    calls = []
    real = session_module.stream_generate

    def recording(model_, tokenizer_, prompt, max_tokens, **kw):
        context = list(kw["prior_tokens"]) + list(prompt)
        out = []
        calls.append((context, out, max_tokens))
        for r in real(model_, tokenizer_, prompt, max_tokens, **kw):
            out.append(r.token)
            yield r

    monkeypatch.setattr(session_module, "stream_generate", recording)
    session = ChatSession(
        model, tokenizer, settings=SamplingSettings(temperature=0.0), max_tokens=10, mtp=True
    )
    for text in ("Hello", "Tell me more", "Thanks"):
        for _ in session.respond(text):
            pass
        assert session.last.acceptance_rate is not None
    assert len(calls) == 3 and calls[1][0][: len(calls[0][0])] == calls[0][0]
    for context, out, max_tokens in calls:
        plain, _ = run(model, decode_steps, n=max_tokens, prompt=context)
        assert out == plain[: len(out)]
