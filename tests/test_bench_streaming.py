"""What the expert-streaming benchmark (scripts/bench_memory.py) stands on: the 4-bit
checkpoint written directly streams like any other; the cache policies replayed on a trace
(Belady's optimum bounds LRU and LFU; a bank that holds everything misses only cold); the
page-cache drop and bandwidth probe run; the I/O model's extrapolation moves the right way.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_deepseek
from mlx_deepseek.bench.streaming import (
    REAL,
    drop_page_cache,
    extrapolate,
    locality_hit_rate,
    read_bandwidth,
    replay,
    write_quantized_synthetic,
)
from mlx_deepseek.loading import weight_files
from mlx_deepseek.models.tiny import tiny_config
from mlx_deepseek.offload import expert_store


def random_trace(layers: int, experts: int, k: int, calls: int, skew: float, seed: int = 0):
    """(layer, distinct experts of one call) with a Zipf-like preference of exponent skew."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, experts + 1) ** skew
    p /= p.sum()
    out = []
    for _ in range(calls):
        for layer in range(layers):
            out.append((layer, rng.choice(experts, size=k, replace=False, p=p)))
    return out


@pytest.mark.parametrize("skew", [0.0, 1.2])
def test_replayed_policies_are_bounded_by_beladys_optimum(skew):
    trace = random_trace(layers=3, experts=32, k=4, calls=200, skew=skew)
    for slots in (4, 8, 16):
        rates = {pol: replay(trace, slots, pol) for pol in ("lru", "lfu", "belady")}
        assert rates["belady"] >= max(rates["lru"], rates["lfu"]) - 1e-9, rates
        assert 0 < rates["lru"] < 1
    # a bank holding all 32 experts only misses each expert's first use
    cold = len({(layer, e) for layer, chosen in trace for e in chosen.tolist()})
    total = sum(len(c) for _, c in trace)
    assert replay(trace, 32, "lru") == pytest.approx(1 - cold / total, abs=1 / total)
    # a skewed router repeats experts: LRU hits more often than under uniform routing
    uniform = replay(random_trace(3, 32, 4, 200, 0.0), 8, "lru")
    assert replay(random_trace(3, 32, 4, 200, 1.2), 8, "lru") > uniform + 0.1


def test_a_directly_written_4bit_checkpoint_streams_like_it_is_resident(tmp_path):
    config = tiny_config(
        "v3_noaux", hidden_size=128, moe_intermediate_size=64, intermediate_size=128,
        vocab_size=256, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
    )  # fmt: skip
    path = write_quantized_synthetic(tmp_path / "q4", config, log=lambda _: None)
    assert (path / ".complete").exists()
    assert write_quantized_synthetic(path, config, log=print) == path  # written once
    resident = mlx_deepseek.load_model(path)
    assert resident.layers[1].mlp.switch_mlp.gate_proj.bits == 4
    streamed = mlx_deepseek.load_model(path, expert_cache="25%")
    store = expert_store(streamed)
    assert store.slots == 4
    files = weight_files(path)
    drop_page_cache(files)
    store.reader.page_cache = False  # what the bench does: every miss reaches the disk
    tokens = mx.array([list(range(2, 30))])
    want = np.array(resident(tokens, cache=resident.make_cache()))
    got = np.array(streamed(tokens, cache=streamed.make_cache()))
    # the same products; the prompt needs more experts than slots (rounds): rounding only
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()
    stats = store.snapshot()
    assert stats.bytes_read > 0 and stats.lookups > stats.hits
    bandwidth = read_bandwidth(files, piece_bytes=store.plan.read_bytes, count=4)
    assert bandwidth["threads"] > 0 and bandwidth["one_thread"] > 0
    store.close()


def test_the_io_model_extrapolates_the_right_way():
    v3, flash = REAL
    slow, fast = extrapolate(v3, 128, 4.7), extrapolate(v3, 128, 17.5)
    assert slow["read_gb_per_token"] == fast["read_gb_per_token"]
    assert fast["tok_s"] > slow["tok_s"]
    small, big = extrapolate(v3, 64, 4.7), extrapolate(v3, 128, 4.7)
    assert small["share"] < big["share"] < 1 and small["tok_s"] < big["tok_s"]
    # a trained router's locality: more hits than the budget's share, never fewer
    for mac in (64, 128):
        plain, local = extrapolate(flash, mac, 4.7), extrapolate(flash, mac, 4.7, locality=True)
        assert local["hit_rate"] >= plain["hit_rate"] and local["tok_s"] >= plain["tok_s"]
    # V3 at 4 bits: 58 layers x 256 experts of 3 x 2048 x 7168 at 4.5 bits per weight
    assert v3.moe_layers * v3.experts * v3.expert_mb / 1e3 == pytest.approx(
        58 * 256 * 3 * 2048 * 7168 * 4.5 / 8 / 1e9, rel=0.01
    )
    rates = [locality_hit_rate(s) for s in np.linspace(0, 1, 21)]
    assert rates == sorted(rates) and rates[0] == 0 and rates[-1] == pytest.approx(1.0)
