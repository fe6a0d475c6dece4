"""Sampling maths on known distributions: masks, temperature, repetition penalty, seeds."""

import math

import mlx.core as mx
import numpy as np
import pytest

import mlx_deepseek  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_deepseek.errors import DeepSeekError
from mlx_deepseek.sampling import (
    SamplingSettings,
    filter_logprobs,
    make_logits_processors,
    make_sampler,
)

# a known distribution over 6 tokens (sums to 1), deliberately not sorted
P = np.array([0.05, 0.40, 0.10, 0.25, 0.15, 0.05])
LOGP = mx.array(np.log(P)[None].astype(np.float32))  # [1, 6]


def kept(settings: SamplingSettings) -> set[int]:
    out = np.array(filter_logprobs(LOGP, settings))[0]
    return {i for i, v in enumerate(out) if np.isfinite(v)}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # sorted: 0.40 (1), 0.25 (3), 0.15 (4), 0.10 (2), 0.05, 0.05
    assert kept(SamplingSettings(temperature=1, top_p=0.39)) == {1}
    assert kept(SamplingSettings(temperature=1, top_p=0.41)) == {1, 3}
    assert kept(SamplingSettings(temperature=1, top_p=0.64)) == {1, 3}
    assert kept(SamplingSettings(temperature=1, top_p=0.66)) == {1, 3, 4}
    assert kept(SamplingSettings(temperature=1, top_p=0.90)) == {1, 3, 4, 2}
    assert kept(SamplingSettings(temperature=1, top_p=1.0)) == set(range(6))


def test_top_k_and_min_p_masks():
    assert kept(SamplingSettings(temperature=1, top_k=1)) == {1}
    assert kept(SamplingSettings(temperature=1, top_k=3)) == {1, 3, 4}
    assert kept(SamplingSettings(temperature=1, top_k=6)) == set(range(6))  # >= vocab: off
    assert kept(SamplingSettings(temperature=1, top_k=99)) == set(range(6))
    # min_p keeps p >= min_p * p_max = 0.5 * 0.40 = 0.20
    assert kept(SamplingSettings(temperature=1, min_p=0.5)) == {1, 3}
    assert kept(SamplingSettings(temperature=1, min_p=0.3)) == {1, 3, 4}  # >= 0.12
    # combined: top-p 0.9 -> {1,3,4,2}, then top-k 2 -> {1,3}
    assert kept(SamplingSettings(temperature=1, top_p=0.9, top_k=2)) == {1, 3}


def test_survivors_keep_their_values():
    out = np.array(filter_logprobs(LOGP, SamplingSettings(temperature=1, top_p=0.66)))[0]
    np.testing.assert_allclose(out[[1, 3, 4]], np.log(P[[1, 3, 4]]), rtol=1e-6)


def test_greedy_at_temperature_zero_ignores_filters():
    sampler = make_sampler(SamplingSettings(temperature=0, top_k=3, top_p=0.2))
    assert sampler(LOGP).item() == 1
    batch = mx.array(np.log(np.array([P, P[::-1]], dtype=np.float32)))
    assert sampler(batch).tolist() == [1, 4]


def test_sampled_frequencies_follow_the_tempered_renormalised_distribution():
    n = 20000
    settings = SamplingSettings(temperature=0.5, top_p=0.66, seed=0)
    sampler = make_sampler(settings)
    mx.random.seed(0)
    draws = np.array(sampler(mx.repeat(LOGP, n, axis=0)))
    assert set(np.unique(draws)) <= {1, 3, 4}
    expected = P[[1, 3, 4]] ** (1 / 0.5)
    expected /= expected.sum()
    freq = np.array([(draws == i).mean() for i in (1, 3, 4)])
    # 4 standard errors of a binomial proportion
    tol = 4 * np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) < tol), (freq, expected)


def test_seed_makes_sampling_reproducible():
    settings = SamplingSettings(temperature=1.0)
    sampler = make_sampler(settings)
    logits = mx.repeat(LOGP, 64, axis=0)

    def draw(seed):
        mx.random.seed(seed)
        return np.array(sampler(logits)).tolist()

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_repetition_penalty_is_sign_aware_and_exact():
    (processor,) = make_logits_processors(SamplingSettings(repetition_penalty=2.0))
    logits = mx.array([[2.0, -1.0, 0.5, 3.0]])
    out = processor(mx.array([0, 1, 0]), logits)
    assert np.array(out).tolist() == [[1.0, -2.0, 0.5, 3.0]]


def test_repetition_penalty_only_looks_at_its_context():
    (processor,) = make_logits_processors(
        SamplingSettings(repetition_penalty=2.0, repetition_context_size=2)
    )
    out = processor(mx.array([3, 0, 1]), mx.array([[2.0, -1.0, 0.5, 3.0]]))
    assert np.array(out).tolist() == [[1.0, -2.0, 0.5, 3.0]]  # token 3 is too far back


def test_no_processors_when_off():
    assert make_logits_processors(SamplingSettings()) == []
    assert make_logits_processors(SamplingSettings(repetition_penalty=1.0)) == []


@pytest.mark.parametrize(
    "change, word",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 1.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_bad_settings_name_the_value(change, word):
    with pytest.raises(DeepSeekError, match=word):
        SamplingSettings().with_(**change)


def test_all_filters_off_leaves_the_distribution_alone():
    # log-probabilities pass through unchanged when every filter is off
    out = filter_logprobs(LOGP, SamplingSettings(temperature=1.0))
    assert math.isclose(float(mx.exp(out).sum()), 1.0, rel_tol=1e-6)
