"""The server's engine without HTTP: batched decoding equals single-sequence decoding, the
prefix cache, cancellation, the queue limit, seeds, log-probabilities and MTP drafting."""

from __future__ import annotations

import time

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache
from tiny_chat import tiny_checkpoint, tiny_model

import mlx_deepseek
from mlx_deepseek.generation import stream_generate
from mlx_deepseek.sampling import SamplingSettings
from mlx_deepseek.serve.engine import Engine, QueueFull
from mlx_deepseek.serve.prefix_cache import PrefixCache
from mlx_deepseek.serve.sampler import GenParams

PROMPTS = [
    [0, 5, 9, 40, 41, 42],
    [0, 7],
    [0, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110],
    [0, 33, 34, 35],
]


def reference(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of one sequence alone, through the generation API."""
    return [r.token for r in stream_generate(model, _tok(), prompt, n, mtp=False)]


def _tok():
    return tiny_model()[1]


def run_all(engine: Engine, prompts, params) -> list[list]:
    handles = [engine.submit(p, params) for p in prompts]
    return [list(h) for h in handles]


def tokens_of(events) -> list[int]:
    return [e.token for e in events if e.finish is None]


@pytest.mark.parametrize("batched", [False, None])
def test_concurrent_requests_equal_each_alone(batched):
    model, _ = tiny_model()
    with Engine(model, max_batch=3, batched=batched, prefill_step_size=4) as engine:
        results = run_all(engine, PROMPTS, GenParams(max_tokens=12))
        assert max(engine.batch_sizes) == 3  # three rows really decoded together
    for prompt, events in zip(PROMPTS, results, strict=True):
        assert events[-1].finish == "length"
        assert tokens_of(events) == reference(model, prompt, 12)


def test_padded_batch_with_mlx_lm_model_equals_single_rows():
    """mlx-lm's own DeepSeek class takes batch caches: the engine must use one padded forward
    per step with it, and give each row's single-sequence output."""
    from mlx_lm.utils import load_model

    lm_model, _ = load_model(tiny_checkpoint())
    with Engine(lm_model, max_batch=4, prefill_step_size=3) as engine:
        assert engine.batched
        results = run_all(engine, PROMPTS, GenParams(max_tokens=10))
    for prompt, events in zip(PROMPTS, results, strict=True):
        alone = [r.token for r in stream_generate(lm_model, _tok(), prompt, 10, mtp=False)]
        assert tokens_of(events) == alone


def test_prefix_cache_reuses_a_conversation_and_changes_nothing():
    model, _ = tiny_model()
    first = PROMPTS[2]
    with Engine(model) as engine, Engine(model, prefix_cache_bytes=0) as cold:
        out = tokens_of(list(engine.submit(first, GenParams(max_tokens=8))))
        second = first + out + [45, 46, 47]
        events = list(engine.submit(second, GenParams(max_tokens=8)))
        usage = events[-1].usage
        # everything the first request held (its prompt and answer but the last token)
        assert usage.cached_tokens == len(first) + len(out) - 1
        assert usage.prompt_tokens == len(second)
        cold_events = list(cold.submit(second, GenParams(max_tokens=8)))
        assert cold_events[-1].usage.cached_tokens == 0
    assert tokens_of(events) == tokens_of(cold_events)


def test_cancel_frees_the_slot_within_a_step():
    model, _ = tiny_model()
    with Engine(model, max_batch=2) as engine:
        long = engine.submit(PROMPTS[0], GenParams(max_tokens=1500))
        it = iter(long)
        for _ in range(3):
            assert next(it).finish is None
        steps_before = engine.steps
        long.cancel()
        rest = list(it)
        assert rest[-1].finish == "cancelled"
        assert engine.steps - steps_before <= 2
        deadline = time.monotonic() + 5
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats()["running"] == 0
        # the engine keeps serving
        assert list(engine.submit(PROMPTS[1], GenParams(max_tokens=3)))[-1].finish == "length"


def test_full_queue_is_refused():
    model, _ = tiny_model()
    engine = Engine(model, max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    for _ in range(3):  # one for the free slot, two waiting
        engine.submit(PROMPTS[1], GenParams(max_tokens=2))
    with pytest.raises(QueueFull, match="waiting"):
        engine.submit(PROMPTS[1], GenParams(max_tokens=2))


def test_a_seed_gives_the_same_tokens_alone_or_in_a_batch():
    model, _ = tiny_model()
    params = GenParams(max_tokens=10, settings=SamplingSettings(temperature=1.5, seed=11))
    with Engine(model, max_batch=4) as engine:
        alone = tokens_of(list(engine.submit(PROMPTS[0], params)))
        noisy = GenParams(max_tokens=10, settings=SamplingSettings(temperature=1.5))
        handles = [engine.submit(PROMPTS[3], noisy), engine.submit(PROMPTS[0], params)]
        together = [tokens_of(list(h)) for h in handles][1]
        other_seed = GenParams(max_tokens=10, settings=SamplingSettings(temperature=1.5, seed=12))
        different = tokens_of(list(engine.submit(PROMPTS[0], other_seed)))
    assert alone == together
    assert alone != different


def test_logprobs_and_top_logprobs():
    model, _ = tiny_model()
    with Engine(model) as engine:
        events = list(
            engine.submit(PROMPTS[0], GenParams(max_tokens=5, logprobs=True, top_logprobs=3))
        )
    for e in events[:-1]:
        assert len(e.top) == 3
        values = [v for _, v in e.top]
        assert values == sorted(values, reverse=True)
        assert e.top[0] == (e.token, pytest.approx(e.logprob))  # greedy takes the top token
        assert e.logprob <= 0


def test_stop_ids_end_the_request():
    model, _ = tiny_model()
    expected = reference(model, PROMPTS[0], 6)
    with Engine(model) as engine:
        events = list(
            engine.submit(PROMPTS[0], GenParams(max_tokens=50, stop_ids=frozenset({expected[3]})))
        )
    assert tokens_of(events) == expected[: expected.index(expected[3]) + 1]
    assert events[-1].finish == "stop"


def test_mtp_drafting_alone_and_batched_gives_plain_greedy_output():
    """The demo has an MTP head: a lone request drafts with it; when a second arrives the
    first goes back to the batch. Greedy output stays the plain one either way."""
    model, tok = mlx_deepseek.load("demo")
    prompts = [
        list(tok.encode("<｜User｜>Tell me a story about a cat.<｜Assistant｜>")),
        list(tok.encode("<｜User｜>Spell cat backwards.<｜Assistant｜>")),
    ]
    params = GenParams(max_tokens=24, stop_ids=frozenset(tok.eos_token_ids))
    want = [[r.token for r in stream_generate(model, tok, p, 24, mtp=False)] for p in prompts]
    with Engine(model, mtp=True) as engine:
        assert engine.mtp
        alone = tokens_of(list(engine.submit(prompts[0], params)))
        first = engine.submit(prompts[0], params)
        it = iter(first)
        head = [next(it) for _ in range(4)]  # running alone, drafting
        second = engine.submit(prompts[1], params)
        both = [tokens_of(head + list(it)), tokens_of(list(second))]
    assert len(want[0]) > 8  # long enough to draft, then to go back to the batch
    assert alone == want[0]
    assert both == want


# ---- the prefix cache alone ----------------------------------------------------------------


def _caches(tokens: list[int], layers: int = 2, width: int = 4) -> list[KVCache]:
    out = []
    for _ in range(layers):
        c = KVCache()
        n = len(tokens)
        k = mx.array(tokens, dtype=mx.float32).reshape(1, 1, n, 1) * mx.ones((1, 1, n, width))
        c.update_and_fetch(k, k[..., :2])
        out.append(c)
    return out


def test_prefix_cache_longest_match_lru_by_bytes_and_isolation():
    one = _caches([1, 2, 3, 4])
    size = sum(c.keys.nbytes + c.values.nbytes for c in one)
    cache = PrefixCache(max_bytes=2 * size)
    cache.store([1, 2, 3, 4], one)
    cache.store([1, 2, 9, 9], _caches([1, 2, 9, 9]))
    n, got, _ = cache.lookup([1, 2, 3, 7, 7])
    assert n == 3 and got[0].offset == 3
    # the handed-out cache writes past its prefix without changing the entry
    got[0].update_and_fetch(mx.full((1, 1, 1, 4), 50.0), mx.full((1, 1, 1, 2), 50.0))
    n2, again, _ = cache.lookup([1, 2, 3, 4, 5])
    assert n2 == 4 and again[0].keys[0, 0, 3, 0].item() == 4.0
    # at most len - 1 tokens are reused (the last prompt token always runs)
    assert cache.lookup([1, 2, 3, 4])[0] == 3
    # a third entry evicts the least recently used one ([1, 2, 9, 9])
    cache.store([5, 6, 7, 8], _caches([5, 6, 7, 8]))
    assert len(cache) == 2 and cache.lookup([1, 2, 9, 9, 1])[0] == 2
    # an entry extending another replaces it
    cache.store([5, 6, 7, 8, 1, 2], _caches([5, 6, 7, 8, 1, 2]))
    assert cache.lookup([5, 6, 7, 8, 1, 2, 3])[0] == 6
    assert cache.nbytes <= cache.max_bytes
