// Body of MLA absorbed decode attention, pass 2 of 2, for mx.fast.metal_kernel: merges the
// chunks of mla_attend.metal for one head and multiplies by W_uv (unembed_out):
//   lat[l, :] = sum_c exp(m_c - M) o_c[l, :] / sum_c exp(m_c - M) l_c      (float32)
//   UNEMBED 1: y[b, l, h * V + v] = W_uv[h, v, :] . lat[l, :]  (W_uv MLX affine-quantized)
//   UNEMBED 0: y[b, h, l, :] = lat[l, :]                       (MLX multiplies by W_uv)
// Inputs: o [B, NB, H * L, RANK] float32; ml [B, NB, H * L, 2] float32; w [H, V, RANK * BITS
// / 32] uint32, scales, biases [H, V, RANK / GS] S (any arrays when UNEMBED is 0: never read).
// Output: y [B, L, H * V] T (UNEMBED 1) or [B, H, L, RANK] T (UNEMBED 0).
// Template: T, S, H, L, RANK, V, BITS, GS, UNEMBED, NTH. Grid (NTH, H, B), threadgroup (NTH,1,1).
const uint tid = thread_position_in_threadgroup.x;
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const int NSG = NTH / 32;
const int Q = H * L;
const int h = int(threadgroup_position_in_grid.y);
const ulong b = threadgroup_position_in_grid.z;
const int NB = ml_shape[1];
threadgroup float lat[L * RANK];

for (int i = int(tid); i < L * RANK; i += NTH) {
  const int l = i / RANK, d = i % RANK;
  const ulong q = ulong(h * L + l);
  float M = MDSK_NEG;
  for (int c = 0; c < NB; c++) {
    M = max(M, ml[((b * NB + c) * Q + q) * 2]);
  }
  float num = 0.0f, den = 0.0f;
  for (int c = 0; c < NB; c++) {
    const ulong r = (b * NB + c) * Q + q;
    const float mc = ml[r * 2];
    const float wc = MDSK_IS_NEG(mc) ? 0.0f : metal::exp(mc - M);
    num += wc * o[r * RANK + d];
    den += wc * ml[r * 2 + 1];
  }
  const float v = num / den;
  if (UNEMBED) {
    lat[i] = v;
  } else {
    y[((b * H + h) * L + l) * RANK + d] = T(v);
  }
}
if (UNEMBED) {
  typedef mdsk_pack<BITS> P;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const ulong w_row = RANK * BITS / 32, g_row = RANK / GS;
  const device uint32_t* wh = w + ulong(h) * V * w_row;
  const device S* sh = scales + ulong(h) * V * g_row;
  const device S* bh = biases + ulong(h) * V * g_row;
  // simdgroup sg computes rows v0 .. v0 + 3 of this head for every token
  for (int v0 = int(sg) * 4; v0 < V; v0 += NSG * 4) {
    float acc[L * 4];
    for (int i = 0; i < L * 4; i++) {
      acc[i] = 0.0f;
    }
    for (int k = int(lane) * P::VALUES; k < RANK; k += 32 * P::VALUES) {
      uint32_t wq[4][P::WORDS];
      float scale[4];
      float bias[4];
      for (int r = 0; r < 4; r++) {
        const ulong row = ulong(min(v0 + r, V - 1));
        for (int i = 0; i < P::WORDS; i++) {
          wq[r][i] = wh[row * w_row + k * BITS / 32 + i];
        }
        scale[r] = float(sh[row * g_row + k / GS]);
        bias[r] = float(bh[row * g_row + k / GS]);
      }
      for (int l = 0; l < L; l++) {
        float xt[P::VALUES];
        float xsum = 0.0f;
        for (int i = 0; i < P::VALUES; i++) {
          const float v = lat[l * RANK + k + i];
          xsum += v;
          xt[i] = P::MASKED ? v / float(1u << (BITS * (i % P::PER_HALF))) : v;
        }
        for (int r = 0; r < 4; r++) {
          acc[l * 4 + r] += scale[r] * mdsk_qdot<BITS>(wq[r], xt) + bias[r] * xsum;
        }
      }
    }
    for (int i = 0; i < L * 4; i++) {
      acc[i] = simd_sum(acc[i]);
    }
    if (lane == 0) {
      for (int l = 0; l < L; l++) {
        for (int r = 0; r < 4 && v0 + r < V; r++) {
          y[(b * L + l) * (H * V) + h * V + v0 + r] = T(acc[l * 4 + r]);
        }
      }
    }
  }
}
