"""DeepSeek V4: the MLX model is transformers' DeepseekV4ForCausalLM, and its cache gives the
full forward's logits whatever the chunking, batching, or rollback."""

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import rel_err
from v4_checkpoints import SHAPES, boundary_ties, build_v4, save_v4, v4_logits

import mlx_deepseek
from mlx_deepseek.models import v4_attention
from mlx_deepseek.models.v4_cache import MAX_ROLLBACK, STEP, CacheTrimError
from mlx_deepseek.models.v4_config import CSA, HCA, SLIDING

SEQ = 40  # longer than every fixture's window; several compressed rows in every kind
TOKENS = np.random.RandomState(0).randint(0, 96, size=(2, SEQ))


@pytest.fixture(scope="module", params=list(SHAPES))
def fixture(request, tmp_path_factory):
    hf = build_v4(request.param, seed=0)
    path = save_v4(hf, tmp_path_factory.mktemp(request.param))
    model = mlx_deepseek.load_model(path, dtype="float32")
    full = np.array(model(mx.array(TOKENS)))
    return request.param, hf, model, full


def test_logits_match_transformers(fixture):
    shape, hf, model, full = fixture
    cfg = hf.config
    kinds = list(cfg.layer_types)
    # what the fixture must exercise: the window is passed, the indexer really chooses, and
    # the heavily compressed layers hold at least two rows
    assert SEQ > cfg.sliding_window
    if CSA in kinds:
        assert SEQ // cfg.compress_rates[CSA] > cfg.index_topk
    if HCA in kinds:
        assert SEQ // cfg.compress_rates[HCA] >= 2
    # no tie at the indexer's top-k boundary, where torch and MLX could keep other rows
    assert boundary_ties(hf, TOKENS) == []
    ref = v4_logits(hf, TOKENS)
    assert full.shape == ref.shape == (2, SEQ, cfg.vocab_size)
    assert rel_err(full, ref) < 1e-4


def test_model_reads_the_layer_kinds_and_hash_layers(fixture):
    shape, hf, model, _ = fixture
    cfg = hf.config
    for i, layer in enumerate(model.layers):
        assert layer.attn.kind == cfg.layer_types[i]
        assert ("compressor" in layer.attn) == (cfg.layer_types[i] != SLIDING)
        assert ("indexer" in layer.attn) == (cfg.layer_types[i] == CSA)
        assert ("tid2eid" in layer.ffn.gate) == (cfg.mlp_layer_types[i] == "hash_moe")


def test_decode_one_token_at_a_time_equals_full_forward(fixture):
    _, _, model, full = fixture
    cache = model.make_cache()
    outs = [np.array(model(mx.array(TOKENS[:, :3]), cache))]
    for i in range(3, SEQ):
        outs.append(np.array(model(mx.array(TOKENS[:, i : i + 1]), cache)))
    assert cache[0].offset == SEQ
    assert rel_err(np.concatenate(outs, axis=1), full) < 1e-4


@pytest.mark.parametrize("cuts", [(7, 8, 19, 30), (1, 2, 16, 17), (13,)])
def test_prefill_in_chunks_equals_full_forward(fixture, cuts):
    _, _, model, full = fixture
    cache = model.make_cache()
    bounds = [0, *cuts, SEQ]
    outs = [
        np.array(model(mx.array(TOKENS[:, a:b]), cache))
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    assert rel_err(np.concatenate(outs, axis=1), full) < 1e-4


def test_batch_of_two_equals_two_batches_of_one(fixture):
    _, _, model, full = fixture
    for row in range(2):
        single = np.array(model(mx.array(TOKENS[row : row + 1])))
        assert rel_err(single, full[row : row + 1]) < 1e-5
        # and the batched decode equals the single one
        cache = model.make_cache()
        model(mx.array(TOKENS[row : row + 1, :20]), cache)
        step = np.array(model(mx.array(TOKENS[row : row + 1, 20:21]), cache))
        assert rel_err(step[:, 0], full[row, 20]) < 1e-4


@pytest.mark.parametrize("n", [1, 5, 8, MAX_ROLLBACK])
def test_trim_then_decode_again_equals_first_decode(fixture, n):
    _, _, model, _ = fixture
    cache = model.make_cache()
    model(mx.array(TOKENS[:, :20]), cache)
    first = [np.array(model(mx.array(TOKENS[:, i : i + 1]), cache)) for i in range(20, SEQ)]
    for c in cache:
        assert c.trim(n) == n
    assert cache[0].offset == SEQ - n
    again = [np.array(model(mx.array(TOKENS[:, i : i + 1]), cache)) for i in range(SEQ - n, SEQ)]
    for a, b in zip(first[len(first) - n :], again, strict=True):
        assert rel_err(b, a) < 1e-5


def test_trim_past_the_kept_state_raises_and_trim_all_resets(fixture):
    _, _, model, full = fixture
    tokens = np.random.RandomState(1).randint(0, 96, size=(1, 2 * STEP + 40))
    cache = model.make_cache()
    model(mx.array(tokens[:, : STEP + 20]), cache)
    model(mx.array(tokens[:, STEP + 20 :]), cache)  # reallocates: old window rows are dropped
    offset = cache[0].offset
    with pytest.raises(CacheTrimError, match=f"at most {MAX_ROLLBACK} tokens"):
        cache[0].trim(offset - 10)
    assert cache[0].offset == offset  # unchanged by the refused trim
    for c in cache:
        assert c.trim(MAX_ROLLBACK) == MAX_ROLLBACK
        assert c.trim(c.offset) == offset - MAX_ROLLBACK
    out = np.array(model(mx.array(TOKENS[:1]), cache))  # an empty cache again
    assert rel_err(out, full[:1]) < 1e-5


def test_decode_reads_the_window_and_the_selected_rows_only(fixture, monkeypatch):
    _, hf, model, _ = fixture
    cfg = hf.config
    seen = []
    real = v4_attention.ops.shared_kv_attention

    def spy(q, kv, sinks, scale, mask=None, rows=None):  # rows: quantized ones (kv_bits)
        assert rows is None
        seen.append((q.shape[2], kv.shape[1], mask is None))
        return real(q, kv, sinks, scale, mask, rows)

    monkeypatch.setattr(v4_attention.ops, "shared_kv_attention", spy)
    tokens = np.random.RandomState(2).randint(0, 96, size=(1, 200))
    cache = model.make_cache()
    model(mx.array(tokens[:, :199]), cache)
    seen.clear()
    model(mx.array(tokens[:, 199:]), cache)  # position 199
    W = cfg.sliding_window
    for layer, c, (L, S, unmasked) in zip(model.layers, cache, seen, strict=True):
        assert L == 1 and unmasked
        if layer.attn.kind == SLIDING:
            assert S == W
        elif layer.attn.kind == CSA:
            assert S == W + cfg.index_topk  # not the 50 rows the layer holds
            assert c.compressed.end == c.indexer.end == 200 // layer.attn.ratio
        else:
            assert S == W + 200 // layer.attn.ratio
        # the window buffer stays bounded
        assert c.window.end - c.window.start <= W - 1 + MAX_ROLLBACK + STEP + 1
