"""DeepSeek V4's quantized cache (`--kv-bits`, load(kv_bits=...), mlx-lm's kv_bits): the
compressed rows' non-RoPE channels in MLX's affine groups, their RoPE channels, the window,
the indexer's rows and the compressor state at full precision.

- the attention op reads quantized rows exactly as their dequantized values (MLX, CPU);
- decoding equals a float cache holding the round-tripped rows (the quantization error is
  the only difference) and stays close to the float cache, on V4s of several shapes (mixed
  sliding / compressed sparse / heavily compressed layers, ratios, windows, widths);
- the bytes per token are what the formula (and the memory preflight) says;
- MTP drafting, mlx-lm's kv_bits (to_quantized) and the refusals.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from v4_checkpoints import CSA, HCA, SLIDING, build_v4, save_v4, write_official

import mlx_deepseek
from mlx_deepseek import loading, ops
from mlx_deepseek.decoding import StepOptions, decode_steps
from mlx_deepseek.errors import DeepSeekError
from mlx_deepseek.models.cache import latent_bytes_per_token
from mlx_deepseek.models.v4_cache import QuantizedRows, RowBuffer
from mlx_deepseek.sampling import greedy
from mlx_deepseek.speculative import MTPDecoder

# (shape, overrides): widths whose non-RoPE channels MLX can group (head_dim - rope)
SHAPES = {
    "mixed": dict(head_dim=72, partial_rotary_factor=8 / 72),  # 64 + 8
    "hca_first": dict(head_dim=40, partial_rotary_factor=8 / 40),  # 32 + 8, HCA ratio 16
    "csa_ratio2": dict(head_dim=96, partial_rotary_factor=32 / 96, index_head_dim=32),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"v4kv-{request.param}")
    save_v4(build_v4(request.param, seed=5, **SHAPES[request.param]), path)
    return request.param, path


class RoundTripRows(RowBuffer):
    """The reference: float rows holding quantize-then-dequantize of each compressed row's
    non-RoPE channels (its RoPE channels as they are)."""

    def __init__(self, rope: int, group_size: int, bits: int):
        super().__init__()
        self.rope, self.group_size, self.bits = rope, group_size, bits

    def append(self, rows: mx.array) -> None:
        d = rows.shape[-1] - self.rope
        q = mx.quantize(rows[..., :d], group_size=self.group_size, bits=self.bits)
        body = mx.dequantize(*q, group_size=self.group_size, bits=self.bits)
        super().append(mx.concatenate([body.astype(rows.dtype), rows[..., d:]], axis=-1))


def decode_logits(model, tokens: list[int], cache) -> np.ndarray:
    """Logits of each step: the first third prefilled, then one token at a time."""
    n = len(tokens) // 3
    out = [np.array(model(mx.array([tokens[:n]]), cache)[0, -1:])]
    for t in tokens[n:]:
        out.append(np.array(model(mx.array([[t]]), cache)[0]))
    return np.concatenate(out)


@pytest.mark.parametrize("backend", ["mlx", "cpu"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("d, rope", [(72, 8), (96, 32), (160, 32)])
def test_attention_reads_quantized_rows_as_their_dequantized_values(backend, bits, d, rope):
    g = 32 if (d - rope) % 64 else 64
    for B, L, S, n in [(1, 1, 7, 5), (2, 1, 9, 12), (2, 4, 10, 6)]:
        k = mx.random.split(mx.random.key(S + n), 5)
        H = 3
        q = mx.random.normal((B, H, L, d), key=k[0])
        kv = mx.random.normal((B, S, d), key=k[1])
        rows = mx.random.normal((B, n, d), key=k[2])
        sinks = mx.random.normal((H,), key=k[3])
        mask = None
        if L > 1:
            mask = mx.random.bernoulli(0.7, (B, L, S + n), key=k[4])
            mask[..., 0] = True
        buf = QuantizedRows(rope, g, bits)
        buf.append(rows)
        split = buf.all()
        assert isinstance(split, ops.SplitRows) and split.rope.shape == (B, n, rope)
        dense = ops.dense_rows(split, d)
        with ops.use(backend):
            got = ops.shared_kv_attention(q, kv, sinks, d**-0.5, mask, split)
            want = ops.shared_kv_attention(
                q, mx.concatenate([kv, dense.astype(kv.dtype)], axis=1), sinks, d**-0.5, mask
            )
            picked = ops.gather_rows(split, mx.array([[n - 1, 0]] * B))
        got, want = np.array(got), np.array(want)
        assert got.shape == (B, H, L, d)
        assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max(), (B, L, S, n)
        np.testing.assert_array_equal(
            np.array(ops.dense_rows(picked, d)), np.array(dense)[:, [n - 1, 0]]
        )


@pytest.mark.parametrize("bits", [8, 4])
def test_decode_equals_the_float_cache_within_the_quantization_error(checkpoint, bits):
    shape, path = checkpoint
    model = mlx_deepseek.load_model(path, kv_bits=bits)
    g = model.kv_group_size
    tokens = [int(t) for t in np.random.RandomState(len(shape)).randint(2, 96, size=60)]
    quant_cache = model.make_cache()
    assert any(isinstance(c.compressed, QuantizedRows) for c in quant_cache)
    quant = decode_logits(model, tokens, quant_cache)
    model.kv_bits = None
    full = decode_logits(model, tokens, model.make_cache())
    reference_cache = model.make_cache()
    for c in reference_cache:
        if c.compressed is not None:
            c.compressed = RoundTripRows(c.rope, g, bits)
    reference = decode_logits(model, tokens, reference_cache)
    scale = np.abs(full).max()
    # reading the quantized rows: the round-tripped float cache's logits, to rounding
    assert np.abs(quant - reference).max() <= 1e-3 * scale, shape
    # the quantization error itself (the median step: a router near-tie flipped by it moves
    # one step's logits far beyond the error that caused it)
    err = np.median(np.abs(quant - full).max(-1)) / scale
    print(f"{shape} {bits}-bit: median step's max logit error {err:.2e} of the largest logit")
    assert 0 < err < (0.02 if bits == 8 else 0.15), shape


def test_cache_bytes_per_token_are_as_computed(checkpoint):
    shape, path = checkpoint
    T = 97
    tokens = mx.array(np.random.RandomState(1).randint(2, 96, size=(1, T)).astype(np.int32))
    held = {}
    for bits in (None, 8, 4):
        model = mlx_deepseek.load_model(path, dtype="bfloat16", kv_bits=bits)
        args = model.args
        body, rope = args.head_dim - args.qk_rope_head_dim, args.qk_rope_head_dim
        cache = model.make_cache()
        model(tokens, cache)
        g = model.kv_group_size if bits else None
        row = latent_bytes_per_token(body, rope, mx.bfloat16, bits, g)
        total = 0
        for i, c in enumerate(cache):
            ratio = args.compress_ratio(i)
            if ratio:
                assert c.compressed.nbytes == (T // ratio) * row
                total += c.compressed.nbytes
        held[bits] = total
        # the preflight's estimate differs from full precision by exactly these rows
        for context in (T, 4096, 131072):
            grown = args.cache_bytes(context, 2, bits) - args.cache_bytes(context, 2)
            want = sum(
                (context // args.compress_ratio(i)) * (row - (body + rope) * 2)
                for i in range(args.num_hidden_layers + args.num_nextn_predict_layers)
                if args.compress_ratio(i)
            )
            assert grown == want
    assert held[4] < held[8] < held[None]
    weights, need = loading.estimate_memory(model.args, {}, mx.bfloat16, 131072, kv_bits=4)
    assert need == model.args.cache_bytes(131072, 2, 4)


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("v4kv-mtp")
    hf = build_v4(
        "mixed",
        seed=3,
        head_dim=72,
        partial_rotary_factor=8 / 72,
        layer_types=[SLIDING, CSA, HCA],
        compress_rates={CSA: 4, HCA: 128},
    )
    src = save_v4(hf, root / "src")
    write_official(src, root / "official", quantize=False, mtp_seed=13, mtp_ratio=4)
    return root / "official"


@pytest.mark.parametrize("bits", [8, 4])
def test_mtp_drafting_with_kv_bits_equals_plain_greedy(mtp_checkpoint, bits):
    model = mlx_deepseek.load_model(mtp_checkpoint, kv_bits=bits)
    assert len(model.mtp) == 1
    prompt = mx.array([5, 9, 33, 60, 7, 8, 11, 40, 41, 42, 3, 17])
    opts = StepOptions(sampler=greedy, logits_processors=[], max_tokens=30)
    plain_cache = model.make_cache()
    plain = [s.token for s in decode_steps(model, prompt, plain_cache, opts)]
    spec_cache = model.make_cache()
    assert isinstance(spec_cache.mtp[0].compressed, QuantizedRows)
    decoder = MTPDecoder(2)
    spec = [s.token for s in decoder(model, prompt, spec_cache, opts)]
    assert spec == plain
    assert decoder.stats.drafted > 0
    # both caches hold the same rows after the rollbacks (up to a rounding that moved a
    # value across a quantization step: prefill chunks and decode steps round differently)
    for a, b in zip(plain_cache, spec_cache, strict=True):
        if a.compressed is not None and a.compressed.end:
            assert a.compressed.end == b.compressed.end
            x, y = np.array(a.compressed.dense()), np.array(b.compressed.dense())
            assert np.abs(x - y).max() <= (0.01 if bits == 8 else 0.15) * np.abs(x).max()


def test_to_quantized_is_mlx_lms_kv_bits(mtp_checkpoint):
    from mlx_lm.generate import generate_step

    model = mlx_deepseek.load_model(mtp_checkpoint)
    prompt = mx.array([5, 9, 33, 60, 7, 8, 11, 40, 41, 42, 3, 17, 19, 23])
    cache = model.make_cache()
    model(prompt[None], cache)
    layer = next(c for c in cache if c.compressed is not None and c.compressed.end)
    floats = np.array(layer.compressed.all())
    q8 = layer.to_quantized(64, 8)
    assert q8.to_quantized(64, 8) is q8  # mlx-lm calls it every step
    assert isinstance(q8.compressed, QuantizedRows) and q8.offset == layer.offset
    back = np.array(q8.compressed.dense())
    body = floats.shape[-1] - layer.rope
    np.testing.assert_array_equal(back[..., body:], floats[..., body:])  # RoPE part as it was
    assert np.abs(back - floats).max() < 0.02 * np.abs(floats).max()
    q4 = q8.to_quantized(64, 4)  # another precision: converted
    assert q4.compressed.bits == 4 and q4.compressed.end == q8.compressed.end
    assert q4.compressed.nbytes < q8.compressed.nbytes < layer.compressed.nbytes
    with pytest.raises(DeepSeekError, match="kv_group_size=128 does not divide"):
        layer.to_quantized(128, 8)
    # mlx-lm's generation with kv_bits: the caches end up quantized, the tokens come
    cache = model.make_cache()
    steps = generate_step(
        prompt, model, max_tokens=8, prompt_cache=cache, kv_bits=8, quantized_kv_start=0
    )
    tokens = [int(t) for t, _ in steps]
    assert len(tokens) == 8
    assert all(isinstance(c.compressed, QuantizedRows) for c in cache if c.ratio)


def test_a_width_mlx_cannot_group_is_refused_in_one_line(tmp_path):
    save_v4(build_v4("mixed", seed=1), tmp_path)  # head_dim 32, rope 8: 24 channels
    with pytest.raises(DeepSeekError) as e:
        mlx_deepseek.load_model(tmp_path, kv_bits=8)
    assert "head_dim - qk_rope_head_dim=24" in str(e.value) and "\n" not in str(e.value)
    assert mlx_deepseek.load_model(tmp_path).kv_bits is None  # without kv_bits it loads


@pytest.mark.parametrize("bits", [None, 8])
def test_server_serves_v4_with_kv_bits_without_keeping_its_caches(bits, caplog, tmp_path):
    """The server's prefix cache slices caches by position; V4's (bounded windows, compressor
    state) cannot be cut back to any prefix, so they are not kept (storing one used to fail
    the engine step that finished a request)."""
    from mlx_deepseek.serve.engine import Engine
    from mlx_deepseek.serve.sampler import GenParams

    save_v4(build_v4("mixed", seed=2, **SHAPES["mixed"]), tmp_path)
    model = mlx_deepseek.load_model(tmp_path, kv_bits=bits)
    first = [5, 9, 33, 60, 7, 8, 11, 40, 41, 42, 3, 17, 19, 23, 4, 6, 8, 10, 12]
    second = first + [50, 51, 52, 53, 54]
    with Engine(model, max_batch=2) as engine:
        list(engine.submit(first, GenParams(max_tokens=4)))
        events = list(engine.submit(second, GenParams(max_tokens=6)))
        stats = engine.stats()
    assert "engine step failed" not in caplog.text
    assert stats["kv_bits"] == bits and stats["prefix_cache"]["entries"] == 0
    assert events[-1].finish is not None and events[-1].error is None
    with Engine(model, max_batch=2, prefix_cache_bytes=0) as fresh:
        again = list(fresh.submit(second, GenParams(max_tokens=6)))
    assert [e.token for e in events] == [e.token for e in again]
