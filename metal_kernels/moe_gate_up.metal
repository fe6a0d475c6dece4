// Body of the fused gate+up+SwiGLU kernel for mx.fast.metal_kernel (MLX writes the signature).
//   routed slot (t, j), e = inds[t, j]:  h[t, j, i] = swiglu(x[t] . Wg[e, i], x[t] . Wu[e, i])
//   shared slot j, every token t:        h[t, TOPK + j, i] from rows j * I + i of the shared MLP
// swiglu(g, u) = silu(g) * u, or with lim[0] > 0 silu(min(g, lim)) * clamp(u, -lim, lim).
// The shared MLP of width NSH * I is read in place as NSH experts of width I; its slots handle
// all NT tokens at once so each shared weight is read once.
// Inputs: x [NT, D] T; inds [NT, TOPK] uint32; wg, sg, bg, wu, su, bu: routed gate/up
// [E, I, ...]; swg, ssg, sbg, swu, ssu, sbu: shared gate/up [NSH * I, ...] (any routed tensors
// when NSH == 0: never read); lim [1] float32. In MODE / SMODE 1 (mxfp4) there are no biases:
// bg / bu (sbg / sbu) are the scales again, never read. Output h [NT, TOPK + NSH, I] float32.
// Template: T, S, SS (routed / shared scale dtypes), BITS, GS, MODE, SBITS, SGS, SMODE, D, I,
// TOPK, NSH, NT, ROWS.
// Grid (32 * ceil(I / ROWS), NT * TOPK + NSH, 1), threadgroup (64, 1, 1): each simdgroup
// computes ROWS gate rows and the same ROWS up rows for one slot, sharing the loads of x.
const uint lane = thread_index_in_simdgroup;
const int row0 = int(thread_position_in_grid.x / 32) * ROWS;
const int item = int(threadgroup_position_in_grid.y);
const int slots = TOPK + NSH;
const float limit = lim[0];
if (item < NT * TOPK) {
  const int t = item / TOPK;
  const ulong e = inds[item];
  mdsk_qmat<S> m[2];
  m[0].w = wg + e * I * (D * BITS / 32);
  m[0].scales = sg + e * I * (D / GS);
  m[0].biases = bg + e * I * (D / GS);
  m[1].w = wu + e * I * (D * BITS / 32);
  m[1].scales = su + e * I * (D / GS);
  m[1].biases = bu + e * I * (D / GS);
  m[0].w_row = m[1].w_row = D * BITS / 32;
  m[0].g_row = m[1].g_row = D / GS;
  float acc[2 * ROWS] = {0.0f};
  mdsk_qmv_accumulate<T, S, BITS, GS, MODE, D, 2, ROWS, 1>(
      m, row0, I, x + t * D, D, 1.0f, lane, acc);
  mdsk_simd_sum_all<2 * ROWS>(acc);
  if (lane == 0) {
    device float* out = h + (ulong(t) * slots + item % TOPK) * I;
    for (int r = 0; r < ROWS && row0 + r < I; r++) {
      out[row0 + r] = mdsk_swiglu(acc[r], acc[ROWS + r], limit);
    }
  }
} else {
  const ulong j = ulong(item - NT * TOPK);
  mdsk_qmat<SS> m[2];
  m[0].w = swg + j * I * (D * SBITS / 32);
  m[0].scales = ssg + j * I * (D / SGS);
  m[0].biases = sbg + j * I * (D / SGS);
  m[1].w = swu + j * I * (D * SBITS / 32);
  m[1].scales = ssu + j * I * (D / SGS);
  m[1].biases = sbu + j * I * (D / SGS);
  m[0].w_row = m[1].w_row = D * SBITS / 32;
  m[0].g_row = m[1].g_row = D / SGS;
  float acc[NT * 2 * ROWS] = {0.0f};
  mdsk_qmv_accumulate<T, SS, SBITS, SGS, SMODE, D, 2, ROWS, NT>(
      m, row0, I, x, D, 1.0f, lane, acc);
  mdsk_simd_sum_all<NT * 2 * ROWS>(acc);
  if (lane == 0) {
    for (int t = 0; t < NT; t++) {
      device float* out = h + (ulong(t) * slots + TOPK + j) * I;
      for (int r = 0; r < ROWS && row0 + r < I; r++) {
        out[row0 + r] = mdsk_swiglu(acc[t * 2 * ROWS + r], acc[t * 2 * ROWS + ROWS + r], limit);
      }
    }
  }
}
