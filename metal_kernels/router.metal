// Body of the fused MoE router for mx.fast.metal_kernel: everything moe.route() does after the
// router matmul, for one token per threadgroup, in one dispatch.
//   scores = softmax(logits) (SCORING 0) or sigmoid(logits) (SCORING 1); choice = scores + bias
//   METHOD 1 (group_limited_greedy) / 2 (noaux_tc) with NG > 1: keep the TG groups of highest
//     group score (max / sum of the two best choices in the group), the others' experts drop out
//   inds = the TOPK best choices (highest first; ties: lowest index); w = scores[inds],
//   normalised and scaled exactly as moe.route() does.
// Inputs: logits [NT, E] float32; bias [E] float32 (read only when HAS_BIAS);
// rsf [1] float32 (routed_scaling_factor). Outputs: inds [NT, TOPK] uint32, w [NT, TOPK] float32.
// Template: E, TOPK, NG, TG, METHOD, SCORING, NORM, HAS_BIAS, NTH.
// Grid (NTH, NT, 1), threadgroup (NTH, 1, 1).
const uint tid = thread_position_in_threadgroup.x;
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint nsg = NTH / 32;
const int t = int(threadgroup_position_in_grid.y);
const device float* z = logits + ulong(t) * E;
threadgroup float score[E];
threadgroup float choice[E];
threadgroup float partial[32];
threadgroup float best_v[32];
threadgroup int best_i[32];
threadgroup int chosen[TOPK];
threadgroup float group_score[NG];

// scores (MLX's softmax: max, exp(x - max), sum, divide; all in float32)
float zmax = MDSK_NEG;
if (SCORING == 0) {
  for (int e = int(tid); e < E; e += NTH) {
    zmax = max(zmax, z[e]);
  }
  zmax = simd_max(zmax);
  if (lane == 0) {
    best_v[sg] = zmax;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  zmax = best_v[0];
  for (uint i = 1; i < nsg; i++) {
    zmax = max(zmax, best_v[i]);
  }
}
float zsum = 0.0f;
for (int e = int(tid); e < E; e += NTH) {
  const float s = SCORING == 0 ? metal::exp(z[e] - zmax) : 1.0f / (1.0f + metal::exp(-z[e]));
  score[e] = s;
  zsum += s;
}
if (SCORING == 0) {
  zsum = mdsk_tg_sum(zsum, partial, sg, lane, nsg);
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int e = int(tid); e < E; e += NTH) {
  const float s = SCORING == 0 ? score[e] / zsum : score[e];
  score[e] = s;
  choice[e] = HAS_BIAS ? s + bias[e] : s;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// group-limited selection: one thread per group scores it, then ranks it among the groups
if (METHOD != 0 && NG > 1) {
  const int gsize = E / NG;
  if (int(tid) < NG) {
    float b1 = MDSK_NEG, b2 = MDSK_NEG;
    for (int e = int(tid) * gsize; e < (int(tid) + 1) * gsize; e++) {
      const float c = choice[e];
      if (c > b1) {
        b2 = b1;
        b1 = c;
      } else if (c > b2) {
        b2 = c;
      }
    }
    group_score[tid] = METHOD == 1 ? b1 : b1 + b2;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  // drop the NG - TG lowest groups (ties: the later group drops first)
  bool drop_me = false;
  if (int(tid) < NG) {
    int below = 0;
    const float gs = group_score[tid];
    for (int g = 0; g < NG; g++) {
      const float o = group_score[g];
      below += (o < gs || (o == gs && g > int(tid))) ? 1 : 0;
    }
    drop_me = below < NG - TG;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (drop_me) {
    for (int e = int(tid) * gsize; e < (int(tid) + 1) * gsize; e++) {
      choice[e] = MDSK_NEG;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// top-k: TOPK rounds of a threadgroup argmax over the experts not chosen yet
for (int j = 0; j < TOPK; j++) {
  float bv = MDSK_NEG;
  int bi = E;
  for (int e = int(tid); e < E; e += NTH) {
    bool taken = false;
    for (int i = 0; i < j; i++) {
      taken = taken || chosen[i] == e;
    }
    const float c = choice[e];
    if (!taken && (bi == E || c > bv)) {
      bv = c;
      bi = e;
    }
  }
  const float sv = simd_max(bv);
  const int si = simd_min(bv == sv ? bi : E);
  if (lane == 0) {
    best_v[sg] = sv;
    best_i[sg] = si;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {
    float v = best_v[0];
    int idx = best_i[0];
    for (uint i = 1; i < nsg; i++) {
      if (best_v[i] > v || (best_v[i] == v && best_i[i] < idx)) {
        v = best_v[i];
        idx = best_i[i];
      }
    }
    chosen[j] = idx;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// routing weights, in moe.route()'s order of operations
if (tid == 0) {
  float total = 0.0f;
  for (int j = 0; j < TOPK; j++) {
    total += score[chosen[j]];
  }
  const bool normalise = NORM && (SCORING == 1 || TOPK > 1);
  for (int j = 0; j < TOPK; j++) {
    float v = score[chosen[j]];
    if (normalise) {
      v = v / (total + 1e-20f);
    }
    if (SCORING == 1 || !normalise) {
      v = v * rsf[0];
    }
    inds[ulong(t) * TOPK + j] = uint(chosen[j]);
    w[ulong(t) * TOPK + j] = v;
  }
}
