// Body of the fused residual add + RMSNorm for mx.fast.metal_kernel (MLX writes the signature).
//   h[t] = x[t] + r[t]                                    (rounded to T, the residual stream)
//   y[t] = w * T(h[t] * rsqrt(mean(h[t]^2) + eps))        (mx.fast.rms_norm's exact maths)
// Inputs: x, r [NT, D] T; w [D] T; eps [1] float32. Outputs: h, y [NT, D] T, and when the
// wrapper defines MDSK_Y32 as 1, y32 [NT, D] float32 = float(y) (what a float32 router takes).
// Template: T, D, NTH (threads per threadgroup, a multiple of 32).
// Grid (NTH, NT, 1), threadgroup (NTH, 1, 1): one threadgroup per token.
const uint tid = thread_position_in_threadgroup.x;
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const ulong row = ulong(threadgroup_position_in_grid.y) * D;
threadgroup float partial[32];
float ss = 0.0f;
for (int i = int(tid); i < D; i += NTH) {
  const T hv = T(float(x[row + i]) + float(r[row + i]));
  h[row + i] = hv;
  ss += float(hv) * float(hv);
}
const float total = mdsk_tg_sum(ss, partial, sg, lane, NTH / 32);
const float inv = metal::precise::rsqrt(total / float(D) + eps[0]);
for (int i = int(tid); i < D; i += NTH) {
  const T hv = T(float(x[row + i]) + float(r[row + i]));
  const T yv = T(float(w[i]) * float(T(float(hv) * inv)));
  y[row + i] = yv;
#if MDSK_Y32
  y32[row + i] = float(yv);
#endif
}
