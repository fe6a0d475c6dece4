// Body of the fused MLA latent preparation for mx.fast.metal_kernel: one token's
// kv_a_proj_with_mqa output [RANK + ROPE] becomes the cached pair
//   c[t] = kv_a_layernorm(kv[t, :RANK])          (mx.fast.rms_norm's maths)
//   k[t] = rope(T(kv[t, RANK:] * mscale), pos)   (RoPE.__call__'s maths, traditional pairs)
// at position pos = iparams[0] + t % iparams[1] (cache offset, tokens per sequence).
// Inputs: kv [NT, RANK + ROPE] T; w [RANK] T; freqs [ROPE / 2] float32;
// fparams [2] float32 (eps, mscale); iparams [2] int32 (offset, L).
// Outputs: c [NT, RANK] T, k [NT, ROPE] T. Template: T, RANK, ROPE, NTH (and QR).
// When the wrapper defines MDSK_QNORM as 1, the same token's q LoRA activation is normed too
// (q_a_layernorm, the same eps): inputs qa [NT, QR] T, wq [QR] T; output qn [NT, QR] T.
// Grid (NTH, NT, 1), threadgroup (NTH, 1, 1): one threadgroup per token.
const uint tid = thread_position_in_threadgroup.x;
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const int t = int(threadgroup_position_in_grid.y);
const device T* src = kv + ulong(t) * (RANK + ROPE);
threadgroup float partial[32];
float ss = 0.0f;
for (int i = int(tid); i < RANK; i += NTH) {
  const float v = float(src[i]);
  ss += v * v;
}
const float total = mdsk_tg_sum(ss, partial, sg, lane, NTH / 32);
const float inv = metal::precise::rsqrt(total / float(RANK) + fparams[0]);
for (int i = int(tid); i < RANK; i += NTH) {
  c[ulong(t) * RANK + i] = T(float(w[i]) * float(T(float(src[i]) * inv)));
}
const float mscale = float(T(fparams[1]));
const float pos = float(iparams[0] + t % iparams[1]);
for (int p = int(tid); p < ROPE / 2; p += NTH) {
  const float x0 = float(T(float(src[RANK + 2 * p]) * mscale));
  const float x1 = float(T(float(src[RANK + 2 * p + 1]) * mscale));
  const float2 r = mdsk_rope_pair(x0, x1, pos, freqs[p]);
  k[ulong(t) * ROPE + 2 * p] = T(r.x);
  k[ulong(t) * ROPE + 2 * p + 1] = T(r.y);
}
#if MDSK_QNORM
const device T* qsrc = qa + ulong(t) * QR;
float qss = 0.0f;
for (int i = int(tid); i < QR; i += NTH) {
  const float v = float(qsrc[i]);
  qss += v * v;
}
const float qinv = metal::precise::rsqrt(
    mdsk_tg_sum(qss, partial, sg, lane, NTH / 32) / float(QR) + fparams[0]);
for (int i = int(tid); i < QR; i += NTH) {
  qn[ulong(t) * QR + i] = T(float(wq[i]) * float(T(float(qsrc[i]) * qinv)));
}
#endif
