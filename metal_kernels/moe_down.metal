// Body of the fused down projection + routing-weighted combine for mx.fast.metal_kernel.
//   y[t, d] = sum_j scores[t, j] * (Wd[inds[t, j], d] . h[t, j])
//           + sum_j (Wsd[d, j * I : (j + 1) * I] . h[t, TOPK + j])
// summed per token in that fixed order (routed slots, then shared slots) into fp32 per-lane
// partials, then one simd_sum: deterministic, no atomics. The shared down projection
// [D, NSH * I] is read in place, slot j using columns j * I .. (j + 1) * I.
// Inputs: h [NT, TOPK + NSH, I] float32; inds [NT, TOPK] uint32; scores [NT, TOPK] float32;
// wd, sd, bd: routed down [E, D, ...]; swd, ssd, sbd: shared down [D, ...] (any routed tensors
// when NSH == 0: never read); in MODE / SMODE 1 (mxfp4) bd (sbd) are the scales again, never
// read. Output y [NT, D] T.
// Template: T, S, SS, BITS, GS, MODE, SBITS, SGS, SMODE, D, I, TOPK, NSH, NT, ROWS.
// Grid (32 * ceil(D / ROWS), 1, 1), threadgroup (64, 1, 1): ROWS output rows per simdgroup.
const uint lane = thread_index_in_simdgroup;
const int row0 = int(thread_position_in_grid.x / 32) * ROWS;
const int slots = TOPK + NSH;
float acc[NT * ROWS] = {0.0f};
mdsk_qmat<S> m[1];
m[0].w_row = I * BITS / 32;
m[0].g_row = I / GS;
for (int t = 0; t < NT; t++) {
  for (int j = 0; j < TOPK; j++) {
    const ulong e = inds[t * TOPK + j];
    m[0].w = wd + e * D * (I * BITS / 32);
    m[0].scales = sd + e * D * (I / GS);
    m[0].biases = bd + e * D * (I / GS);
    const device float* hv = h + (ulong(t) * slots + j) * I;
    mdsk_qmv_accumulate<float, S, BITS, GS, MODE, I, 1, ROWS, 1>(
        m, row0, D, hv, I, scores[t * TOPK + j], lane, acc + t * ROWS);
  }
}
mdsk_qmat<SS> sm[1];
sm[0].w_row = NSH * I * SBITS / 32;
sm[0].g_row = NSH * I / SGS;
for (int j = 0; j < NSH; j++) {
  sm[0].w = swd + ulong(j) * I * SBITS / 32;
  sm[0].scales = ssd + ulong(j) * I / SGS;
  sm[0].biases = sbd + ulong(j) * I / SGS;
  mdsk_qmv_accumulate<float, SS, SBITS, SGS, SMODE, I, 1, ROWS, NT>(
      sm, row0, D, h + ulong(TOPK + j) * I, ulong(slots) * I, 1.0f, lane, acc);
}
mdsk_simd_sum_all<NT * ROWS>(acc);
if (lane == 0) {
  for (int t = 0; t < NT; t++) {
    for (int r = 0; r < ROWS && row0 + r < D; r++) {
      y[ulong(t) * D + row0 + r] = T(acc[t * ROWS + r]);
    }
  }
}
