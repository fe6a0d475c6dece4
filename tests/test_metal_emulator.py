"""The CPU emulator of Metal (tests/metal_emulator) on small kernels: language features,
SIMD-group functions, barriers, MLX's signature and grid rules, and the errors it reports."""

import sys

import mlx.core as mx
import numpy as np
import pytest
from metal_emulator import MetalEmulatorError, metal_kernel
from metal_emulator.signature import Arg, TemplateArg, write_signature

import mlx_deepseek  # noqa: F401  (OpenBLAS before mlx.core)

pytestmark = [
    pytest.mark.skipif(
        sys.platform == "darwin", reason="on macOS the kernels run on the real GPU instead"
    ),
    pytest.mark.emulator,
]


def run1(source, inputs, n, grid=None, tg=(32, 1, 1), dtype=np.float32, **kw):
    k = metal_kernel("t", [f"in{i}" for i in range(len(inputs))], ["out"], source)
    return k(
        inputs=inputs,
        output_shapes=[(n,)],
        output_dtypes=[dtype],
        grid=grid or (n, 1, 1),
        threadgroup=tg,
        **kw,
    )[0]


def test_signature_is_written_as_mlx_writes_it():
    body = "out[0] = a[0] + b + c_shape[0] + c[thread_position_in_grid.x];"
    text = write_signature(
        "custom_kernel_k",
        "// header\n",
        body,
        [Arg("a", "float16_t", 1, 4), Arg("b", "float", 0, 1), Arg("c", "uint32_t", 2, 64)],
        [Arg("out", "float")],
        [TemplateArg("T", "typename", "float"), TemplateArg("N", "int", "3")],
    )
    assert text == (
        "// header\n"
        "template <typename T, int N>\n"
        "[[kernel]] void custom_kernel_k(\n"
        "  const constant float16_t* a [[buffer(0)]],\n"
        "  const constant float& b [[buffer(1)]],\n"
        "  const device uint32_t* c [[buffer(2)]],\n"
        "  const constant int* c_shape [[buffer(3)]],\n"
        "  device float* out [[buffer(4)]],\n"
        "  uint3 thread_position_in_grid [[thread_position_in_grid]]) {\n"
        f"{body}\n}}\n"
    )


def test_template_scalar_constant_and_half_math():
    src = """
        uint i = thread_position_in_grid.x;
        if (i >= uint(in0_shape[0])) { return; }
        out[i] = T(metal::exp(float(in0[i])) * scale[0] + offset);
    """
    x = np.linspace(-2, 2, 50).astype(np.float16)
    k = metal_kernel("tpl", ["in0", "scale", "offset"], ["out"], src)
    (out,) = k(
        inputs=[x, np.array([2.0], np.float32), np.float32(0.5)],
        output_shapes=[(64,)],
        output_dtypes=[np.float16],
        grid=(64, 1, 1),
        threadgroup=(32, 1, 1),
        template=[("T", np.float16)],
        check_nan=False,
    )
    np.testing.assert_array_equal(
        out[:50], (np.exp(x.astype(np.float32)) * 2 + 0.5).astype(np.float16)
    )
    assert np.isnan(out[50:]).all()  # never written: the NaN fill shows


def test_rounding_to_half_and_bfloat16_is_to_nearest_even():
    x = np.random.default_rng(0).normal(size=256).astype(np.float32) * 1000
    x[:4] = [1.0 + 2**-8, 1.0 + 3 * 2**-8, 65519.0, -3.0e38]  # ties and overflow
    src = "uint i = thread_position_in_grid.x; out[i] = float(half(in0[i]));"
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(run1(src, [x], 256, check_nan=False), want)
    src = "uint i = thread_position_in_grid.x; out[i] = bfloat16_t(in0[i]);"
    got = run1(src, [mx.array(x)], 256, dtype=mx.bfloat16)
    assert got.dtype == mx.bfloat16
    np.testing.assert_array_equal(
        np.array(got.astype(mx.float32)),
        np.array(mx.array(x).astype(mx.bfloat16).astype(mx.float32)),
    )


def test_vectors_constructors_swizzles_and_as_type():
    src = """
        uint i = thread_position_in_grid.x;
        float4 v = float4(float2(in0[i], 1.0f), 2.0f, 3.0f);
        half4 h = half4(v);
        float4 w = float4(h.wzyx) + float4(0.5f);
        bool4 gt = bool4(w > float4(2.0f));
        uint bits = as_type<uint>(w.w);
        out[i] = select(0.0f, w.x + w.w, all(gt.xy)) + float(bits == as_type<uint>(w.w)) * 100.0f;
    """
    x = np.arange(8, dtype=np.float32) * 4.1
    # w = (3.5, 2.5, 1.5, half(x) + 0.5): w.xy > 2, so out = 3.5 + w.w + 100
    expect = 3.5 + (x.astype(np.float16).astype(np.float32) + 0.5) + 100
    np.testing.assert_array_equal(run1(src, [x], 8, tg=(8, 1, 1)), expect)


def test_simd_functions_against_numpy():
    src = """
        uint i = thread_position_in_grid.x;
        float v = in0[i];
        float r = 0.0f;
        switch (OP) {
          case 0: r = simd_sum(v); break;
          case 1: r = simd_max(v); break;
          case 2: r = simd_prefix_inclusive_sum(v); break;
          case 3: r = simd_prefix_exclusive_sum(v); break;
          case 4: r = simd_shuffle_down(v, 3); break;
          case 5: r = simd_shuffle_up(v, 5); break;
          case 6: r = simd_shuffle_xor(v, 6); break;
          case 7: r = simd_broadcast(v, 7); break;
          case 8: r = quad_sum(v); break;
          case 9: r = float(popcount(uint(simd_vote::vote_t(simd_ballot(v > 40.0f)))))
                      + 100.0f * float(simd_is_first());
        }
        out[i] = r;
    """
    x = np.random.default_rng(1).permutation(64).astype(np.float32)
    k = metal_kernel("simd", ["in0"], ["out"], src)
    lanes = x.reshape(2, 32)
    idx = np.arange(32)
    expect = {
        0: np.repeat(lanes.sum(1), 32),
        1: np.repeat(lanes.max(1), 32),
        2: np.cumsum(lanes, 1).ravel(),
        3: (np.cumsum(lanes, 1) - lanes).ravel(),
        4: lanes[:, np.where(idx + 3 < 32, idx + 3, idx)].ravel(),
        5: lanes[:, np.where(idx - 5 >= 0, idx - 5, idx)].ravel(),
        6: lanes[:, idx ^ 6].ravel(),
        7: np.repeat(lanes[:, 7], 32),
        8: np.repeat(x.reshape(16, 4).sum(1), 4),
        9: np.repeat((lanes > 40).sum(1), 32) + 100.0 * (np.arange(64) % 32 == 0),
    }
    for op, want in expect.items():
        (got,) = k(
            inputs=[x],
            output_shapes=[(64,)],
            output_dtypes=[np.float32],
            grid=(64, 1, 1),
            threadgroup=(64, 1, 1),
            template=[("OP", op)],
        )
        np.testing.assert_array_equal(got, want, err_msg=f"op {op}")


def test_lanes_that_return_drop_out_of_simd_functions():
    src = """
        uint i = thread_position_in_grid.x;
        if (i % 32 >= 20) { out[i] = -1.0f; return; }
        out[i] = simd_sum(in0[i]);
    """
    x = np.arange(64, dtype=np.float32)
    want = np.where(np.arange(64) % 32 < 20, np.repeat([x[:20].sum(), x[32:52].sum()], 32), -1)
    np.testing.assert_array_equal(run1(src, [x], 64, tg=(64, 1, 1)), want)


REDUCE = """
    uint t = thread_index_in_threadgroup;
    uint n = threads_per_threadgroup.x;
    threadgroup float part[64];
    part[t] = in0[thread_position_in_grid.x];
    {BARRIER}
    if (t == 0) {
      float s = 0.0f;
      for (uint j = 0; j < n; j++) { s += part[j]; }
      part[63] = s;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[thread_position_in_grid.x] = part[63] + float(threadgroup_position_in_grid.x * 1000);
"""


def test_threadgroup_memory_barriers_and_a_partial_last_threadgroup():
    x = np.ones(150, np.float32)
    src = REDUCE.replace("{BARRIER}", "threadgroup_barrier(mem_flags::mem_threadgroup);")
    got = run1(src, [x], 150, tg=(63, 1, 1))
    # 150 threads in groups of 63: 63, 63 and a last, smaller group of 24 (dispatch_threads)
    want = np.concatenate([np.full(63, 63.0), np.full(63, 1063.0), np.full(24, 2024.0)])
    np.testing.assert_array_equal(got, want)


def test_a_missing_barrier_shows_as_nan():
    src = REDUCE.replace("{BARRIER}", "")
    with pytest.raises(MetalEmulatorError, match="NaN.*missing threadgroup_barrier"):
        run1(src, [np.ones(64, np.float32)], 64, tg=(32, 1, 1))


# kernels that break the threadgroup's or the SIMD-group's lockstep
DIVERGENT_BARRIERS = """
        uint i = thread_position_in_grid.x;
        if (i < 10) { threadgroup_barrier(mem_flags::mem_threadgroup); }
        else { threadgroup_barrier(mem_flags::mem_threadgroup); }
        out[i] = 1.0f;
"""
BARRIER_SKIPPED_BY_RETURNING = """
        uint i = thread_position_in_grid.x;
        if (i >= 20) { return; }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[i] = 1.0f;
"""
LANES_AT_DIFFERENT_SIMD_FUNCTIONS = """
        uint i = thread_position_in_grid.x;
        out[i] = i < 16 ? simd_sum(in0[i]) : simd_max(in0[i]);
"""
DEADLOCK = """
        uint i = thread_position_in_grid.x;
        if (i % 32 < 4) { out[i] = simd_sum(in0[i]); }
        else { threadgroup_barrier(mem_flags::mem_threadgroup); out[i] = 0.0f; }
"""


@pytest.mark.parametrize(
    "src,match,threads,tg",
    [
        (DIVERGENT_BARRIERS, "divergent barriers.*t.metal:3.*t.metal:4", 32, (32, 1, 1)),
        (BARRIER_SKIPPED_BY_RETURNING, "every thread of a threadgroup must reach", 32, (32, 1, 1)),
        (LANES_AT_DIFFERENT_SIMD_FUNCTIONS, "different SIMD-group functions.*simd_sum.*simd_max",
         32, (32, 1, 1)),
        (DEADLOCK, "deadlock.*simd_sum.*threadgroup_barrier", 64, (64, 1, 1)),
    ],
    ids=["divergent barriers", "a barrier skipped by returning", "different SIMD functions",
         "deadlock"],
)  # fmt: skip
def test_lockstep_errors_are_reported(src, match, threads, tg):
    with pytest.raises(MetalEmulatorError, match=match):
        run1(src, [np.ones(threads, np.float32)], threads, tg=tg)


def test_threadgroup_memory_over_32_kb_is_reported():
    src = """
        threadgroup float a[8192];
        threadgroup float b[8];
        uint i = thread_position_in_grid.x;
        a[i] = 1.0f; b[i] = 2.0f;
        out[i] = a[i] + b[i];
    """
    with pytest.raises(MetalEmulatorError, match="'b'.*32768 bytes"):
        run1(src, [np.ones(32, np.float32)], 32)


def test_out_of_bounds_reads_are_reported():
    src = "uint i = thread_position_in_grid.x; out[i] = in0[i + 1];"
    with pytest.raises(MetalEmulatorError, match="input 'in0' accessed out of bounds"):
        run1(src, [np.ones(64, np.float32)], 64)


def test_a_device_pointer_passed_as_a_thread_pointer_does_not_compile():
    header = "inline float first(const thread float* p) { return p[0]; }\n"
    src = "out[thread_position_in_grid.x] = first(in0);"
    k = metal_kernel("as", ["in0"], ["out"], src, header=header)
    with pytest.raises(MetalEmulatorError, match="(?s)does not compile.*address space"):
        k(
            inputs=[np.ones(32, np.float32)],
            output_shapes=[(32,)],
            output_dtypes=[np.float32],
            grid=(32, 1, 1),
            threadgroup=(32, 1, 1),
        )


def test_shape_strides_ndim_and_3d_grid_geometry():
    src = """
        uint3 p = thread_position_in_grid;
        uint idx = p.x + grid_size.x * (p.y + grid_size.y * p.z);
        out[idx] = float(in0_shape[1] * 1000 + in0_strides[0] * 10 + in0_ndim)
                   + float(threadgroup_position_in_grid.z * 100000 + threads_per_threadgroup.y);
    """
    x = np.zeros((3, 7), np.float32)
    got = run1(src, [x], 5 * 3 * 2, grid=(5, 3, 2), tg=(4, 2, 1)).reshape(2, 3, 5)
    tg_y = np.array([2, 2, 1])[:, None]  # rows 0-1 in a full group, row 2 in a partial one
    want = 7000 + 70 + 2 + np.arange(2)[:, None, None] * 100000 + tg_y[None]
    np.testing.assert_array_equal(got, np.broadcast_to(want, (2, 3, 5)))


def test_atomic_outputs():
    src = (
        "atomic_fetch_add_explicit(&out[0], in0[thread_position_in_grid.x], memory_order_relaxed);"
    )
    k = metal_kernel("atom", ["in0"], ["out"], src, atomic_outputs=True)
    (got,) = k(
        inputs=[np.arange(100, dtype=np.float32)],
        output_shapes=[(1,)],
        output_dtypes=[np.float32],
        grid=(100, 1, 1),
        threadgroup=(64, 1, 1),
        init_value=0.0,
    )
    assert got[0] == 4950.0


def test_the_reverse_schedule_runs_threads_in_the_other_order():
    # Thread 31 reads what thread 0 wrote without a barrier: fine forwards, NaN backwards.
    src = """
        threadgroup float s[32];
        uint t = thread_index_in_threadgroup;
        s[t] = 1.0f;
        out[t] = s[0];
    """
    assert (run1(src, [np.ones(32, np.float32)], 32) == 1).all()
    with pytest.raises(MetalEmulatorError, match="NaN"):
        run1(src, [np.ones(32, np.float32)], 32, schedule="reverse")
