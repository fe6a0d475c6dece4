"""Compiled decoding forwards (compiled.py): the same tokens as the uncompiled forwards, for
plain decoding and MTP rounds, with full-precision and quantized latent caches, across the
buffers' growth, with seeded sampling; and when compiling is (not) used."""

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import add_mtp_layer, build_hf_model, save_hf_checkpoint

import mlx_deepseek
from mlx_deepseek import compiled
from mlx_deepseek.decoding import StepOptions, decode_steps
from mlx_deepseek.sampling import SamplingSettings, greedy, make_sampler
from mlx_deepseek.speculative import MTPDecoder

PROMPT = [5, 9, 33, 100, 7, 8, 61]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    path = save_hf_checkpoint(build_hf_model("v3_noaux"), tmp_path_factory.mktemp("compiled"))
    add_mtp_layer(path)
    return path


@pytest.fixture(scope="module")
def model(path):
    return mlx_deepseek.load_model(path)


def run(model, step_fn, compile_, monkeypatch, n=20, prompt=PROMPT, sampler=greedy):
    monkeypatch.setenv(compiled.ENV, "1" if compile_ else "0")
    cache = model.make_cache()
    opts = StepOptions(sampler=sampler, logits_processors=[], max_tokens=n)
    steps = list(step_fn(model, mx.array(prompt), cache, opts))
    return [s.token for s in steps], np.stack([np.array(s.logprobs) for s in steps]), cache


@pytest.mark.parametrize("kv_bits", [None, 4])
def test_plain_and_mtp_decoding_compiled_equal_uncompiled(path, monkeypatch, kv_bits):
    model = mlx_deepseek.load_model(path, kv_bits=kv_bits)
    ref, ref_lp, ref_cache = run(model, decode_steps, False, monkeypatch)
    assert compiled.functions(model) == []
    tokens, lp, cache = run(model, decode_steps, True, monkeypatch)
    assert compiled.functions(model) == ["step"]
    assert tokens == ref
    np.testing.assert_allclose(lp, ref_lp, atol=1e-4)
    # the caches hold the same entries (the compiled one in bigger buffers)
    assert cache.length == ref_cache.length
    n = cache.length
    for a, b in zip(ref_cache, cache, strict=True):
        for x, y in zip(compiled._arrays(a), compiled._arrays(b), strict=True):
            np.testing.assert_allclose(np.array(x[..., :n, :]), np.array(y[..., :n, :]), atol=1e-5)
    for k in (1, 3):
        decoder = MTPDecoder(k)
        spec, _, _ = run(model, decoder, True, monkeypatch)
        assert spec == ref
        assert decoder.stats.drafted > 0
    assert "mtp_round" in compiled.functions(model)


def test_buffers_grow_past_their_capacity_while_compiled(model, monkeypatch):
    """A prompt just under the cache's 256-entry step: decoding crosses it (the buffers grow
    on the host between compiled calls)."""
    prompt = [(7 * i + 3) % model.args.vocab_size for i in range(250)]
    ref, _, _ = run(model, decode_steps, False, monkeypatch, n=16, prompt=prompt)
    tokens, _, cache = run(model, decode_steps, True, monkeypatch, n=16, prompt=prompt)
    assert tokens == ref
    assert cache[0].keys.shape[2] > 256
    spec, _, cache = run(model, MTPDecoder(2), True, monkeypatch, n=16, prompt=prompt)
    assert spec == ref
    assert cache.mtp[0].keys.shape[2] > 256


def test_seeded_sampling_is_the_same_compiled(model, monkeypatch):
    """The compiled round takes MLX's random state in and out, so a seed gives the same
    sampled tokens and MTP acceptances as the uncompiled round."""
    settings = SamplingSettings(temperature=1.0, top_p=0.95).validated()
    out = {}
    for compile_ in (False, True):
        mx.random.seed(11)
        decoder = MTPDecoder(2, settings)
        tokens, _, _ = run(
            model, decoder, compile_, monkeypatch, n=24, sampler=make_sampler(settings)
        )
        out[compile_] = tokens, decoder.stats.accepted, decoder.stats.drafted
    assert out[True] == out[False]
    assert len(set(out[True][0])) > 3  # sampled, not a fixed point


def test_when_compiled_forwards_are_used(model, monkeypatch):
    cache = model.make_cache()
    model(mx.array([PROMPT]), cache=cache)
    monkeypatch.setenv(compiled.ENV, "0")
    assert not compiled.enabled(model, cache)
    monkeypatch.setenv(compiled.ENV, "1")
    assert compiled.enabled(model, cache)
    assert not compiled.enabled(model, model.make_cache())  # empty: the prefill comes first
    assert not compiled.enabled(model, list(cache) + [object()])  # another cache type
    monkeypatch.delenv(compiled.ENV)
    assert not compiled.enabled(model, cache)  # opt-in: the first build costs seconds
    monkeypatch.setenv(compiled.ENV, "auto")
    assert compiled.enabled(model, cache) == (mx.default_device() == mx.cpu)  # a tiny model
    monkeypatch.setattr(compiled, "MAX_BYTES", 1024)
    compiled.forget(model)
    assert not compiled.enabled(model, cache)  # too big to pay
    compiled.forget(model)
    monkeypatch.setenv(compiled.ENV, "sometimes")
    with pytest.raises(ValueError, match="MLX_DEEPSEEK_COMPILE='sometimes': give 1"):
        compiled.enabled(model, cache)


def test_other_models_and_caches_are_not_compiled(model, monkeypatch):
    """V3.2's indexed attention (its own cache type), or a subclass (a pipeline stage's),
    keep the uncompiled forwards."""
    from mlx_deepseek.models import deepseek_v32
    from mlx_deepseek.models.deepseek_v3 import Model

    monkeypatch.setenv(compiled.ENV, "1")
    cache = model.make_cache()
    model(mx.array([PROMPT]), cache=cache)
    indexed = deepseek_v32.IndexedCache()
    indexed.keys = cache[0].keys
    assert not compiled.can_compile(model, [*cache[:-1], indexed])

    class Stage(Model):
        pass

    monkeypatch.setattr(model, "__class__", Stage)
    compiled.forget(model)
    assert not compiled.enabled(model, cache)
    monkeypatch.undo()
    compiled.forget(model)
