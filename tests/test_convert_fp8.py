"""FP8 e4m3 block dequantisation and raw tensor reads, against NumPy / torch references."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_deepseek.convert.fp8 import dequantize_fp8, scale_shape
from mlx_deepseek.convert.reader import SourceCheckpoint
from safetensors.torch import save_file


def e4m3_to_float32(bits: np.ndarray) -> np.ndarray:
    """A transcription of the OCP e4m3fn format: bias 7, subnormals, 0x7f/0xff are NaN."""
    b = bits.astype(np.int32)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 0x7
    value = np.where(exp == 0, man / 8.0 * 2.0**-6, (1.0 + man / 8.0) * 2.0 ** (exp - 7.0))
    value = np.where((exp == 15) & (man == 7), np.nan, value)
    return (sign * value).astype(np.float32)


def reference_dequant(bits: np.ndarray, scale_inv: np.ndarray, block) -> np.ndarray:
    br, bc = block
    full = np.repeat(np.repeat(scale_inv, br, axis=0), bc, axis=1)[: bits.shape[0], : bits.shape[1]]
    return e4m3_to_float32(bits) * full.astype(np.float32)


def fp8_bytes(w: np.ndarray) -> np.ndarray:
    return torch.from_numpy(w).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def test_every_e4m3_bit_pattern_decodes_like_the_format():
    bits = np.arange(256, dtype=np.uint8)
    ours = np.array(dequantize_fp8(mx.array(bits.reshape(16, 16)), mx.ones((1, 1))))
    ref = e4m3_to_float32(bits).reshape(16, 16)
    torch_ref = torch.from_numpy(bits).view(torch.float8_e4m3fn).float().numpy().reshape(16, 16)
    assert np.array_equal(ours, ref, equal_nan=True)
    assert np.array_equal(ref, torch_ref, equal_nan=True)
    assert np.isnan(ours.reshape(-1)[0x7F]) and ours.reshape(-1)[1] == 2.0**-9


@pytest.mark.parametrize(
    "shape,block", [((300, 200), (128, 128)), ((80, 64), (32, 48)), ((128, 256), (128, 128))]
)
def test_block_dequant_is_exact_with_partial_edge_blocks(shape, block):
    rng = np.random.default_rng(0)
    bits = fp8_bytes(rng.standard_normal(shape).astype(np.float32) * 100)
    scale = rng.uniform(1e-4, 3.0, scale_shape(shape, block)).astype(np.float32)
    ours = np.array(dequantize_fp8(mx.array(bits), mx.array(scale), block))
    ref = reference_dequant(bits, scale, block)
    assert ours.dtype == np.float32 and ours.shape == shape
    assert np.array_equal(ours, ref)  # bit-exact: one float32 multiply per element
    # each block really got its own scale (the last, partial block included)
    r0, c0 = (scale.shape[0] - 1) * block[0], (scale.shape[1] - 1) * block[1]
    assert np.array_equal(ours[r0:, c0:], e4m3_to_float32(bits[r0:, c0:]) * scale[-1, -1])


def test_row_chunks_starting_on_block_rows_match_the_whole():
    rng = np.random.default_rng(1)
    bits = fp8_bytes(rng.standard_normal((300, 200)).astype(np.float32))
    scale = rng.uniform(0.5, 2.0, (3, 2)).astype(np.float32)
    whole = np.array(dequantize_fp8(mx.array(bits), mx.array(scale)))
    part = np.array(dequantize_fp8(mx.array(bits[128:300]), mx.array(scale[1:3])))
    assert np.array_equal(part, whole[128:300])


def test_wrong_scale_shape_is_refused():
    with pytest.raises(ValueError, match="scale_inv has shape"):
        dequantize_fp8(mx.zeros((300, 200), mx.uint8), mx.ones((2, 2)))


def test_reader_returns_fp8_and_bf16_bytes_unchanged(tmp_path):
    rng = np.random.default_rng(2)
    w = torch.from_numpy(rng.standard_normal((70, 33)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal((5, 7)).astype(np.float32)).to(torch.bfloat16)
    (tmp_path / "config.json").write_text("{}")
    save_file({"w": w.to(torch.float8_e4m3fn), "b": b, "f": w}, str(tmp_path / "model.safetensors"))
    with SourceCheckpoint(tmp_path) as src:
        info = src.tensors["w"]
        assert (info.dtype, info.shape) == ("F8_E4M3", (70, 33))
        got = np.array(src.read(info))
        assert got.dtype == np.uint8
        assert np.array_equal(got, w.to(torch.float8_e4m3fn).view(torch.uint8).numpy())
        rows = np.array(src.read(info, 10, 42))
        assert np.array_equal(rows, got[10:42])
        bf = src.read(src.tensors["b"])
        assert bf.dtype == mx.bfloat16
        assert np.array_equal(np.array(bf.astype(mx.float32)), b.float().numpy())
        assert np.array_equal(np.array(src.read(src.tensors["f"])), w.numpy())
