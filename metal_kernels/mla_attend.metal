// Body of MLA absorbed decode attention, pass 1 of 2, for mx.fast.metal_kernel: for a chunk of
// cached keys and a group of QG queries (query q = head h * L + token l), the softmax partials
//   s[q, k] = scale * (q_lat[q] . c_kv[k] + rope(q_pe[q]) . k_pe[k]), keys k <= pos0 + l only
//   ml[q] = (m, sum_k exp(s - m)),  o[q, :] = sum_k exp(s[q, k] - m) c_kv[k, :]
// with an online softmax over tiles of BK keys (flash-decoding). mla_combine.metal merges the
// chunks. q_pe is roped here (RoPE.__call__'s maths: T(x * mscale), then MLX's rope, in T).
// Inputs: q_lat [B, H, L, RANK] T (embed_q's output); qb [B, L, H, NOPE + ROPE] T (q_proj's
// output: q_pe is its last ROPE channels per head); c_kv [B, 1, S, RANK], k_pe [B, 1, S, ROPE]
// (the cache, any strides); freqs [ROPE / 2] float32; fparams [2] float32 (scale, mscale);
// iparams [2] int32 (pos0 = position of token 0 = S - L, chunk length).
// Outputs: o [B, NB, H * L, RANK] float32; ml [B, NB, H * L, 2] float32.
// Template: T, H, L, RANK, ROPE, NOPE, QG, BK (= 32), NTH (= 32 * simdgroups).
// Grid (NTH * ceil(H * L / QG), NB, B), threadgroup (NTH, 1, 1).
const uint tid = thread_position_in_threadgroup.x;
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const int NSG = NTH / 32;
const int Q = H * L;
const int QD = RANK + ROPE;
const int DPT = (RANK + NTH - 1) / NTH;  // accumulator dims per thread
const int q0 = int(threadgroup_position_in_grid.x) * QG;
const int chunk = int(threadgroup_position_in_grid.y);
const int NB = int(threadgroups_per_grid.y);
const ulong b = threadgroup_position_in_grid.z;
const int S = c_kv_shape[2];
const int pos0 = iparams[0];
const int k_begin = chunk * iparams[1];
const int k_end = min(S, k_begin + iparams[1]);
const device T* ckv = c_kv + b * c_kv_strides[0];
const device T* kpe = k_pe + b * k_pe_strides[0];
const ulong ck_row = c_kv_strides[2];
const ulong kp_row = k_pe_strides[2];

threadgroup float qs[QG * QD];
threadgroup float sc[QG * BK];
threadgroup float corr[QG];
threadgroup float m_run[QG];
threadgroup float l_run[QG];

// the group's queries: the latent part as given, the rope part roped
const float mscale = float(T(fparams[1]));
for (int i = int(tid); i < QG * QD; i += NTH) {
  const int j = i / QD, d = i % QD, qi = q0 + j;
  float v = 0.0f;
  if (qi < Q) {
    const int h = qi / L, l = qi % L;
    if (d < RANK) {
      v = float(q_lat[((b * H + h) * L + l) * RANK + d]);
    } else {
      const int p = (d - RANK) / 2;
      const device T* qp = qb + ((b * L + l) * H + h) * (NOPE + ROPE) + NOPE;
      const float x0 = float(T(float(qp[2 * p]) * mscale));
      const float x1 = float(T(float(qp[2 * p + 1]) * mscale));
      const float2 r = mdsk_rope_pair(x0, x1, float(pos0 + l), freqs[p]);
      v = float(T((d - RANK) % 2 == 0 ? r.x : r.y));
    }
  }
  qs[i] = v;
}
for (int j = int(tid); j < QG; j += NTH) {
  m_run[j] = MDSK_NEG;
  l_run[j] = 0.0f;
}
float acc[QG * DPT];
for (int i = 0; i < QG * DPT; i++) {
  acc[i] = 0.0f;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

for (int k0 = k_begin; k0 < k_end; k0 += BK) {
  // scores: each simdgroup takes BK / NSG keys, its lanes split the key's channels
  for (int kk = 0; kk < BK / NSG; kk++) {
    const int kl = int(sg) * (BK / NSG) + kk;
    const int key = k0 + kl;
    float part[QG];
    for (int j = 0; j < QG; j++) {
      part[j] = 0.0f;
    }
    if (key < k_end) {
      for (int d = int(lane); d < RANK; d += 32) {
        const float kv = float(ckv[key * ck_row + d]);
        for (int j = 0; j < QG; j++) {
          part[j] += qs[j * QD + d] * kv;
        }
      }
      for (int d = int(lane); d < ROPE; d += 32) {
        const float kv = float(kpe[key * kp_row + d]);
        for (int j = 0; j < QG; j++) {
          part[j] += qs[j * QD + RANK + d] * kv;
        }
      }
    }
    for (int j = 0; j < QG; j++) {
      const float s = simd_sum(part[j]);
      if (lane == 0) {
        const int qi = q0 + j;
        const bool visible = key < k_end && qi < Q && key <= pos0 + qi % L;
        sc[j * BK + kl] = visible ? s * fparams[0] : MDSK_NEG;
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  // online softmax: simdgroup g updates queries g, g + NSG, ...; lane = key in the tile
  for (int j = int(sg); j < QG; j += NSG) {
    const float s = sc[j * BK + lane];
    const float m_old = m_run[j];
    const float m_new = max(m_old, simd_max(s));
    const float p = MDSK_IS_NEG(s) ? 0.0f : metal::exp(s - m_new);
    const float alpha = MDSK_IS_NEG(m_old) ? 0.0f : metal::exp(m_old - m_new);
    const float psum = simd_sum(p);
    sc[j * BK + lane] = p;
    if (lane == 0) {
      corr[j] = alpha;
      l_run[j] = l_run[j] * alpha + psum;
      m_run[j] = m_new;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  // o[q, d] = o[q, d] * alpha + sum_k p[q, k] c_kv[k, d]: each thread owns DPT channels
  const int kn = min(BK, k_end - k0);
  for (int jd = 0; jd < DPT; jd++) {
    const int d = int(tid) + jd * NTH;
    if (d < RANK) {
      for (int j = 0; j < QG; j++) {
        acc[j * DPT + jd] *= corr[j];
      }
      for (int kl = 0; kl < kn; kl++) {
        const float v = float(ckv[(k0 + kl) * ck_row + d]);
        for (int j = 0; j < QG; j++) {
          acc[j * DPT + jd] += sc[j * BK + kl] * v;
        }
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);  // sc, corr are rewritten by the next tile
}

const ulong base = (b * NB + chunk) * Q;
for (int jd = 0; jd < DPT; jd++) {
  const int d = int(tid) + jd * NTH;
  for (int j = 0; j < QG; j++) {
    if (d < RANK && q0 + j < Q) {
      o[(base + q0 + j) * RANK + d] = acc[j * DPT + jd];
    }
  }
}
for (int j = int(tid); j < QG; j += NTH) {
  if (q0 + j < Q) {
    ml[(base + q0 + j) * 2] = m_run[j];
    ml[(base + q0 + j) * 2 + 1] = l_run[j];
  }
}
