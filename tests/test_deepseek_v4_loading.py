"""DeepSeek V4 checkpoints: DeepSeek's own layout (FP8 e4m3 linears, FP4 experts as MLX mxfp4
bit for bit) and its config fields, the MTP module and self-speculative decoding, `info`."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import rel_err
from tiny_chat import build_tokenizer, vocab_size
from typer.testing import CliRunner
from v4_checkpoints import (
    FP4_VALUES,
    boundary_ties,
    build_v4,
    encode_fp4,
    save_v4,
    transformers_oracle,
    v4_logits,
    write_official,
)

import mlx_deepseek
from mlx_deepseek.cli import app
from mlx_deepseek.decoding import StepOptions, decode_steps
from mlx_deepseek.errors import CheckpointError, ConfigError
from mlx_deepseek.models import model_args
from mlx_deepseek.models.tiny import V4_FLASH
from mlx_deepseek.models.v4_config import CSA, HCA, SLIDING
from mlx_deepseek.models.v4_weights import dequantize_fp8, fp4_as_mxfp4
from mlx_deepseek.sampling import greedy
from mlx_deepseek.speculative import MTPDecoder

TOKENS = np.random.RandomState(3).randint(0, 96, size=(2, 40))
NEXT = np.random.RandomState(4).randint(0, 96, size=(2, 40))


# ---- the number formats ---------------------------------------------------------------------


def test_fp4_experts_are_mlx_mxfp4_bit_for_bit():
    rng = np.random.default_rng(0)
    R, C = 6, 96
    codes = rng.integers(0, 16, size=(R, C)).astype(np.uint8)
    codes[0, :16] = np.arange(16)  # every code, -0 included
    exps = rng.integers(-30, 30, size=(R, C // 32))
    exps[1, 0], exps[1, 1] = -127, 125  # the ends of the exponent range (6 * 2**125 fits)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8).view(np.int8)
    scales = (exps + 127).astype(np.uint8)
    want = FP4_VALUES[codes] * np.repeat(np.ldexp(1.0, exps), 32, axis=1)
    w, s = fp4_as_mxfp4("x", mx.array(packed), mx.array(scales))
    got = mx.dequantize(w, s, group_size=32, bits=4, mode="mxfp4", dtype=mx.float32)
    np.testing.assert_array_equal(np.array(got), want.astype(np.float32))
    # a float matmul on the mxfp4 weights equals one on the decoded floats
    x = rng.standard_normal((3, C)).astype(np.float32)
    w, s = w[2:], s[2:]  # (rows of ordinary scales, so that the products stay finite)
    qmm = mx.quantized_matmul(
        mx.array(x), w, s, transpose=True, group_size=32, bits=4, mode="mxfp4"
    )
    np.testing.assert_allclose(np.array(qmm), x @ want[2:].T, rtol=1e-5)


def test_fp8_blocks_decode_exactly():
    rng = np.random.default_rng(1)
    R, C = 200, 130  # partial edge blocks in both directions
    codes = rng.integers(0, 256, size=(R, C)).astype(np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # e4m3 NaN patterns
    exps = rng.integers(-20, 20, size=(2, 2))
    got = dequantize_fp8("w", mx.array(codes), mx.array((exps + 127).astype(np.uint8)), block=128)
    values = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    scale = np.repeat(np.repeat(np.ldexp(1.0, exps), 128, 0), 128, 1)[:R, :C]
    np.testing.assert_array_equal(np.array(got), (values * scale).astype(np.float32))
    with pytest.raises(CheckpointError, match=r"w\.scale has shape \(1, 2\).*needs \(2, 2\)"):
        dequantize_fp8("w", mx.array(codes), mx.array(np.zeros((1, 2), np.uint8)), block=128)


# ---- DeepSeek's layout ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A quantized DeepSeek-layout checkpoint (hidden 160: FP8 blocks with partial edges)
    with a compressed sparse MTP layer, and transformers over the values it encodes."""
    root = tmp_path_factory.mktemp("v4-official")
    hf = build_v4("mixed", seed=3, hidden_size=160, moe_intermediate_size=32)
    src = save_v4(hf, root / "src")
    values = write_official(src, root / "official", quantize=True, mtp_seed=11, mtp_ratio=4)
    oracle = transformers_oracle(src, values, root / "oracle")
    model = mlx_deepseek.load_model(root / "official", dtype="float32")
    return root, src, values, oracle, model


def test_official_fp8_fp4_checkpoint_equals_its_float32_decoding(official):
    root, _, _, oracle, model = official
    config = json.loads((root / "official" / "config.json").read_text())
    assert "compress_ratios" in config and "layer_types" not in config
    assert boundary_ties(oracle, TOKENS) == []
    got = np.array(model(mx.array(TOKENS)))
    assert rel_err(got, v4_logits(oracle, TOKENS)) < 1e-4
    # the routed experts stay 4-bit (MLX mxfp4), the FP8 linears are decoded
    experts = model.layers[0].ffn.switch_mlp.gate_proj
    assert experts.mode == "mxfp4" and experts.weight.dtype == mx.uint32
    assert model.layers[0].attn.wq_a.weight.dtype == mx.float32
    assert len(model.mtp) == 1 and model.mtp[0].attn.kind == CSA


@pytest.mark.parametrize("ratio", [0, 4, 8])
def test_mtp_module_equals_transformers_block(tmp_path, ratio):
    """MTP: e_proj(enorm(embed(t))) + h_proj(hnorm(h)) per copy, a V4 block, its own collapse
    and norm, the shared head; the block, collapse and head computed by transformers' own
    layers (an extra last layer whose input is replaced by the MTP input)."""
    hf = build_v4("mixed", seed=5)
    src = save_v4(hf, tmp_path / "src")
    values = write_official(src, tmp_path / "official", False, mtp_seed=7, mtp_ratio=ratio)
    model = mlx_deepseek.load_model(tmp_path / "official", dtype="float32")
    oracle = transformers_oracle(src, values, tmp_path / "oracle", mtp_ratio=ratio)

    h = model.model.hidden(mx.array(TOKENS))  # the main model's copies [B, L, hc, D]
    ours = np.array(model.mtp_forward(h, mx.array(NEXT))[0])

    def rms(x, w):
        return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)

    e = rms(values["embed.weight"][NEXT], values["mtp.0.enorm.weight"])
    e = e @ values["mtp.0.e_proj.weight"].T
    hh = rms(np.array(h), values["mtp.0.hnorm.weight"]) @ values["mtp.0.h_proj.weight"].T
    x = torch.from_numpy((e[:, :, None] + hh).astype(np.float32))
    last = oracle.model.layers[-1]
    last.register_forward_pre_hook(lambda mod, args, kwargs: ((x,), kwargs), with_kwargs=True)
    assert boundary_ties(oracle, NEXT) == []
    assert rel_err(ours, v4_logits(oracle, NEXT)) < 1e-4


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A DeepSeek-layout V4 checkpoint with an MTP layer and a real tokenizer."""
    root = tmp_path_factory.mktemp("v4-chat")
    build_tokenizer(root / "official")
    vocab = vocab_size(root / "official")
    # ratios DeepSeek ships (transformers' config class, which the tokenizer loading runs,
    # reads compress_ratios of 0, 4 and 128 only)
    hf = build_v4("hca_first", seed=9, vocab_size=vocab, compress_rates={CSA: 4, HCA: 128})
    with torch.no_grad():  # greedy never stops early: EOS / think rows of the head are zero
        for token in (1, vocab - 2, vocab - 1):
            hf.lm_head.weight[token] = 0.0
    src = save_v4(hf, root / "src")
    write_official(src, root / "official", quantize=False, mtp_seed=13, mtp_ratio=4)
    return root / "official"


@pytest.mark.parametrize("draft_tokens", [1, 3])
def test_mtp_drafting_greedy_equals_plain_greedy(chat_checkpoint, draft_tokens):
    model, tokenizer = mlx_deepseek.load(chat_checkpoint)
    assert model.args.model_type == "deepseek_v4" and len(model.mtp) == 1
    prompt = "Tell me a story about a dragon who lived in a cave."
    plain = mlx_deepseek.generate(model, tokenizer, prompt, max_tokens=30, mtp=False)
    responses = list(
        mlx_deepseek.stream_generate(
            model, tokenizer, prompt, max_tokens=30, mtp=True, draft_tokens=draft_tokens
        )
    )
    assert "".join(r.text for r in responses) == plain
    assert len(responses) == 30 and responses[-1].tokens_per_step is not None


def test_partly_accepted_drafts_roll_the_cache_back_exactly(chat_checkpoint):
    """Drafts right except at some positions: the output is the plain one, and the cache
    after it continues exactly as plain decoding's (windows, compressed rows and compressor
    state all rolled back)."""
    model = mlx_deepseek.load_model(chat_checkpoint)
    prompt = [5, 9, 33, 100, 7, 8, 11, 40, 41, 42]
    n = 40
    opts = StepOptions(sampler=greedy, logits_processors=[], max_tokens=n)
    plain_cache = model.make_cache()
    plain = [s.token for s in decode_steps(model, mx.array(prompt), plain_cache, opts)]
    sequence = prompt + plain
    wrong = {14, 15, 22, 23, 24, 31}
    spec_cache = model.make_cache()
    vocab = model.args.vocab_size

    def mtp_logits(h, depth=0):  # the MTP entry at offset-1 pairs with token offset
        pos = spec_cache.mtp[0].offset + 1
        token = sequence[pos] if pos < len(sequence) else 0
        token = (token + 1) % vocab if pos in wrong else token
        return mx.where(mx.arange(vocab) == token, 10.0, -10.0)[None, None]

    model.mtp_logits = mtp_logits
    try:
        decoder = MTPDecoder(3)
        spec = [s.token for s in decoder(model, mx.array(prompt), spec_cache, opts)]
    finally:
        del model.mtp_logits
    assert spec == plain
    assert 0 < decoder.stats.accepted < decoder.stats.drafted
    # both caches hold the same tokens: the next step gives the same logits
    for cache in (plain_cache, spec_cache):
        while cache.length > len(prompt) + n - 1:
            for c in cache:
                c.trim(1)
    assert plain_cache.length == spec_cache.length
    nxt = mx.array([[plain[-1]]])
    a, b = np.array(model(nxt, plain_cache)), np.array(model(nxt, spec_cache))
    assert rel_err(b, a) < 1e-5


# ---- config ---------------------------------------------------------------------------------


def test_official_and_transformers_configs_read_the_same(official):
    root, src, _, _, _ = official
    ours = model_args(json.loads((root / "official" / "config.json").read_text()))
    theirs = model_args(json.loads((src / "config.json").read_text()))
    n = theirs.num_hidden_layers
    assert ours.layer_types[:n] == theirs.layer_types[:n] == [SLIDING, CSA, HCA, CSA]
    assert ours.layer_type(n) == CSA  # the MTP entry of compress_ratios
    assert ours.hash_layers == theirs.hash_layers == [True, True, False, False]
    assert ours.compress_rates == theirs.compress_rates == {CSA: 4, HCA: 8}
    for name in ("qk_rope_head_dim", "rope_theta", "compress_rope_theta"):
        assert getattr(ours, name) == getattr(theirs, name)
    assert ours.rope_scaling["factor"] == theirs.rope_scaling["factor"] == 4.0


def test_flash_config_cache_values_per_token():
    args = model_args(V4_FLASH)
    kinds = [args.layer_type(i) for i in range(43)]
    assert kinds.count(CSA) == 21 and kinds.count(HCA) == 20 and args.layer_type(43) == SLIDING
    # 21 layers x (512/4 + 128/4) + 20 x 512/128 (families-2026.md: ~3,440)
    assert args.cache_values_per_token() == 21 * 160 + 20 * 4 == 3440


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_key_value_heads": 2}, "num_key_value_heads=2 must be 1"),
        ({"o_groups": 5}, "o_groups=5 must divide num_attention_heads=64"),
        ({"scoring_func": "tanh"}, "scoring_func='tanh' must be one of"),
        ({"compress_ratios": [0, 4]}, "compress_ratios has 2 entries, num_hidden_layers=43"),
        ({"compress_ratios": [0, 64, 128] * 15}, "mixes heavy ratios \\[64, 128\\]"),
        ({"layer_types": ["sliding_attention"] * 42 + ["full"]}, "entry 'full' is not one of"),
        ({"num_hash_layers": -1}, "num_hash_layers=-1 must be an integer >= 0"),
        ({"head_dim": 0}, "head_dim=0 must be a positive integer"),
        ({"rope_scaling": {"type": "yarn"}}, "rope_scaling is missing 'factor'"),
    ],
)
def test_bad_config_names_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        model_args({**V4_FLASH, **change}, source="v4/config.json")


# ---- loading errors and info ----------------------------------------------------------------


def test_missing_expert_and_bad_fp4_scale_are_named(official, tmp_path):
    from safetensors.torch import load_file, save_file

    root = official[0]
    tensors = load_file(str(root / "official" / "model.safetensors"))
    config = (root / "official" / "config.json").read_text()
    for name, bad in [
        ("layers.2.ffn.experts.5.w2.weight", None),
        ("layers.1.ffn.experts.0.w1.scale", torch.zeros((32, 4), dtype=torch.uint8)),
    ]:
        broken = dict(tensors)
        if bad is None:
            broken.pop(name)
            broken.pop(name.replace("weight", "scale"))
        else:
            broken[name] = bad
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        save_file(broken, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(config)
        with pytest.raises(CheckpointError, match=name.rsplit(".", 1)[0].replace(".", r"\.")):
            mlx_deepseek.load_model(folder)


def test_fp4_values_round_trip_through_the_encoder():
    w = np.random.default_rng(5).standard_normal((4, 64)).astype(np.float32)
    packed, scale, decoded = encode_fp4(w)
    ours = mx.dequantize(
        *fp4_as_mxfp4("w", mx.array(packed.numpy()), mx.array(scale.view(torch.uint8).numpy())),
        group_size=32,
        bits=4,
        mode="mxfp4",
        dtype=mx.float32,
    )
    np.testing.assert_array_equal(np.array(ours), decoded.astype(np.float32))
    assert np.abs(decoded - w).max() < 0.5 * np.abs(w).max()  # a real (coarse) encoding


def test_info_prints_the_cache_bytes_per_token(official, tmp_path):
    root = official[0]
    result = CliRunner().invoke(app, ["info", str(root / "official")], standalone_mode=False)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    # head_dim 32, index_head_dim 16: two sparse layers (1/4) and one heavy layer (1/8)
    values = 2 * (32 // 4 + 16 // 4) + 32 // 8
    assert f"{2 * values:,} B ({values:,} values" in text
    assert "deepseek_v4" in text and "MTP layers in checkpoint 1" in text
    # Flash's shape, from its config alone (one stand-in tensor)
    from safetensors.numpy import save_file

    (tmp_path / "config.json").write_text(json.dumps(V4_FLASH))
    save_file({"norm.weight": np.ones(4096, np.float32)}, str(tmp_path / "model.safetensors"))
    result = CliRunner().invoke(app, ["info", str(tmp_path)], standalone_mode=False)
    text = " ".join(result.output.split())
    assert "6,880 B (3,440 values" in text
    assert "21 compressed sparse (1/4, top 512), 20 heavily compressed (1/128)" in text


def test_memory_preflight_counts_v4_weights_and_cache(official):
    from safetensors.torch import load_file

    from mlx_deepseek.loading import estimate_memory, read_tensors
    from mlx_deepseek.models import sanitize_weights

    root = official[0]
    path = root / "official"
    args = model_args(json.loads((path / "config.json").read_text()))
    weights, cache = estimate_memory(
        args, sanitize_weights(args, read_tensors(path)), mx.bfloat16, 4096
    )
    # from the file: FP8 weights become bf16 (2 bytes a value, their scales go), FP4 experts
    # stay as they are (a byte per two values + a scale byte per 32), floats in bf16, the
    # hash table int32
    want = 0
    for name, t in load_file(str(path / "model.safetensors")).items():
        if t.dtype == torch.float8_e4m3fn:
            want += 2 * t.numel()
        elif t.dtype == torch.int8 or (t.dtype == torch.float8_e8m0fnu and ".experts." in name):
            want += t.numel()
        elif t.dtype in (torch.float32, torch.bfloat16):
            want += 2 * t.numel()
        elif name.endswith("tid2eid"):
            want += 4 * t.numel()
    assert weights == want
    # 5 layers (4 + MTP) of 8-row windows x 32, sparse rows 1/4 (32 + 16), heavy 1/8 (32)
    values = 5 * 8 * 32 + 3 * (4096 // 4) * (32 + 16) + (4096 // 8) * 32
    assert cache == 2 * values
    # Flash: 44 windows of 128 x 512; 21 sparse layers, 20 heavy ones
    flash = model_args(V4_FLASH)
    values = 44 * 128 * 512 + 21 * 1024 * (512 + 128) + 20 * 32 * 512
    assert flash.cache_bytes(4096) == 2 * values
