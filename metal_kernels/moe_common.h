// Helpers shared by the fused MoE kernels (moe_gate_up.metal, moe_down.metal), passed to
// mx.fast.metal_kernel as `header`. On a Mac MLX prepends its own utils.h, so every name here
// starts with mdsk_ to stay clear of it. Nothing here relies on MLX's headers.
//
// Weights are MLX's quantized formats: a row of K values is K * BITS / 32 uint32 words, value
// i of the row in bits [BITS * i, BITS * (i + 1)) of the row's little-endian bit stream (4-bit:
// low nibble first). MODE 0 (MLX's "affine"): scales and biases per group of GS values,
// w = scale * q + bias. MODE 1 (MLX's "mxfp4", DeepSeek V4's routed experts): BITS 4, GS 32,
// q an FP4 e2m1 code (sign, 2 exponent bits, 1 mantissa bit) and one E8M0 scale byte
// 2^(s - 127) per group, no bias: w = e2m1(q) * 2^(s - 127).
#include <metal_simdgroup>
#include <metal_stdlib>

// Values one lane handles per step: a whole number of uint32 words that never straddles a
// group (GS = 32, 64 or 128 is a multiple of it).
template <int BITS>
struct mdsk_pack {
  enum {
    VALUES = (BITS == 2 || BITS == 3 || BITS == 5) ? 32 : (BITS == 8 ? 8 : 16),
    WORDS = VALUES * BITS / 32,
    // 2, 4 and 8 bits never straddle a 16-bit half word: mask the half word and pre-divide x
    // instead of shifting each value (the idea of MLX's qmv kernels).
    MASKED = (BITS == 2 || BITS == 4 || BITS == 8),
    PER_HALF = 16 / BITS,
  };
};

// One quantized matrix as a simdgroup reads it; pointers are at column 0 of row 0 of the rows
// the caller means (an expert's rows, or a slice of the shared MLP).
template <typename S>
struct mdsk_qmat {
  const device uint32_t* w;
  const device S* scales;
  const device S* biases;
  ulong w_row; // uint32 words from one row to the next
  ulong g_row; // groups from one row to the next
};

// Loads a lane's VALUES inputs as float into xt and returns their sum (for the bias term).
// On the affine masked path value i is divided by 2^(BITS * (i % PER_HALF)), exact in fp32.
template <int BITS, int MODE, typename X>
inline float mdsk_load_x(const device X* x, thread float* xt) {
  typedef mdsk_pack<BITS> P;
  float sum = 0.0f;
  for (int i = 0; i < P::VALUES; i++) {
    float v = float(x[i]);
    sum += v;
    xt[i] = (MODE == 0 && P::MASKED) ? v / float(1u << (BITS * (i % P::PER_HALF))) : v;
  }
  return sum;
}

// An FP4 e2m1 code -> its value: magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 the sign.
inline float mdsk_e2m1(uint c) {
  const uint m = c & 7u;
  const float v = m < 2u ? 0.5f * float(m) : 0.5f * float((2u | (m & 1u)) << ((m >> 1) - 1u));
  return (c & 8u) ? -v : v;
}

// An E8M0 scale byte -> 2^(s - 127) (s = 0: 2^-127, a float32 subnormal).
inline float mdsk_e8m0(uint s) {
  return s == 0u ? 5.877471754111438e-39f : as_type<float>(s << 23);
}

// sum_i xt[i] * e2m1(q_i) over one lane's packed 4-bit words.
template <int BITS>
inline float mdsk_fp4dot(const thread uint32_t* w, const thread float* xt) {
  typedef mdsk_pack<BITS> P;
  float acc = 0.0f;
  for (int i = 0; i < P::VALUES; i++) {
    acc += xt[i] * mdsk_e2m1((w[i / 8] >> (4 * (i % 8))) & 0xfu);
  }
  return acc;
}

// sum_i xt[i] * q_i over one lane's packed words (xt as mdsk_load_x leaves it).
template <int BITS>
inline float mdsk_qdot(const thread uint32_t* w, const thread float* xt) {
  typedef mdsk_pack<BITS> P;
  const uint mask = (1u << BITS) - 1u;
  float acc = 0.0f;
  if (P::MASKED) {
    for (int j = 0; j < 2 * P::WORDS; j++) {
      const uint half_word = (w[j / 2] >> (16 * (j % 2))) & 0xffffu;
      for (int i = 0; i < P::PER_HALF; i++) {
        acc += xt[j * P::PER_HALF + i] * float(half_word & (mask << (BITS * i)));
      }
    }
  } else {
    for (int i = 0; i < P::VALUES; i++) {
      const int bit = i * BITS, k = bit / 32, off = bit % 32;
      uint v = w[k] >> off;
      if (off + BITS > 32) {
        v |= w[k + 1] << (32 - off);
      }
      acc += xt[i] * float(v & mask);
    }
  }
  return acc;
}

// Adds weight * (row . x_v) partial sums of this lane to acc[v * NM * NR + m * NR + r] for
// NV input vectors (x + v * x_stride) and rows row0 .. row0 + NR - 1 of NM matrices.
// Rows past nrows - 1 repeat the last row (results to be dropped), so nothing reads out of
// bounds. Lanes stride over K in steps of 32 * VALUES, so any K that is a multiple of GS works;
// a lane whose last step falls past K simply stops early.
template <typename X, typename S, int BITS, int GS, int MODE, int K, int NM, int NR, int NV>
inline void mdsk_qmv_accumulate(const thread mdsk_qmat<S>* mats, int row0, int nrows,
                                const device X* x, ulong x_stride, float weight, uint lane,
                                thread float* acc) {
  typedef mdsk_pack<BITS> P;
  for (int k = int(lane) * P::VALUES; k < K; k += 32 * P::VALUES) {
    uint32_t wq[NM * NR][P::WORDS];
    float scale[NM * NR];
    float bias[NM * NR];
    for (int m = 0; m < NM; m++) {
      for (int r = 0; r < NR; r++) {
        const ulong row = ulong(min(row0 + r, nrows - 1));
        const device uint32_t* wp = mats[m].w + row * mats[m].w_row + k * BITS / 32;
        for (int i = 0; i < P::WORDS; i++) {
          wq[m * NR + r][i] = wp[i];
        }
        const ulong g = row * mats[m].g_row + k / GS;
        const float s = float(mats[m].scales[g]);
        scale[m * NR + r] = MODE == 1 ? mdsk_e8m0(uint(s)) : s;
        bias[m * NR + r] = MODE == 1 ? 0.0f : float(mats[m].biases[g]);
      }
    }
    for (int v = 0; v < NV; v++) {
      float xt[P::VALUES];
      const float xsum = mdsk_load_x<BITS, MODE>(x + v * x_stride + k, xt);
      for (int q = 0; q < NM * NR; q++) {
        const float dot = MODE == 1 ? mdsk_fp4dot<BITS>(wq[q], xt) : mdsk_qdot<BITS>(wq[q], xt);
        acc[v * NM * NR + q] += weight * (scale[q] * dot + bias[q] * xsum);
      }
    }
  }
}

template <int N>
inline void mdsk_simd_sum_all(thread float* acc) {
  for (int i = 0; i < N; i++) {
    acc[i] = simd_sum(acc[i]);
  }
}

inline float mdsk_silu(float g) {
  return g / (1.0f + metal::exp(-g));
}

// silu(gate) * up; with limit > 0 (DeepSeek V4's clamped SwiGLU) silu(min(gate, limit)) *
// clamp(up, -limit, limit).
inline float mdsk_swiglu(float gate, float up, float limit) {
  if (limit > 0.0f) {
    gate = metal::min(gate, limit);
    up = metal::clamp(up, -limit, limit);
  }
  return mdsk_silu(gate) * up;
}
