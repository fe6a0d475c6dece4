// The Metal Shading Language subset that the emulator compiles as C++ with clang (>= 17 for
// arithmetic on __bf16). Address spaces are clang address_space attributes, so passing a
// device pointer where a thread pointer is expected fails as it does in Metal; vectors are
// ext_vector_type with MSL-style constructors; SIMD-group functions and barriers are
// rendezvous points among the fibers of runtime.c.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <type_traits>

#include "msl_runtime.h"

#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define thread

typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef _Float16 half;
typedef __bf16 bfloat;
typedef half float16_t; // as MLX's utils.h: generated signatures name these types
typedef bfloat bfloat16_t;

#define MSL_VEC_TYPES(T) \
  typedef T T##2 __attribute__((ext_vector_type(2))); \
  typedef T T##3 __attribute__((ext_vector_type(3))); \
  typedef T T##4 __attribute__((ext_vector_type(4)));
// clang's bool vectors have no swizzles: bool vectors hold 0/1 in `signed char`, a type of
// their own (char vectors use plain char).
typedef signed char msl_bool;
MSL_VEC_TYPES(msl_bool)
typedef msl_bool2 bool2;
typedef msl_bool3 bool3;
typedef msl_bool4 bool4;
MSL_VEC_TYPES(char)
MSL_VEC_TYPES(uchar)
MSL_VEC_TYPES(short)
MSL_VEC_TYPES(ushort)
MSL_VEC_TYPES(int)
MSL_VEC_TYPES(uint)
MSL_VEC_TYPES(long)
MSL_VEC_TYPES(ulong)
MSL_VEC_TYPES(half)
MSL_VEC_TYPES(bfloat)
MSL_VEC_TYPES(float)
#undef MSL_VEC_TYPES

// The call site of a SIMD-group function or barrier, to catch lanes meeting at different ones.
#define MSL_SITE \
  const char *msl_file = __builtin_FILE(), int msl_line = __builtin_LINE(), \
             int msl_col = __builtin_COLUMN()
#define MSL_AT msl_file, msl_line, msl_col

namespace metal {

template <class T, int N>
using vec = T __attribute__((ext_vector_type(N)));

template <class T>
struct msl_vt {
  enum { n = 1, is_vec = 0 };
  typedef T elem;
};
template <class T, int N>
struct msl_vt<T __attribute__((ext_vector_type(N)))> {
  enum { n = N, is_vec = 1 };
  typedef T elem;
};
template <class V>
using msl_if_vec = typename std::enable_if<msl_vt<V>::is_vec, V>::type;

// ---- constructors: float4(a, b, c, d), float4(x), float4(float2, float2), float4(half4) ----
template <class V, class A>
inline void msl_fill(V& v, int& i, A a) {
  typedef typename msl_vt<V>::elem E;
  constexpr bool to_bool = std::is_same<E, msl_bool>::value;
  if constexpr (msl_vt<A>::is_vec) {
    for (int j = 0; j < msl_vt<A>::n; ++j) v[i++] = to_bool ? (E)(a[j] != 0) : (E)a[j];
  } else {
    v[i++] = to_bool ? (E)(a != 0) : (E)a;
  }
}
template <class V, class... A>
inline V msl_make(A... a) {
  typedef typename msl_vt<V>::elem E;
  V v = (V)(E)0;
  if constexpr (sizeof...(A) == 1 && !(msl_vt<A>::is_vec && ...)) {
    ((v = (V)(std::is_same<E, msl_bool>::value ? (E)(a != 0) : (E)a)), ...); // one scalar: splat
  } else if constexpr (sizeof...(A) > 0) {
    static_assert((msl_vt<A>::n + ...) == msl_vt<V>::n, "vector constructor: wrong component count");
    int i = 0;
    (msl_fill(v, i, a), ...);
  }
  return v;
}

template <class T, class U>
inline T as_type(U u) {
  static_assert(sizeof(T) == sizeof(U), "as_type: sizes differ");
  return __builtin_bit_cast(T, u);
}

// ---- numeric_limits ----
template <class T>
struct numeric_limits {
  static_assert(std::is_integral<T>::value, "numeric_limits: unsupported type");
  static constexpr T max() { return std::is_signed<T>::value ? (T)~((T)1 << (8 * sizeof(T) - 1)) : (T)~(T)0; }
  static constexpr T min() { return std::is_signed<T>::value ? (T)((T)1 << (8 * sizeof(T) - 1)) : (T)0; }
  static constexpr T lowest() { return min(); }
};
#define MSL_FLOAT_LIMITS(T, MAX, MIN, EPS) \
  template <> \
  struct numeric_limits<T> { \
    static constexpr T max() { return (T)(MAX); } \
    static constexpr T min() { return (T)(MIN); } \
    static constexpr T lowest() { return (T)(-(MAX)); } \
    static constexpr T epsilon() { return (T)(EPS); } \
    static constexpr T infinity() { return (T)__builtin_huge_valf(); } \
    static constexpr T quiet_NaN() { return (T)__builtin_nanf(""); } \
  };
MSL_FLOAT_LIMITS(float, __FLT_MAX__, __FLT_MIN__, __FLT_EPSILON__)
MSL_FLOAT_LIMITS(half, 65504.0f, 6.103515625e-05f, 0.0009765625f)
MSL_FLOAT_LIMITS(bfloat, 3.38953139e38f, 1.17549435e-38f, 0.0078125f)
#undef MSL_FLOAT_LIMITS

// ---- math: float maths; half and bfloat through float; vectors element by element ----
template <class V, class F>
inline V msl_map(V v, F f) {
  if constexpr (msl_vt<V>::is_vec) {
    V r = v;
    for (int i = 0; i < msl_vt<V>::n; ++i) r[i] = f(v[i]);
    return r;
  } else {
    return f(v);
  }
}
template <class V, class F>
inline V msl_map2(V a, V b, F f) {
  if constexpr (msl_vt<V>::is_vec) {
    V r = a;
    for (int i = 0; i < msl_vt<V>::n; ++i) r[i] = f(a[i], b[i]);
    return r;
  } else {
    return f(a, b);
  }
}

#define MSL_MATH1(name, expr) \
  inline float name(float x) { return expr; } \
  inline half name(half x) { return (half)name((float)x); } \
  inline bfloat name(bfloat x) { return (bfloat)name((float)x); } \
  template <class V, class = msl_if_vec<V>> \
  inline V name(V v) { \
    return msl_map(v, [](typename msl_vt<V>::elem e) { return name(e); }); \
  }
MSL_MATH1(exp, __builtin_expf(x))
MSL_MATH1(exp2, __builtin_exp2f(x))
MSL_MATH1(exp10, __builtin_powf(10.0f, x))
MSL_MATH1(log, __builtin_logf(x))
MSL_MATH1(log2, __builtin_log2f(x))
MSL_MATH1(log10, __builtin_log10f(x))
MSL_MATH1(sqrt, __builtin_sqrtf(x))
MSL_MATH1(rsqrt, 1.0f / __builtin_sqrtf(x))
MSL_MATH1(sin, __builtin_sinf(x))
MSL_MATH1(cos, __builtin_cosf(x))
MSL_MATH1(tan, __builtin_tanf(x))
MSL_MATH1(asin, __builtin_asinf(x))
MSL_MATH1(acos, __builtin_acosf(x))
MSL_MATH1(atan, __builtin_atanf(x))
MSL_MATH1(sinh, __builtin_sinhf(x))
MSL_MATH1(cosh, __builtin_coshf(x))
MSL_MATH1(tanh, __builtin_tanhf(x))
MSL_MATH1(erf, __builtin_erff(x))
MSL_MATH1(floor, __builtin_floorf(x))
MSL_MATH1(ceil, __builtin_ceilf(x))
MSL_MATH1(round, __builtin_roundf(x))
MSL_MATH1(rint, __builtin_rintf(x))
MSL_MATH1(trunc, __builtin_truncf(x))
MSL_MATH1(fabs, __builtin_fabsf(x))
MSL_MATH1(fract, x - __builtin_floorf(x))
MSL_MATH1(saturate, __builtin_fminf(__builtin_fmaxf(x, 0.0f), 1.0f))
MSL_MATH1(sign, x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : x))
#undef MSL_MATH1

#define MSL_MATH2(name, expr) \
  inline float name(float x, float y) { return expr; } \
  inline half name(half x, half y) { return (half)name((float)x, (float)y); } \
  inline bfloat name(bfloat x, bfloat y) { return (bfloat)name((float)x, (float)y); } \
  template <class V, class = msl_if_vec<V>> \
  inline V name(V a, V b) { \
    return msl_map2(a, b, [](auto x, auto y) { return name(x, y); }); \
  }
MSL_MATH2(pow, __builtin_powf(x, y))
MSL_MATH2(powr, __builtin_powf(x, y))
MSL_MATH2(fmin, __builtin_fminf(x, y))
MSL_MATH2(fmax, __builtin_fmaxf(x, y))
MSL_MATH2(fmod, __builtin_fmodf(x, y))
MSL_MATH2(atan2, __builtin_atan2f(x, y))
MSL_MATH2(copysign, __builtin_copysignf(x, y))
MSL_MATH2(step, y < x ? 0.0f : 1.0f)
#undef MSL_MATH2

template <class T>
inline T msl_min1(T a, T b) {
  if constexpr (std::is_integral<T>::value) return a < b ? a : b;
  else return (T)__builtin_fminf((float)a, (float)b);
}
template <class T>
inline T msl_max1(T a, T b) {
  if constexpr (std::is_integral<T>::value) return a > b ? a : b;
  else return (T)__builtin_fmaxf((float)a, (float)b);
}
template <class T>
inline T min(T a, T b) { return msl_map2(a, b, [](auto x, auto y) { return msl_min1(x, y); }); }
template <class T>
inline T max(T a, T b) { return msl_map2(a, b, [](auto x, auto y) { return msl_max1(x, y); }); }
template <class T>
inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T>
inline T abs(T x) {
  return msl_map(x, [](auto e) {
    if constexpr (std::is_integral<decltype(e)>::value) return e < 0 ? (decltype(e))-e : e;
    else return (decltype(e))__builtin_fabsf((float)e);
  });
}
template <class T>
inline T mix(T a, T b, T t) { return a + (b - a) * t; }
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline half fma(half a, half b, half c) { return (half)__builtin_fmaf(a, b, c); }
template <class T>
inline T select(T a, T b, bool c) { return c ? b : a; }
template <class T, int N>
inline vec<T, N> select(vec<T, N> a, vec<T, N> b, vec<msl_bool, N> c) {
  for (int i = 0; i < N; ++i) a[i] = c[i] ? b[i] : a[i];
  return a;
}
inline bool all(bool b) { return b; }
inline bool any(bool b) { return b; }
template <int N>
inline bool all(vec<msl_bool, N> b) {
  for (int i = 0; i < N; ++i) if (!b[i]) return false;
  return true;
}
template <int N>
inline bool any(vec<msl_bool, N> b) {
  for (int i = 0; i < N; ++i) if (b[i]) return true;
  return false;
}
#define MSL_TEST(name, expr) \
  template <class T> \
  inline auto name(T x) { \
    if constexpr (msl_vt<T>::is_vec) { \
      vec<msl_bool, msl_vt<T>::n> r; \
      for (int i = 0; i < msl_vt<T>::n; ++i) r[i] = name(x[i]); \
      return r; \
    } else { \
      float f = (float)x; \
      return (bool)(expr); \
    } \
  }
MSL_TEST(isnan, __builtin_isnan(f))
MSL_TEST(isinf, __builtin_isinf(f))
MSL_TEST(isfinite, __builtin_isfinite(f))
MSL_TEST(signbit, __builtin_signbit(f))
#undef MSL_TEST
template <class T, int N>
inline T dot(vec<T, N> a, vec<T, N> b) {
  T s = 0;
  for (int i = 0; i < N; ++i) s += a[i] * b[i];
  return s;
}
template <class T>
inline T popcount(T x) { return (T)__builtin_popcountll((unsigned long long)x & (~0ull >> (64 - 8 * sizeof(T)))); }
inline uint clz(uint x) { return x ? __builtin_clz(x) : 32; }
inline uint ctz(uint x) { return x ? __builtin_ctz(x) : 32; }
template <class T>
inline T extract_bits(T x, uint offset, uint bits) {
  typedef typename std::make_unsigned<T>::type U;
  U m = bits >= 8 * sizeof(T) ? (U)~(U)0 : (U)(((U)1 << bits) - 1);
  return (T)(((U)x >> offset) & m);
}
template <class T>
inline T insert_bits(T base, T insert, uint offset, uint bits) {
  typedef typename std::make_unsigned<T>::type U;
  U m = (bits >= 8 * sizeof(T) ? (U)~(U)0 : (U)(((U)1 << bits) - 1)) << offset;
  return (T)(((U)base & ~m) | (((U)insert << offset) & m));
}

namespace precise {
using metal::cos; using metal::exp; using metal::exp2; using metal::log; using metal::log2;
using metal::pow; using metal::rsqrt; using metal::sin; using metal::sqrt; using metal::tanh;
using metal::fmax; using metal::fmin; using metal::fabs; using metal::abs;
}  // namespace precise
namespace fast {
using namespace metal::precise;
}  // namespace fast

// ---- SIMD-group and quad-group functions ----
template <class T>
inline T msl_get(const void* p) {
  T v;
  __builtin_memcpy(&v, p, sizeof(T));
  return v;
}
template <class T>
inline void msl_put(msl_simd* s, int lane, T v) { __builtin_memcpy(s->out[lane], &v, sizeof(T)); }
inline bool msl_active(msl_simd* s, int lane) { return lane >= 0 && lane < s->nlanes && ((s->active >> lane) & 1u); }

struct msl_op_sum { template <class T> static T f(T a, T b) { return a + b; } };
struct msl_op_prod { template <class T> static T f(T a, T b) { return a * b; } };
struct msl_op_max { template <class T> static T f(T a, T b) { return metal::max(a, b); } };
struct msl_op_min { template <class T> static T f(T a, T b) { return metal::min(a, b); } };
struct msl_op_and { template <class T> static T f(T a, T b) { return a & b; } };
struct msl_op_or { template <class T> static T f(T a, T b) { return a | b; } };
struct msl_op_xor { template <class T> static T f(T a, T b) { return a ^ b; } };

// Reduction over the active lanes of each group of W lanes (32: simdgroup, 4: quadgroup), in
// lane order; every active lane of the group receives the result.
template <class T, class Op, int W>
void msl_reduce(msl_simd* s) {
  for (int g = 0; g < MSL_SIMD_WIDTH; g += W) {
    bool any = false;
    T acc{};
    for (int l = g; l < g + W; ++l)
      if (msl_active(s, l)) acc = any ? Op::f(acc, msl_get<T>(s->in[l])) : msl_get<T>(s->in[l]), any = true;
    for (int l = g; l < g + W; ++l)
      if (msl_active(s, l)) msl_put(s, l, acc);
  }
}
template <class T, class Op, bool Inclusive>
void msl_prefix(msl_simd* s) {
  T acc = (T)(std::is_same<Op, msl_op_prod>::value ? 1 : 0);
  for (int l = 0; l < MSL_SIMD_WIDTH; ++l) {
    if (!msl_active(s, l)) continue;
    T v = msl_get<T>(s->in[l]);
    if (Inclusive) acc = Op::f(acc, v);
    msl_put(s, l, acc);
    if (!Inclusive) acc = Op::f(acc, v);
  }
}
enum { MSL_IDX, MSL_DOWN, MSL_UP, MSL_XOR, MSL_ROT_DOWN, MSL_ROT_UP, MSL_FIRST };
// Lanes read from lane `src` of their group of W; reading a lane that does not exist or did
// not take part gives NaN bytes (undefined in Metal).
template <class T, int KIND, int W>
void msl_shuffle(msl_simd* s) {
  int first = __builtin_ctz(s->active);
  for (int l = 0; l < MSL_SIMD_WIDTH; ++l) {
    if (!msl_active(s, l)) continue;
    int a = s->arg[l], base = l / W * W, off = l % W, src;
    switch (KIND) {
      case MSL_IDX: src = a >= 0 && a < W ? base + a : -1; break;
      case MSL_DOWN: src = off + a < W ? l + a : l; break;
      case MSL_UP: src = off - a >= 0 ? l - a : l; break;
      case MSL_XOR: src = base + ((off ^ a) % W); break;
      case MSL_ROT_DOWN: src = base + (off + a) % W; break;
      case MSL_ROT_UP: src = base + ((off - a) % W + W) % W; break;
      default: src = first; break;
    }
    if (msl_active(s, src)) __builtin_memcpy(s->out[l], s->in[src], sizeof(T));
    else __builtin_memset(s->out[l], 0xff, sizeof(T));
  }
}
template <class T>
inline T msl_collective(const char* what, const char* file, int line, int col, T v, int arg,
                        void (*complete)(msl_simd*)) {
  static_assert(sizeof(T) <= MSL_SLOT_BYTES, "SIMD-group function: value too large");
  return msl_get<T>(msl_simd_enter(what, file, line, col, &v, sizeof(T), arg, complete));
}

#define MSL_REDUCE(name, Op, W) \
  template <class T> \
  inline T name(T v, MSL_SITE) { return msl_collective(#name, MSL_AT, v, 0, msl_reduce<T, Op, W>); }
MSL_REDUCE(simd_sum, msl_op_sum, 32)
MSL_REDUCE(simd_product, msl_op_prod, 32)
MSL_REDUCE(simd_max, msl_op_max, 32)
MSL_REDUCE(simd_min, msl_op_min, 32)
MSL_REDUCE(simd_and, msl_op_and, 32)
MSL_REDUCE(simd_or, msl_op_or, 32)
MSL_REDUCE(simd_xor, msl_op_xor, 32)
MSL_REDUCE(quad_sum, msl_op_sum, 4)
MSL_REDUCE(quad_product, msl_op_prod, 4)
MSL_REDUCE(quad_max, msl_op_max, 4)
MSL_REDUCE(quad_min, msl_op_min, 4)
#undef MSL_REDUCE
#define MSL_PREFIX(name, Op, Inc) \
  template <class T> \
  inline T name(T v, MSL_SITE) { return msl_collective(#name, MSL_AT, v, 0, msl_prefix<T, Op, Inc>); }
MSL_PREFIX(simd_prefix_inclusive_sum, msl_op_sum, true)
MSL_PREFIX(simd_prefix_exclusive_sum, msl_op_sum, false)
MSL_PREFIX(simd_prefix_inclusive_product, msl_op_prod, true)
MSL_PREFIX(simd_prefix_exclusive_product, msl_op_prod, false)
#undef MSL_PREFIX
#define MSL_SHUFFLE(name, KIND, W) \
  template <class T> \
  inline T name(T v, ushort arg, MSL_SITE) { return msl_collective(#name, MSL_AT, v, arg, msl_shuffle<T, KIND, W>); }
MSL_SHUFFLE(simd_shuffle, MSL_IDX, 32)
MSL_SHUFFLE(simd_broadcast, MSL_IDX, 32)
MSL_SHUFFLE(simd_shuffle_down, MSL_DOWN, 32)
MSL_SHUFFLE(simd_shuffle_up, MSL_UP, 32)
MSL_SHUFFLE(simd_shuffle_xor, MSL_XOR, 32)
MSL_SHUFFLE(simd_shuffle_rotate_down, MSL_ROT_DOWN, 32)
MSL_SHUFFLE(simd_shuffle_rotate_up, MSL_ROT_UP, 32)
MSL_SHUFFLE(quad_shuffle, MSL_IDX, 4)
MSL_SHUFFLE(quad_broadcast, MSL_IDX, 4)
MSL_SHUFFLE(quad_shuffle_down, MSL_DOWN, 4)
MSL_SHUFFLE(quad_shuffle_up, MSL_UP, 4)
MSL_SHUFFLE(quad_shuffle_xor, MSL_XOR, 4)
#undef MSL_SHUFFLE
template <class T>
inline T simd_broadcast_first(T v, MSL_SITE) {
  return msl_collective("simd_broadcast_first", MSL_AT, v, 0, msl_shuffle<T, MSL_FIRST, 32>);
}

struct simd_vote {
  typedef uint64_t vote_t;
  vote_t v;
  explicit operator vote_t() const { return v; }
  bool any() const { return v != 0; }
};
inline void msl_ballot(msl_simd* s) {
  uint64_t m = 0;
  for (int l = 0; l < MSL_SIMD_WIDTH; ++l)
    if (msl_active(s, l) && msl_get<bool>(s->in[l])) m |= 1ull << l;
  for (int l = 0; l < MSL_SIMD_WIDTH; ++l)
    if (msl_active(s, l)) msl_put(s, l, m);
}
inline simd_vote simd_ballot(bool b, MSL_SITE) {
  return simd_vote{msl_collective<uint64_t>("simd_ballot", MSL_AT, b, 0, msl_ballot)};
}
// Votes: 0 = any, 1 = all, 2 = is_first (value unused).
template <int KIND>
void msl_vote(msl_simd* s) {
  int first = __builtin_ctz(s->active);
  bool any = false, all = true;
  for (int l = 0; l < MSL_SIMD_WIDTH; ++l)
    if (msl_active(s, l)) any |= msl_get<bool>(s->in[l]), all &= msl_get<bool>(s->in[l]);
  for (int l = 0; l < MSL_SIMD_WIDTH; ++l)
    if (msl_active(s, l)) msl_put(s, l, KIND == 0 ? any : KIND == 1 ? all : l == first);
}
inline bool simd_any(bool b, MSL_SITE) { return msl_collective("simd_any", MSL_AT, b, 0, msl_vote<0>); }
inline bool simd_all(bool b, MSL_SITE) { return msl_collective("simd_all", MSL_AT, b, 0, msl_vote<1>); }
inline bool simd_is_first(MSL_SITE) { return msl_collective("simd_is_first", MSL_AT, true, 0, msl_vote<2>); }

// ---- barriers ----
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }
inline void msl_nothing(msl_simd*) {}
inline void threadgroup_barrier(mem_flags, MSL_SITE) { msl_barrier("threadgroup_barrier", MSL_AT); }
inline void simdgroup_barrier(mem_flags, MSL_SITE) {
  msl_simd_enter("simdgroup_barrier", MSL_AT, nullptr, 0, 0, msl_nothing);
}

// ---- atomics: fibers switch only at rendezvous points, so plain accesses are atomic ----
enum memory_order { memory_order_relaxed, memory_order_seq_cst };
template <class T>
struct atomic {
  T value;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
#define MSL_ATOMICS(AS) \
  template <class T, class U> \
  inline void atomic_store_explicit(volatile AS atomic<T>* p, U v, memory_order) { p->value = (T)v; } \
  template <class T> \
  inline T atomic_load_explicit(volatile AS atomic<T>* p, memory_order) { return p->value; } \
  template <class T, class U> \
  inline T atomic_exchange_explicit(volatile AS atomic<T>* p, U v, memory_order) { \
    T old = p->value; \
    p->value = (T)v; \
    return old; \
  } \
  template <class T, class U> \
  inline bool atomic_compare_exchange_weak_explicit(volatile AS atomic<T>* p, thread T* expected, \
                                                    U desired, memory_order, memory_order) { \
    T old = p->value; \
    if (old == *expected) return p->value = (T)desired, true; \
    return *expected = old, false; \
  } \
  MSL_ATOMIC_RMW(AS, add, old + (T)v) \
  MSL_ATOMIC_RMW(AS, sub, old - (T)v) \
  MSL_ATOMIC_RMW(AS, and, old & (T)v) \
  MSL_ATOMIC_RMW(AS, or, old | (T)v) \
  MSL_ATOMIC_RMW(AS, xor, old ^ (T)v) \
  MSL_ATOMIC_RMW(AS, max, metal::max(old, (T)v)) \
  MSL_ATOMIC_RMW(AS, min, metal::min(old, (T)v))
#define MSL_ATOMIC_RMW(AS, op, expr) \
  template <class T, class U> \
  inline T atomic_fetch_##op##_explicit(volatile AS atomic<T>* p, U v, memory_order) { \
    T old = p->value; \
    p->value = expr; \
    return old; \
  }
MSL_ATOMICS(device)
MSL_ATOMICS(threadgroup)
#undef MSL_ATOMICS
#undef MSL_ATOMIC_RMW

}  // namespace metal

using namespace metal; // as MLX's headers do

// MSL vector constructors are not C++: route `float4(...)` to metal::msl_make.
#define bool2(...) ::metal::msl_make<::bool2>(__VA_ARGS__)
#define bool3(...) ::metal::msl_make<::bool3>(__VA_ARGS__)
#define bool4(...) ::metal::msl_make<::bool4>(__VA_ARGS__)
#define char2(...) ::metal::msl_make<::char2>(__VA_ARGS__)
#define char3(...) ::metal::msl_make<::char3>(__VA_ARGS__)
#define char4(...) ::metal::msl_make<::char4>(__VA_ARGS__)
#define uchar2(...) ::metal::msl_make<::uchar2>(__VA_ARGS__)
#define uchar3(...) ::metal::msl_make<::uchar3>(__VA_ARGS__)
#define uchar4(...) ::metal::msl_make<::uchar4>(__VA_ARGS__)
#define short2(...) ::metal::msl_make<::short2>(__VA_ARGS__)
#define short3(...) ::metal::msl_make<::short3>(__VA_ARGS__)
#define short4(...) ::metal::msl_make<::short4>(__VA_ARGS__)
#define ushort2(...) ::metal::msl_make<::ushort2>(__VA_ARGS__)
#define ushort3(...) ::metal::msl_make<::ushort3>(__VA_ARGS__)
#define ushort4(...) ::metal::msl_make<::ushort4>(__VA_ARGS__)
#define int2(...) ::metal::msl_make<::int2>(__VA_ARGS__)
#define int3(...) ::metal::msl_make<::int3>(__VA_ARGS__)
#define int4(...) ::metal::msl_make<::int4>(__VA_ARGS__)
#define uint2(...) ::metal::msl_make<::uint2>(__VA_ARGS__)
#define uint3(...) ::metal::msl_make<::uint3>(__VA_ARGS__)
#define uint4(...) ::metal::msl_make<::uint4>(__VA_ARGS__)
#define long2(...) ::metal::msl_make<::long2>(__VA_ARGS__)
#define long3(...) ::metal::msl_make<::long3>(__VA_ARGS__)
#define long4(...) ::metal::msl_make<::long4>(__VA_ARGS__)
#define ulong2(...) ::metal::msl_make<::ulong2>(__VA_ARGS__)
#define ulong3(...) ::metal::msl_make<::ulong3>(__VA_ARGS__)
#define ulong4(...) ::metal::msl_make<::ulong4>(__VA_ARGS__)
#define half2(...) ::metal::msl_make<::half2>(__VA_ARGS__)
#define half3(...) ::metal::msl_make<::half3>(__VA_ARGS__)
#define half4(...) ::metal::msl_make<::half4>(__VA_ARGS__)
#define bfloat2(...) ::metal::msl_make<::bfloat2>(__VA_ARGS__)
#define bfloat3(...) ::metal::msl_make<::bfloat3>(__VA_ARGS__)
#define bfloat4(...) ::metal::msl_make<::bfloat4>(__VA_ARGS__)
#define float2(...) ::metal::msl_make<::float2>(__VA_ARGS__)
#define float3(...) ::metal::msl_make<::float3>(__VA_ARGS__)
#define float4(...) ::metal::msl_make<::float4>(__VA_ARGS__)
