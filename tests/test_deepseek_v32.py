"""DeepSeek V3.2's sparse attention: against a float64 transcription of DeepSeek's code
(dsa_oracle.py), against transformers' DeepseekV32 (also in test_model.py), across the
prefill / chunked / cached-decode paths, and its documented tie-breaking rule."""

import json

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import build_hf_model, hf_logits, rel_err, save_hf_checkpoint
from dsa_oracle import attention as oracle_attention

import mlx_deepseek
from mlx_deepseek import ops
from mlx_deepseek.errors import ConfigError
from mlx_deepseek.models import model_args, tiny
from mlx_deepseek.models.deepseek_v32 import IndexedCache, SparseAttention
from mlx_deepseek.ops import CAUSAL, sparse

T = 26  # tokens: well past index_topk in both configs

CONFIGS = {
    # YaRN (mscale == mscale_all_dim, as DeepSeek ships it), q LoRA, 16 indexer heads
    "yarn": dict(rope_scaling={**tiny.YARN, "mscale": 0.8}),
    # other shapes: no YaRN, 2 heads, 8 rope channels, 24 indexer heads of 16, top-5
    "plain": dict(
        rope_scaling=None,
        num_attention_heads=2,
        num_key_value_heads=2,
        qk_rope_head_dim=8,
        qk_nope_head_dim=24,
        index_topk=5,
        index_n_heads=24,
        index_head_dim=16,
        rope_theta=50000.0,
    ),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def v32(request, tmp_path_factory):
    hf = build_hf_model("v32", seed=3, **CONFIGS[request.param])
    path = save_hf_checkpoint(hf, tmp_path_factory.mktemp(request.param))
    model = mlx_deepseek.load_model(path, dtype="float32")
    return request.param, hf, model


def layer_weights(hf, i: int) -> dict:
    prefix = f"model.layers.{i}.self_attn."
    return {
        k[len(prefix) :]: v.double().numpy()
        for k, v in hf.state_dict().items()
        if k.startswith(prefix)
    }


def oracle_config(hf) -> dict:
    c = hf.config
    fields = (
        "num_attention_heads",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "kv_lora_rank",
        "index_n_heads",
        "index_head_dim",
        "index_topk",
    )
    out = {f: getattr(c, f) for f in fields}
    params = dict(c.rope_parameters)
    out["rope_theta"] = params.pop("rope_theta")
    out["rope_scaling"] = params if params.get("rope_type") == "yarn" else None
    return out


def inputs(model, seed: int = 0) -> mx.array:
    x = np.random.default_rng(seed).standard_normal((1, T, model.args.hidden_size))
    return mx.array(x.astype(np.float32))


@pytest.fixture(scope="module")
def oracle(v32):
    name, hf, model = v32
    x = inputs(model)
    ref, scores, chosen = oracle_attention(
        layer_weights(hf, 1), np.array(x[0], np.float64), oracle_config(hf)
    )
    return x, ref, scores, chosen


def test_fixture_has_no_ties_at_the_topk_edge(v32, oracle):
    _, _, model = v32
    _, _, scores, _ = oracle
    K = model.args.index_topk
    gaps = []
    for t in range(K, T):  # rows with more visible positions than K
        s = np.sort(scores[t, : t + 1])[::-1]
        gaps.append((s[K - 1] - s[K]) / np.abs(s).max())
    assert min(gaps) > 1e-4, "an exact tie at the top-k edge would make the fixture ambiguous"


def test_layer_matches_deepseek_transcription_past_topk(v32, oracle):
    name, _, model = v32
    x, ref, _, _ = oracle
    attn = model.layers[1].self_attn
    out = np.array(attn(x, CAUSAL, None)[0])
    err = rel_err(out, ref)
    print(f"{name}: layer vs float64 DeepSeek transcription {err:.2e}")
    assert err < 1e-4
    # the selection matters: the same layer attending densely is far from the reference
    attn.index_topk = 10**6
    try:
        dense = np.array(attn(x, CAUSAL, None)[0])
    finally:
        attn.index_topk = model.args.index_topk
    assert rel_err(dense, ref) > 1e-2


def test_selected_positions_equal_the_transcription(v32, oracle):
    _, _, model = v32
    x, _, _, chosen = oracle
    attn = model.layers[1].self_attn
    q_a = attn.q_a_layernorm(attn.q_a_proj(x))
    q, w = attn.indexer.queries(x, q_a, 0)
    k = attn.indexer.keys(x, 0)[:, 0]
    scores = ops.index_scores(q.transpose(0, 2, 1, 3), k, w, 1.0)  # w carries the scales
    idx, valid = sparse.select_topk(scores, model.args.index_topk, sparse.causal(T, T, 0))
    idx, valid = np.array(idx[0]), np.array(valid[0])
    for t in range(T):
        ours = set(idx[t][valid[t]].tolist())
        assert ours == {p for p in chosen[t].tolist() if p <= t}, t


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_query_chunks_do_not_change_the_layer(v32, oracle, chunk):
    _, _, model = v32
    x, ref, _, _ = oracle
    attn = model.layers[1].self_attn
    attn.chunk = chunk
    try:
        out = np.array(attn(x, CAUSAL, None)[0])
    finally:
        attn.chunk = None
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("prefill", [1, 4, 11])
def test_cached_steps_match_the_transcription(v32, oracle, prefill):
    """A prefill of `prefill` tokens then one token at a time, through the IndexedCache."""
    _, _, model = v32
    x, ref, _, _ = oracle
    attn = model.layers[1].self_attn
    cache = IndexedCache()
    outs = [attn(x[:, :prefill], CAUSAL if prefill > 1 else None, cache)]
    for t in range(prefill, T):
        outs.append(attn(x[:, t : t + 1], None, cache))
    out = np.concatenate([np.array(o[0]) for o in outs])
    assert rel_err(out, ref) < 1e-4
    assert cache.offset == T and cache.index_keys.shape[-1] == model.args.index_head_dim


def test_chunked_prefill_and_decode_equal_the_full_forward(v32):
    name, hf, model = v32
    tokens = np.random.RandomState(5).randint(2, 320, size=(1, 30))
    full = np.array(model(mx.array(tokens)))
    ref = hf_logits(hf, tokens).numpy()
    err = rel_err(full, ref)
    print(f"{name}: 30 tokens, index_topk {model.args.index_topk}: vs transformers {err:.2e}")
    assert err < 1e-4
    cache = model.make_cache()
    parts = [model(mx.array(tokens[:, a:b]), cache=cache) for a, b in ((0, 4), (4, 13), (13, 27))]
    parts += [model(mx.array(tokens[:, t : t + 1]), cache=cache) for t in range(27, 30)]
    stepped = np.concatenate([np.array(p) for p in parts], axis=1)
    assert rel_err(stepped, full) < 1e-5


def test_trimmed_cache_recomputes_the_same(v32):
    """Trimming (speculative rollback, chat edits) cuts the indexer keys with the latent."""
    _, _, model = v32
    tokens = mx.array(np.random.RandomState(6).randint(2, 320, size=(1, 20)))
    full = np.array(model(tokens))
    cache = model.make_cache()
    model(tokens[:, :16], cache=cache)
    for c in cache:
        c.trim(6)
    again = np.array(model(tokens[:, 10:], cache=cache))
    assert rel_err(again, full[:, 10:]) < 1e-5


def test_batch_rows_are_independent(v32):
    _, _, model = v32
    tokens = np.random.RandomState(7).randint(2, 320, size=(2, 18))
    both = np.array(model(mx.array(tokens)))
    for b in range(2):
        assert rel_err(both[b : b + 1], np.array(model(mx.array(tokens[b : b + 1])))) < 1e-5


# ---- what the sparse paths read ------------------------------------------------------------


def latent_operands(rng, B, H, L, S, rank=16, rope=8, Hi=4, Di=8):
    f = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
    return dict(
        q_index=f(B, L, Hi, Di), k_index=f(B, S, Di), weights=f(B, L, Hi),
        q_lat=f(B, H, L, rank), q_pe=f(B, H, L, rope), c_kv=f(B, S, rank), k_pe=f(B, S, rope),
    )  # fmt: skip


@pytest.mark.parametrize("L,S,topk", [(1, 500, 7), (1, 64, 64), (5, 300, 6), (3, 40, 9)])
def test_only_the_selected_latent_rows_are_read(L, S, topk):
    """Every latent / rope row no query selects is NaN: a dense (masked) attention would
    spread the NaN (0 * NaN), the sparse one reads K rows per query and stays exact."""
    rng = np.random.default_rng(L * S)
    a = latent_operands(rng, 2, 3, L, S)
    visible = sparse.causal(L, S, S - L)
    kw = dict(visible=visible, topk=topk, scale=0.3)
    clean = np.array(sparse.sparse_attention(**a, **kw))
    q = a["q_index"].transpose(0, 2, 1, 3)
    scores = ops.index_scores(q, a["k_index"], a["weights"], 1.0)
    idx, valid = sparse.select_topk(scores, topk, visible)
    assert idx.shape[-1] == min(topk, S)
    used = np.zeros((2, S), bool)
    for b in range(2):
        used[b, np.array(idx[b])[np.array(valid[b])]] = True
    assert (~used).sum() > 0 or topk >= S
    poison = mx.array(np.where(used[..., None], 0.0, np.nan).astype(np.float32))
    a["c_kv"], a["k_pe"] = a["c_kv"] + poison, a["k_pe"] + poison
    out = np.array(sparse.sparse_attention(**a, **kw))
    assert np.isfinite(out).all()
    assert rel_err(out, clean) < 1e-6


def test_decode_attends_to_index_topk_rows(v32, monkeypatch):
    """One decoded token far past index_topk: each layer's attention gets K rows."""
    _, _, model = v32
    K = model.args.index_topk
    seen = []
    real = sparse.gather_attention

    def spy(q_lat, q_pe, c_kv, k_pe, idx, valid, scale):
        seen.append((q_lat.shape[2], c_kv.shape[1], idx.shape[-1]))
        return real(q_lat, q_pe, c_kv, k_pe, idx, valid, scale)

    monkeypatch.setattr(sparse, "gather_attention", spy)
    tokens = mx.array(np.random.RandomState(11).randint(2, 320, size=(1, 40)))
    cache = model.make_cache()
    model(tokens[:, :39], cache=cache)
    seen.clear()
    model(tokens[:, 39:], cache=cache)
    assert seen == [(1, 40, K)] * len(model.layers)


def test_long_prefill_is_chunked_under_the_block_budget(v32, monkeypatch):
    """A prefill of T >> index_topk with a small block budget: no indexer block holds the
    T x T scores; the chunked result equals the one-block result."""
    _, _, model = v32
    T = 160
    tokens = mx.array(np.random.RandomState(12).randint(2, 320, size=(1, T)))
    whole = np.array(model(tokens))
    budget = 2048
    monkeypatch.setattr(sparse, "BLOCK_ELEMENTS", budget)
    blocks = []
    real = sparse._index_scores

    def spy(q, k, w, scale):
        blocks.append((q.shape[2], q.shape[1] * q.shape[2] * k.shape[1]))
        return real(q, k, w, scale)

    monkeypatch.setattr(sparse, "_index_scores", spy)
    chunked = np.array(model(tokens))
    Hi = model.args.index_n_heads
    assert len(blocks) == len(model.layers) * -(-T // max(1, budget // (Hi * T)))
    assert all(rows < T and size <= max(budget, Hi * T) for rows, size in blocks)
    assert rel_err(chunked, whole) < 1e-5


@pytest.mark.parametrize("backend", ["cpu", "mlx"])
def test_every_back_end_selects_the_same(v32, backend):
    """The back-ends (cpu: this project's CPU strategies; mlx: MLX's own ops) give the same
    logits past index_topk, in a full forward and in cached decode."""
    _, _, model = v32
    tokens = mx.array(np.random.RandomState(13).randint(2, 320, size=(1, 24)))
    with ops.use("mlx"):
        ref = np.array(model(tokens))
    with ops.use(backend):
        full = np.array(model(tokens))
        cache = model.make_cache()
        parts = [model(tokens[:, :15], cache=cache)]
        parts += [model(tokens[:, t : t + 1], cache=cache) for t in range(15, 24)]
        stepped = np.concatenate([np.array(p) for p in parts], axis=1)
    assert rel_err(full, ref) < 1e-5 and rel_err(stepped, ref) < 1e-5


# ---- the selection rule ------------------------------------------------------------------


def reference_topk(scores: np.ndarray, topk: int, offset: int) -> list[set[int]]:
    """Stable sort on -score over the visible positions: ties to the lower position."""
    out = []
    for i, row in enumerate(scores):
        visible = row[: offset + i + 1]
        out.append(set(np.argsort(-visible, kind="stable")[:topk].tolist()))
    return out


@pytest.mark.parametrize("S,topk,offset", [(40, 8, 30), (300, 16, 290), (9, 9, 0), (64, 5, 20)])
def test_ties_go_to_the_lower_position(S, topk, offset):
    rng = np.random.default_rng(S)
    L = S - offset
    # few distinct values (exact ties everywhere), zeros of both signs, negatives
    scores = rng.integers(-2, 3, size=(1, L, S)).astype(np.float32) * 0.5
    scores[rng.random(scores.shape) < 0.2] = -0.0
    idx, valid = sparse.select_topk(mx.array(scores), topk, sparse.causal(L, S, offset))
    idx, valid = np.array(idx[0]), np.array(valid[0])
    want = reference_topk(scores[0], topk, offset)
    for i in range(L):
        assert set(idx[i][valid[i]].tolist()) == want[i], i


def test_the_selection_is_the_same_query_by_query():
    """Decode (one query at a time) keeps what prefill (all queries at once) keeps."""
    rng = np.random.default_rng(1)
    scores = (rng.integers(0, 3, size=(1, 12, 40)) * (rng.random((1, 12, 40)) < 0.5)).astype(
        np.float32
    )
    idx, valid = sparse.select_topk(mx.array(scores), 6, sparse.causal(12, 40, 28))
    for i in range(12):
        one, ok = sparse.select_topk(mx.array(scores[:, i : i + 1, : 29 + i]), 6)  # decode
        a = set(np.array(idx[0, i])[np.array(valid[0, i])].tolist())
        assert a == set(np.array(one[0, 0])[np.array(ok[0, 0])].tolist())


def test_query_chunks_stay_under_the_block_budget():
    # V3.2's real shapes at 64K context: 64 indexer heads, 128 heads, top-2048 of 512 + 64
    n = sparse.query_chunk(4096, 65536, 64, 128, 2048, 512)
    assert 1 <= n < 4096
    assert n * 64 * 65536 <= sparse.BLOCK_ELEMENTS
    assert sparse.query_chunk(3, 20, 4, 4, 8, 32) == 3  # small: one chunk


# ---- config --------------------------------------------------------------------------------


def v32_config(**changes) -> dict:
    config = build_hf_model("v32").config.to_dict()
    config.update(changes)
    return config


@pytest.mark.parametrize(
    "changes,needle",
    [
        (dict(q_lora_rank=None), "q_lora_rank"),
        (dict(index_head_dim=8), "index_head_dim=8"),
        (dict(index_topk=0), "index_topk=0"),
        (dict(index_n_heads="64"), "index_n_heads='64'"),
    ],
)
def test_bad_v32_configs_name_the_field(changes, needle):
    with pytest.raises(ConfigError) as e:
        model_args(v32_config(**changes))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_v32_args_count_the_indexer_key_in_the_cache():
    args = model_args(v32_config())
    assert args.kv_values_per_layer == 32 + 16 + 32  # rank + rope + index_head_dim
    assert isinstance(mlx_deepseek.models.build_model(args).layers[0].self_attn, SparseAttention)


# ---- convert, info, the memory preflight ---------------------------------------------------


@pytest.fixture(scope="module")
def v32_source(tmp_path_factory):
    from checkpoints import add_mtp_layer

    hf = build_hf_model("v32", seed=4)
    path = save_hf_checkpoint(hf, tmp_path_factory.mktemp("v32src"))
    add_mtp_layer(path)  # V3.2 checkpoints carry one; mlx-deepseek (like mlx-lm) drops it
    return hf, path


def test_checkpoint_with_its_mtp_layer_loads_and_matches_transformers(v32_source):
    hf, path = v32_source
    tokens = np.random.RandomState(8).randint(2, 320, size=(1, 20))
    model = mlx_deepseek.load_model(path, dtype="float32")
    assert not model.mtp
    assert rel_err(np.array(model(mx.array(tokens))), hf_logits(hf, tokens).numpy()) < 1e-4


@pytest.mark.parametrize("quantize", [False, True], ids=["float", "q8"])
def test_converted_v32_loads_in_mlx_deepseek_and_mlx_lm(v32_source, tmp_path, quantize):
    from mlx_deepseek.convert import Options, convert
    from mlx_lm.utils import load_model as lm_load

    from mlx_deepseek.safetensors_check import read_safetensors_header

    hf, path = v32_source
    out = tmp_path / "out"
    summary = convert(path, out, Options(bits=8, group_size=32, quantize=quantize))
    assert any("without its MTP layer" in n for n in summary.notes)
    names = {n for f in out.glob("*.safetensors") for n in read_safetensors_header(f).tensors}
    assert "model.layers.1.self_attn.indexer.k_norm.bias" in names
    assert not any(n.startswith(("mtp.", "model.layers.3.")) for n in names)
    tokens = np.random.RandomState(9).randint(2, 320, size=(1, 20))
    ours = np.array(mlx_deepseek.load_model(out, dtype="float32")(mx.array(tokens)))
    if not quantize:
        assert rel_err(ours, hf_logits(hf, tokens).numpy()) < 1e-4
    else:  # the indexer's head weights stay unquantized
        cfg = json.loads((out / "config.json").read_text())["quantization"]
        assert cfg["model.layers.1.self_attn.indexer.weights_proj"] is False
    # mlx-lm's deepseek_v32 on the same files (its k_norm eps is 1e-5, not DeepSeek's 1e-6)
    lm, _ = lm_load(out)
    assert rel_err(np.array(lm(mx.array(tokens)).astype(mx.float32)), ours) < 1e-3


def test_info_and_memory_preflight_count_the_indexer_cache(v32_source, monkeypatch):
    from typer.testing import CliRunner

    from mlx_deepseek import loading
    from mlx_deepseek.cli import app

    _, path = v32_source
    result = CliRunner().invoke(app, ["info", str(path)], standalone_mode=False)
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "deepseek_v32" in out and "latent + indexer key" in out
    assert "at most 8 positions, chosen by 16 indexer heads of 32" in out
    args = model_args(json.loads((path / "config.json").read_text()))
    # 3 layers x (32 latent + 16 rope + 32 indexer key) values, no MTP layer; 4096 tokens in
    # the checkpoint's float32
    assert loading.cache_values_per_token(args) == 3 * 80
    assert f"cache, 4096 tokens {3 * 80 * 4 * 4096 / 1e6:.1f} MB" in out
    # the preflight refuses when weights + that cache do not fit
    weights_bytes, cache_bytes = loading.estimate_memory(args, {}, mx.bfloat16)
    monkeypatch.setattr(loading, "available_memory", lambda: cache_bytes - 1)
    with pytest.raises(mlx_deepseek.errors.OutOfMemoryError, match="cache"):
        mlx_deepseek.load_model(path)
