// Body of the fused quantized embedding lookup for mx.fast.metal_kernel: what
// nn.QuantizedEmbedding does with three gathers and a dequantize, in one dispatch:
//   y[t, i] = T(scales[tok[t], i / GS] * q(tok[t], i) + biases[tok[t], i / GS])
// and, when the wrapper defines MDSK_NORM as 1, the first layer's RMSNorm of that row too:
//   n[t] = wn * T(y[t] * rsqrt(mean(y[t]^2) + eps))   (mx.fast.rms_norm's maths)
// Inputs: tok [NT] integer; w [V, D * BITS / 32] uint32; scales, biases [V, D / GS] T;
// (MDSK_NORM) wn [D] T, eps [1] float32. Outputs: y [NT, D] T; (MDSK_NORM) n [NT, D] T.
// Template: T, BITS, GS, D, NTH. Grid (NTH, NT, 1), threadgroup (NTH, 1, 1): one per token.
const uint tid = thread_position_in_threadgroup.x;
const int t = int(threadgroup_position_in_grid.y);
const ulong v = ulong(tok[t]);
const device uint32_t* row = w + v * (D * BITS / 32);
float ss = 0.0f;
for (int i = int(tid); i < D; i += NTH) {
  const ulong g = v * (D / GS) + i / GS;
  const float q = float(mdsk_unpack<BITS>(row, i));
  const T yv = T(float(scales[g]) * q + float(biases[g]));
  y[ulong(t) * D + i] = yv;
  ss += float(yv) * float(yv);
}
#if MDSK_NORM
threadgroup float partial[32];
const float total = mdsk_tg_sum(ss, partial, simdgroup_index_in_threadgroup,
                                thread_index_in_simdgroup, NTH / 32);
const float inv = metal::precise::rsqrt(total / float(D) + eps[0]);
for (int i = int(tid); i < D; i += NTH) {
  const ulong g = v * (D / GS) + i / GS;
  const float q = float(mdsk_unpack<BITS>(row, i));
  const T yv = T(float(scales[g]) * q + float(biases[g]));
  n[ulong(t) * D + i] = T(float(wn[i]) * float(T(float(yv) * inv)));
}
#endif
