"""The decode glue kernels (kernels/norm.py, router.py, mla.py) against float64
NumPy references. Where there is no Metal the very sources run in the CPU emulator of Metal
(tests/metal_emulator); on a Mac they run on the GPU."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from kernel_support import EPS, MAKE_KERNEL, ON_METAL, dequantize, f64, metal

import mlx_deepseek  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_deepseek import ops
from mlx_deepseek.kernels import mla as mla_kernels
from mlx_deepseek.kernels import norm as norm_kernels
from mlx_deepseek.kernels import router as router_kernel
from mlx_deepseek.kernels import runtime as kernels
from mlx_deepseek.kernels.runtime import Unsupported
from mlx_deepseek.models.config import ModelArgs
from mlx_deepseek.models.rope import RoPE
from mlx_deepseek.models.tiny import YARN, tiny_config
from mlx_deepseek.ops import metal as metal_ops
from mlx_deepseek.ops.types import Routing

pytestmark = pytest.mark.emulator  # without Metal: needs clang >= 16 (conftest.py)

DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def rel(got: mx.array, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref|."""
    return float(np.abs(f64(got) - ref).max() / np.abs(ref).max())


def normal(rng, shape, dtype=mx.float32, scale=1.0) -> mx.array:
    return mx.array((scale * rng.normal(size=shape)).astype(np.float32)).astype(dtype)


def rope_args(dims: int = 16) -> ModelArgs:
    # YaRN with mscale != mscale_all_dim: RoPE multiplies by an mscale that is not 1
    yarn = {**YARN, "original_max_position_embeddings": 1024, "mscale": 0.9, "mscale_all_dim": 0.7}
    return ModelArgs.from_dict(
        tiny_config(qk_rope_head_dim=dims, max_position_embeddings=4096, rope_scaling=yarn)
    )


def round_to(a: np.ndarray, dtype) -> np.ndarray:
    return f64(mx.array(a.astype(np.float32)).astype(dtype))


def rms_ref(x: np.ndarray, w: np.ndarray, eps: float, dtype) -> np.ndarray:
    return round_to(x / np.sqrt((x * x).mean(-1, keepdims=True) + eps), dtype) * w


def rope_ref(x: np.ndarray, pos: np.ndarray, rope: RoPE, dtype) -> np.ndarray:
    """DeepSeek's interleaved RoPE of x [..., L, dims] at positions pos [L], after
    RoPE.__call__'s rounding of x * mscale to dtype."""
    x = round_to(x * f64(mx.array(rope.mscale).astype(dtype)), dtype)
    theta = pos[:, None] / f64(rope.freqs)[None, :]  # [L, dims / 2]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * np.cos(theta) - x1 * np.sin(theta)
    out[..., 1::2] = x0 * np.sin(theta) + x1 * np.cos(theta)
    return out


# ---- add + RMSNorm -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_matches_float64(monkeypatch, dtype):
    rng = np.random.default_rng(0)
    D = 200  # not a multiple of the 64 threads: the last ones take fewer values
    x, r = normal(rng, (1, 3, D), dtype), normal(rng, (1, 3, D), dtype)
    norm = nn.RMSNorm(D, eps=1e-5)
    norm.weight = mx.array(rng.uniform(0.5, 1.5, D).astype(np.float32)).astype(dtype)
    with metal(monkeypatch, "norm"):
        h, y, y32 = ops.add_rms_norm(x, r, norm, float32_copy=True)
        h2, y2 = ops.add_rms_norm(x, r, norm)
    h_ref = round_to(f64(x) + f64(r), dtype)
    assert h.dtype == y.dtype == dtype and y32.dtype == mx.float32 and h.shape == x.shape
    assert rel(h, h_ref) <= EPS[dtype]
    assert rel(y, rms_ref(h_ref, f64(norm.weight), 1e-5, dtype)) <= 2 * EPS[dtype]
    assert mx.array_equal(y32, y.astype(mx.float32)) and mx.array_equal(y2, y)
    assert mx.array_equal(h2, h)


# ---- latent norm + RoPE ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_latent_norm_rope_matches_float64(monkeypatch, dtype):
    rng = np.random.default_rng(1)
    rope, rank, offset = RoPE(rope_args()), 64, 37
    assert rope.mscale != 1.0
    kv = normal(rng, (2, 3, rank + 16), dtype)
    norm = nn.RMSNorm(rank, eps=1e-6)
    norm.weight = mx.array(rng.uniform(0.5, 1.5, rank).astype(np.float32)).astype(dtype)
    q_a = normal(rng, (2, 3, 48), dtype)  # V3's q LoRA activation, normed by the same kernel
    q_norm = nn.RMSNorm(48, eps=1e-6)
    q_norm.weight = mx.array(rng.uniform(0.5, 1.5, 48).astype(np.float32)).astype(dtype)
    with metal(monkeypatch, "latent"):
        c, k, none = ops.latent(kv, norm, rope, offset)
        c2, k2, qn = ops.latent(kv, norm, rope, offset, q_a, q_norm)
    assert none is None
    assert c.shape == (2, 1, 3, rank) and k.shape == (2, 1, 3, 16) and c.dtype == dtype
    kv64 = f64(kv)
    assert rel(c[:, 0], rms_ref(kv64[..., :rank], f64(norm.weight), 1e-6, dtype)) <= 2 * EPS[dtype]
    k_ref = rope_ref(kv64[..., rank:], np.arange(offset, offset + 3.0), rope, dtype)
    assert rel(k[:, 0], k_ref) <= 2 * EPS[dtype] + 1e-6
    assert mx.array_equal(c2, c) and mx.array_equal(k2, k) and qn.shape == q_a.shape
    assert rel(qn, rms_ref(f64(q_a), f64(q_norm.weight), 1e-6, dtype)) <= 2 * EPS[dtype]


# ---- quantized embedding -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,bits,gs", [(mx.float16, 4, 64), (mx.bfloat16, 3, 32), (mx.float32, 6, 128)]
)
def test_quantized_embedding_matches_float64(monkeypatch, dtype, bits, gs):
    mx.random.seed(2)
    emb = nn.Embedding(50, 256)
    emb.set_dtype(dtype)
    q = nn.QuantizedEmbedding.from_embedding(emb, gs, bits)
    tokens = mx.array([[3, 49, 0], [7, 7, 12]])
    norm = nn.RMSNorm(256, eps=1e-6)
    norm.weight = mx.random.uniform(0.5, 1.5, (256,)).astype(dtype)
    with metal(monkeypatch, "embedding"):
        y, none = ops.embed(q, tokens)
        y2, normed = ops.embed(q, tokens, norm)  # + the first norm
    assert none is None
    table = dequantize(q.weight, q.scales, q.biases, bits, gs)
    assert y.shape == normed.shape == (2, 3, 256) and y.dtype == normed.dtype == dtype
    assert rel(y, table[np.array(tokens)]) <= EPS[dtype] and mx.array_equal(y2, y)
    assert rel(normed, rms_ref(f64(y), f64(norm.weight), 1e-6, dtype)) <= 2 * EPS[dtype]


# ---- router ------------------------------------------------------------------------------------

ROUTINGS = {
    # V2-Lite: greedy softmax, weights not normalised
    "greedy": dict(E=64, top_k=6, topk_method="greedy", scoring_func="softmax", n_group=1,
                   topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0, bias=False),
    # V2: group-limited greedy over 8 groups of 20, scaled
    "group_limited": dict(E=160, top_k=6, topk_method="group_limited_greedy",
                          scoring_func="softmax", n_group=8, topk_group=3,
                          norm_topk_prob=False, routed_scaling_factor=16.0, bias=False),
    # V3: noaux_tc with the correction bias, 8 groups of 32, normalised then scaled
    "noaux_tc": dict(E=256, top_k=8, topk_method="noaux_tc", scoring_func="sigmoid",
                     n_group=8, topk_group=4, norm_topk_prob=True,
                     routed_scaling_factor=2.5, bias=True),
    # softmax renormalised over the top-2; E not a multiple of 32
    "softmax_norm": dict(E=40, top_k=2, topk_method="greedy", scoring_func="softmax",
                         n_group=1, topk_group=1, norm_topk_prob=True,
                         routed_scaling_factor=1.0, bias=False),
}  # fmt: skip


def route_ref(logits: np.ndarray, bias: np.ndarray | None, c: dict):
    """moe.route() in float64 NumPy: per token, (indices best choice first, their weights)."""
    if c["scoring_func"] == "softmax":
        e = np.exp(logits - logits.max(-1, keepdims=True))
        scores = e / e.sum(-1, keepdims=True)
    else:
        scores = 1 / (1 + np.exp(-logits))
    choice = scores + (bias if bias is not None else 0)
    G, k = c["n_group"], c["top_k"]
    out = []
    for s, ch in zip(scores, choice, strict=True):
        ch = ch.copy()
        if c["topk_method"] != "greedy" and G > 1:
            grouped = ch.reshape(G, -1)
            if c["topk_method"] == "group_limited_greedy":
                gs = grouped.max(-1)
            else:
                gs = np.sort(grouped, -1)[:, -2:].sum(-1)
            for g in np.argsort(gs)[: G - c["topk_group"]]:
                grouped[g] = -np.inf
            ch = grouped.reshape(-1)
        inds = np.argsort(-ch)[:k]
        w = s[inds]
        if c["scoring_func"] == "sigmoid":
            if c["norm_topk_prob"]:
                w = w / (w.sum() + 1e-20)
            w = w * c["routed_scaling_factor"]
        elif k > 1 and c["norm_topk_prob"]:
            w = w / (w.sum() + 1e-20)
        else:
            w = w * c["routed_scaling_factor"]
        out.append((inds.tolist(), w))
    return out


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_router_matches_float64(monkeypatch, name):
    c = dict(ROUTINGS[name])
    E, has_bias = c.pop("E"), c.pop("bias")
    rng = np.random.default_rng(3)
    logits = normal(rng, (2, 3, E), scale=2.0)
    bias = normal(rng, (E,), scale=0.1) if has_bias else None
    with metal(monkeypatch, "router"):
        inds, w = ops.route(logits, bias, Routing(**c))
    assert inds.shape == w.shape == (2, 3, c["top_k"]) and inds.dtype == mx.uint32
    if not ON_METAL:  # threads in the opposite order between barriers: the same result
        spec = router_kernel.route_spec(6, E, has_bias=has_bias, **{
            k: c[k] for k in ("top_k", "topk_method", "scoring_func", "n_group", "topk_group",
                              "norm_topk_prob")
        })  # fmt: skip
        rsf = mx.array([c["routed_scaling_factor"]], mx.float32)
        ins = [logits.reshape(6, E), bias if has_bias else rsf, rsf]
        i2, w2 = MAKE_KERNEL(**spec.definition())(inputs=ins, schedule="reverse", **spec.launch())
        assert mx.array_equal(i2.reshape(inds.shape), inds) and mx.array_equal(
            w2.reshape(w.shape), w
        )
    expected = route_ref(f64(logits).reshape(6, E), None if bias is None else f64(bias), c)
    got_i, got_w = np.array(inds).reshape(6, -1), f64(w).reshape(6, -1)
    for t, (ref_i, ref_w) in enumerate(expected):
        assert got_i[t].tolist() == ref_i  # the same experts, best choice first
        np.testing.assert_allclose(got_w[t], ref_w, rtol=1e-6)


# ---- MLA absorbed attention ----------------------------------------------------------------------


def mla_ref(d: dict, rope: RoPE, scale: float, dtype) -> np.ndarray:
    """Absorbed MLA in float64: [B, L, H * v] (W_uv given) or the latent [B, H, L, rank]."""
    q_lat, qb, c_kv, k_pe = (f64(d[n]) for n in ("q_lat", "qb", "c_kv", "k_pe"))
    B, H, L, rank = q_lat.shape
    S, pos0 = c_kv.shape[2], d["offset"]
    nope = qb.shape[-1] // H - k_pe.shape[-1]
    q_pe = qb.reshape(B, L, H, -1)[..., nope:].transpose(0, 2, 1, 3)  # [B, H, L, rope]
    q_pe = round_to(rope_ref(q_pe, np.arange(pos0, pos0 + L, dtype=np.float64), rope, dtype), dtype)
    s = scale * (q_lat @ c_kv.transpose(0, 1, 3, 2) + q_pe @ k_pe.transpose(0, 1, 3, 2))
    visible = np.arange(S)[None, :] <= (pos0 + np.arange(L))[:, None]  # [L, S]
    s = np.where(visible, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    lat = (p / p.sum(-1, keepdims=True)) @ c_kv  # [B, H, L, rank]
    if d.get("w_uv") is None:
        return lat
    return np.einsum("hvr,bhlr->blhv", d["w_uv"], lat).reshape(B, L, -1)


def mla_case(dtype, B, H, L, S, unembed, seed=0, strided=False):
    rng = np.random.default_rng(seed)
    rank, rope_dims, nope, V = 64, 16, 32, 32
    cap = S + 7 if strided else S  # a cache buffer longer than S: the kernel reads strides
    d = {
        "q_lat": normal(rng, (B, H, L, rank), dtype),
        "qb": normal(rng, (B, L, H * (nope + rope_dims)), dtype),
        "c_kv": normal(rng, (B, 1, cap, rank), dtype)[:, :, :S],
        "k_pe": normal(rng, (B, 1, cap, rope_dims), dtype)[:, :, :S],
        "offset": S - L,
    }
    inputs = []
    if unembed:
        bits, gs = unembed
        w = mx.array(rng.normal(0, 0.2, (H, V, rank)).astype(np.float32)).astype(dtype)
        wq = list(mx.quantize(w, gs, bits))
        d["w_uv"] = dequantize(*wq, bits, gs)
        inputs = wq
    return d, (rank, rope_dims, nope, V), inputs


MLA_CASES = {
    # one decode token, 5 heads (a partial query group), 100 keys in several chunks, 4-bit W_uv
    "decode-f32-q4g32": (mx.float32, 1, 5, 1, 100, (4, 32), False),
    # 3 tokens (causal) x 2 sequences, 33 keys: the second chunk has one key, hidden from the
    # first token; W_uv left to MLX (the latent comes back); a strided cache
    "verify3-bf16-latent": (mx.bfloat16, 2, 4, 3, 33, None, True),
    # 2 tokens, 300 keys (10 chunks, a partial last tile), 8-bit W_uv
    "verify2-f16-q8g64": (mx.float16, 1, 4, 2, 300, (8, 64), False),
}


@pytest.mark.parametrize("name", list(MLA_CASES))
def test_mla_kernels_match_float64(name):
    dtype, B, H, L, S, unembed, strided = MLA_CASES[name]
    d, (rank, rope_dims, nope, V), w_inputs = mla_case(dtype, B, H, L, S, unembed, strided=strided)
    rope, scale = RoPE(rope_args(rope_dims)), 0.125
    bits_gs = (*unembed, dtype) if unembed else None
    attend, combine, chunk = mla_kernels.attention_specs(
        dtype, B, H, L, S, rank, rope_dims, nope, V, bits_gs
    )
    nb = attend.grid[1]
    assert nb > 1 and (S % chunk or S % mla_kernels.BK)  # several chunks, a partial tile
    fparams = mx.array([scale, rope.mscale], mx.float32)
    iparams = mx.array([d["offset"], chunk], mx.int32)
    ins = [d["q_lat"], d["qb"], d["c_kv"], d["k_pe"], rope.freqs, fparams, iparams]
    o, ml = kernels.launch(attend, ins, MAKE_KERNEL)
    if not w_inputs:
        w_inputs = [mx.array([0] * 8, mx.uint32), *[mx.array([0.0] * 8, dtype)] * 2]
    (y,) = kernels.launch(combine, [o, ml, *w_inputs], MAKE_KERNEL)
    if not ON_METAL:  # threads run in the opposite order between barriers: a race would show
        reverse = {"schedule": "reverse", **attend.launch()}
        o2, ml2 = MAKE_KERNEL(**attend.definition())(inputs=ins, **reverse)
        assert mx.array_equal(o2, o) and mx.array_equal(ml2, ml)
    ref = mla_ref(d, rope, scale, dtype)
    assert y.dtype == dtype and y.shape == ref.shape
    err = rel(y, ref)
    print(f"{name}: {nb} chunks of {chunk}, error {err / EPS[dtype]:.3g} EPS")
    assert err <= (EPS[dtype] if dtype != mx.float32 else 1e-5)


def test_mla_chunking_fills_the_gpu_and_covers_every_key():
    for S, groups in [(1, 1), (31, 1), (33, 2), (128, 16), (8192, 16), (8192, 2), (100000, 1)]:
        nb, chunk = mla_kernels.chunking(S, groups)
        assert chunk % mla_kernels.BK == 0 and (nb - 1) * chunk < S <= nb * chunk
        assert nb * groups >= min(mla_kernels.MIN_THREADGROUPS, -(-S // mla_kernels.BK) * groups)
    assert mla_kernels.query_group(512, 64) == 8  # DeepSeek's latent: 8 queries per group


# ---- the runtime -------------------------------------------------------------------------------


def test_the_switch_takes_a_list_of_families(monkeypatch):
    monkeypatch.setattr(metal_ops._State, "disabled", set())
    families = metal_ops.FAMILIES
    for value, on in [("1", families), ("0", ()), ("moe, router", ("moe", "router"))]:
        monkeypatch.setenv(metal_ops.ENV_SWITCH, value)
        with ops.use("metal"):  # the switch is read when the back-end is resolved
            assert {f for f in families if metal_ops.enabled(f)} == set(on), value
    monkeypatch.setenv(metal_ops.ENV_SWITCH, "1")
    with ops.use("metal"):
        assert all(metal_ops.enabled(f) for f in families)
    # the back-end follows the device: no Metal kernel runs where there is no Metal GPU
    monkeypatch.delenv(ops.backend.ENV_BACKEND, raising=False)
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    assert ops.backend.default_name() in ("cpu", "mlx")
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    with mx.stream(mx.cpu):
        assert ops.backend.default_name() == "cpu"


def test_a_failing_family_is_switched_off_alone(monkeypatch):
    c = dict(ROUTINGS["noaux_tc"])
    E, _ = c.pop("E"), c.pop("bias")
    routing = Routing(**c)
    logits = normal(np.random.default_rng(4), (1, E))
    bias = mx.zeros((E,))
    broken = kernels.source("router.metal").replace("v = v * rsf[0];", "v = v * 2.0f * rsf[0];")
    monkeypatch.setitem(kernels._sources, "router.metal", broken)
    monkeypatch.setattr(metal_ops._State, "disabled", set())
    monkeypatch.setattr(metal_ops._State, "checked", set())
    if not ON_METAL:
        monkeypatch.setattr(mx.fast, "metal_kernel", MAKE_KERNEL)
    with ops.use("metal"):
        with pytest.warns(RuntimeWarning, match="router Metal kernels disagree"):
            inds, w = ops.route(logits, bias, routing)  # MLX's result after the failure
        with ops.use("mlx"):
            ref_inds, ref_w = ops.route(logits, bias, routing)
        assert mx.array_equal(inds, ref_inds) and mx.array_equal(w, ref_w)
        assert metal_ops._State.disabled == {"router"}
        assert not metal_ops.enabled("router") and metal_ops.enabled("mla")


def test_kernels_decline_what_they_do_not_take(caplog):
    caplog.set_level("DEBUG", logger="mlx_deepseek")
    norm = nn.RMSNorm(64)
    x = mx.zeros((1, 9, 64))

    def zeros(spec, inputs):
        return [mx.zeros(s, d) for s, d in zip(spec.output_shapes, spec.output_dtypes, strict=True)]

    with kernels.pretend_metal(zeros):
        with pytest.raises(Unsupported, match="9 tokens"):
            norm_kernels.add_rms_norm(x, x, norm)
        with pytest.raises(Unsupported, match="r mlx.core.float16"):
            norm_kernels.add_rms_norm(x[:, :2], x[:, :2].astype(mx.float16), norm)
        with pytest.raises(Unsupported, match="not quantized"):
            norm_kernels.quantized_embedding(nn.Embedding(8, 64), mx.array([1]))
        kv, rope = mx.zeros((1, 1, 80)), RoPE(rope_args())
        q_norm = nn.RMSNorm(48, eps=1e-6)  # q_a_layernorm's eps differs from kv's: declined
        assert norm_kernels.latent_norm_rope(kv, nn.RMSNorm(64), rope, 0) is not None
        with pytest.raises(Unsupported, match="q_a"):
            norm_kernels.latent_norm_rope(kv, nn.RMSNorm(64), rope, 0, mx.zeros((1, 1, 48)), q_norm)
        # the dispatcher uses MLX's path for them, saying why at debug level
        with ops.use("metal"):
            h, y = ops.add_rms_norm(x, x, norm)
        assert mx.array_equal(h, x + x)
    assert "norm kernels not used: 9 tokens" in caplog.text


def test_pretend_metal_does_not_nest():
    with kernels.pretend_metal(lambda spec, inputs: []):
        with pytest.raises(RuntimeError, match="nest"), kernels.pretend_metal(lambda s, i: []):
            pass
