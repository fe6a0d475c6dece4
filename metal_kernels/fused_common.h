// Helpers shared by the decode "glue" kernels (add+RMSNorm, latent norm+RoPE, embedding,
// router, MLA attention); passed to mx.fast.metal_kernel after moe_common.h as `header`.
// Every name starts with mdsk_ to stay clear of MLX's prepended utils.h.

// Scores of masked keys and "no maximum yet": finite, so fast-math cannot turn them into NaN.
#define MDSK_NEG (-3.0e38f)
#define MDSK_IS_NEG(v) ((v) < -1.0e38f)

// Sum of v over all threads of the threadgroup, in a fixed order (simdgroup 0, 1, ...).
// Every thread must call it at the same point; scratch holds one float per simdgroup.
inline float mdsk_tg_sum(float v, threadgroup float* scratch, uint sg, uint lane, uint nsg) {
  v = simd_sum(v);
  threadgroup_barrier(mem_flags::mem_threadgroup);  // scratch may still be read by a last call
  if (lane == 0) {
    scratch[sg] = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float total = 0.0f;
  for (uint i = 0; i < nsg; i++) {
    total += scratch[i];
  }
  return total;
}

// Value i (0-based) of a row of MLX affine-quantized BITS-bit values, any BITS from 2 to 8.
template <int BITS>
inline uint mdsk_unpack(const device uint32_t* row, int i) {
  const int bit = i * BITS, k = bit / 32, off = bit % 32;
  uint v = row[k] >> off;
  if (off + BITS > 32) {
    v |= row[k + 1] << (32 - off);
  }
  return v & ((1u << BITS) - 1u);
}

// MLX's RoPE (traditional layout: pairs (x0, x1)) of one pair at position pos, with the
// wavelength `freq` (mx.fast.rope's `freqs`); the same float maths and fast cos/sin as MLX.
inline float2 mdsk_rope_pair(float x0, float x1, float pos, float freq) {
  const float theta = pos * (1.0f / freq);
  const float c = metal::fast::cos(theta);
  const float s = metal::fast::sin(theta);
  return float2(x0 * c - x1 * s, x0 * s + x1 * c);
}
