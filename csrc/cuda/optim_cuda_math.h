// Host/device code of the CUDA multi-tensor optimizer kernels (optim_cuda.cu), free of torch/ATen and of
// CUDA headers outside nvcc: with g++ (no __CUDACC__) this header compiles as plain C++, and
// tests/test_cuda_optim_math.py runs the very same chunk planner and per-chunk bodies on the CPU (one
// "block" after another, one "thread" after another) against torch.optim.
//
// Multi-tensor apply.  One launch covers up to Op::kMaxTensors tensors: their pointers, numels and
// chunk-prefix table live in a kernel-argument struct (passed as __grid_constant__: read in place from
// parameter space, never copied to local memory; 4 KiB at most).  Tensor t owns the chunks
// [chunk_begin[t], chunk_begin[t+1]) of kChunkElems elements each; block b takes chunks b, b + grid, ...
// and finds its tensor by binary search, so one launch covers every element of its tensors whatever
// their sizes, and only the tensor count (or an int32 chunk count) starts a further launch.  Inside a
// chunk, a tensor whose pointers are all 16-byte aligned is read and written in 16-byte vectors
// (kVec = 16 / sizeof(param) elements; Ω, float32, in kVec*4 bytes) up to the last whole vector, and the
// rest element by element; an unaligned tensor (a view at an odd offset) element by element throughout.
// Both paths call the same per-element formula, so results do not depend on the path.
//
// Numerics follow csrc/cpu/optim_cpu.cpp operation by operation (which follows torch.optim's
// single-tensor implementation): float32 math for float32/float16/bfloat16 params (float64 for double),
// scalar constants computed in double and cast once, results rounded once when stored; Ω is float32, θ*
// and the optimizer state have the parameter's dtype.  Division and sqrt use the correctly rounded
// intrinsics (__fdiv_rn/__fsqrt_rn), so they stay IEEE even under --use_fast_math.
#pragma once

#include <stdint.h>
#include <string.h>

#include <math.h>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define MAS_HD __host__ __device__ __forceinline__
#else
#define MAS_HD inline
#endif
#if defined(__CUDA_ARCH__)
#define MAS_UNROLL _Pragma("unroll")
#else
#define MAS_UNROLL
#endif

namespace mas_ext {
namespace cuda_optim {

// ---------------------------------------------------------------------------------------------------
// Launch geometry
// ---------------------------------------------------------------------------------------------------
constexpr int64_t kChunkElems = int64_t(1) << 16;   // elements per chunk: a multiple of every kVec
constexpr int kBlockThreads = 512;
constexpr int64_t kMaxGrid = int64_t(1) << 20;      // blocks per launch (each loops over chunks)
constexpr int64_t kMaxChunksPerLaunch = 0x7fffffff;  // chunk_begin is int32
constexpr int kMaxArgBytes = 4096;                   // classic kernel-parameter limit

struct ChunkSpan {
  int64_t begin, end;  // element range [begin, end) of one tensor
};

MAS_HD int64_t num_chunks(int64_t numel) { return (numel + kChunkElems - 1) / kChunkElems; }

MAS_HD ChunkSpan chunk_span(int64_t numel, int64_t local_chunk) {
  const int64_t b = local_chunk * kChunkElems;
  const int64_t e = b + kChunkElems < numel ? b + kChunkElems : numel;
  return {b, e};
}

// End of the vectorised part of a span that starts on a multiple of kVec: the last whole vector.
MAS_HD int64_t vector_end(ChunkSpan s, int vec) { return s.begin + (s.end - s.begin) / vec * vec; }

MAS_HD bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The tensor that owns chunk c: the largest t in [0, n) with chunk_begin[t] <= c (chunk_begin strictly
// increasing, chunk_begin[n] = total chunks > c).
MAS_HD int find_tensor(const int32_t* chunk_begin, int n, int64_t c) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (chunk_begin[mid] <= c) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

template <int kDepth, int kMaxTensors, class Extra>
struct TensorTable {
  static constexpr int kMax = kMaxTensors;
  static constexpr int kSlots = kDepth;
  void* ptr[kDepth][kMaxTensors];   // slot d of tensor t (null: absent)
  int64_t numel[kMaxTensors];
  Extra extra[kMaxTensors];         // per-tensor op data
  int32_t chunk_begin[kMaxTensors + 1];
  int32_t ntensors;
};

struct NoExtra {};

// Host: walks the tensors (skipping empty ones), filling `tab` via fill(tab, slot, i); whenever the table
// is full, calls flush(total_chunks) for it and starts the next.  Returns the first non-zero flush
// result, -1 for a tensor with more chunks than a launch can index, else 0.
template <class Table, class Fill, class Flush>
inline int plan_launches(int64_t n, const int64_t* numels, Table& tab, const Fill& fill, const Flush& flush) {
  tab.ntensors = 0;
  tab.chunk_begin[0] = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (numels[i] <= 0) continue;
    const int64_t chunks = num_chunks(numels[i]);
    if (chunks > kMaxChunksPerLaunch) return -1;
    if (tab.ntensors == Table::kMax || int64_t(tab.chunk_begin[tab.ntensors]) + chunks > kMaxChunksPerLaunch) {
      const int rc = flush(int64_t(tab.chunk_begin[tab.ntensors]));
      if (rc != 0) return rc;
      tab.ntensors = 0;
      tab.chunk_begin[0] = 0;
    }
    const int s = tab.ntensors;
    fill(tab, s, i);
    tab.numel[s] = numels[i];
    tab.chunk_begin[s + 1] = static_cast<int32_t>(tab.chunk_begin[s] + chunks);
    tab.ntensors = s + 1;
  }
  return tab.ntensors > 0 ? flush(int64_t(tab.chunk_begin[tab.ntensors])) : 0;
}

// Host: fill for plan_launches from slot-major pointer lists (lists[d] null: slot absent).
template <class Table>
inline void fill_slots(Table& tab, int s, int64_t i, void* const* const* lists) {
  for (int d = 0; d < Table::kSlots; ++d) tab.ptr[d][s] = lists[d] != nullptr ? lists[d][i] : nullptr;
}

// Blocks of one launch: found_inf skips everything; else every chunk of the table, vectors then tail.
template <class Op>
MAS_HD void run_blocks(const typename Op::Launch& L, int64_t block, int64_t grid, int tid, int nthreads) {
  if (Op::skip(L.args)) return;
  const int64_t total = L.tab.chunk_begin[L.tab.ntensors];
  for (int64_t c = block; c < total; c += grid) {
    const int t = find_tensor(L.tab.chunk_begin, L.tab.ntensors, c);
    const ChunkSpan span = chunk_span(L.tab.numel[t], c - L.tab.chunk_begin[t]);
    const Op op(L, t);
    const int64_t vend = op.aligned() ? vector_end(span, Op::kVec) : span.begin;
    for (int64_t i = span.begin + int64_t(tid) * Op::kVec; i < vend; i += int64_t(nthreads) * Op::kVec) {
      op.template apply<Op::kVec>(i);
    }
    for (int64_t i = vend + tid; i < span.end; i += nthreads) op.template apply<1>(i);
  }
}

// ---------------------------------------------------------------------------------------------------
// Element types: storage -> opmath (float for float/half/bfloat16, double for double) and back, with
// round-to-nearest-even.  The host versions are bit-exact software conversions (used by the CPU tests);
// on the device the hardware conversions (same IEEE results).
// ---------------------------------------------------------------------------------------------------
struct f16_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

MAS_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}
MAS_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

// IEEE binary16 <-> binary32 (F. Giesen's exact conversions; RNE, subnormals, inf, NaN).
inline float half_to_float_sw(uint16_t h) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (uint32_t(h) & 0x7fffu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += uint32_t(127 - 15) << 23;
  if (exp == shifted_exp) {
    o += uint32_t(128 - 16) << 23;  // inf / NaN
  } else if (exp == 0) {
    o += 1u << 23;                  // zero / subnormal: renormalise
    o = float_bits(bits_float(o) - bits_float(113u << 23));
  }
  return bits_float(o | ((uint32_t(h) & 0x8000u) << 16));
}
inline uint16_t float_to_half_sw(float f) {
  uint32_t x = float_bits(f);
  const uint32_t sign = x & 0x80000000u;
  x ^= sign;
  uint16_t o;
  if (x >= (uint32_t(127 + 16) << 23)) {
    o = x > (255u << 23) ? 0x7e00 : 0x7c00;                 // NaN / overflow to inf
  } else if (x < (113u << 23)) {                             // half subnormal or zero
    const uint32_t magic = uint32_t((127 - 15) + (23 - 10) + 1) << 23;
    o = static_cast<uint16_t>(float_bits(bits_float(x) + bits_float(magic)) - magic);
  } else {
    const uint32_t mant_odd = (x >> 13) & 1u;
    x += (uint32_t(15 - 127) << 23) + 0xfffu;
    x += mant_odd;
    o = static_cast<uint16_t>(x >> 13);
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}
inline uint16_t float_to_bf16_sw(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

template <class T>
struct Elem;
template <>
struct Elem<float> {
  using op_t = float;
  static constexpr int kVec = 4;
  MAS_HD static float to_op(float x) { return x; }
  MAS_HD static float from_op(float x) { return x; }
};
template <>
struct Elem<double> {
  using op_t = double;
  static constexpr int kVec = 2;
  MAS_HD static double to_op(double x) { return x; }
  MAS_HD static double from_op(double x) { return x; }
};
template <>
struct Elem<f16_t> {
  using op_t = float;
  static constexpr int kVec = 8;
  MAS_HD static float to_op(f16_t x) {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(x.bits));
#else
    return half_to_float_sw(x.bits);
#endif
  }
  MAS_HD static f16_t from_op(float x) {
#if defined(__CUDA_ARCH__)
    return f16_t{__half_as_ushort(__float2half_rn(x))};
#else
    return f16_t{float_to_half_sw(x)};
#endif
  }
};
template <>
struct Elem<bf16_t> {
  using op_t = float;
  static constexpr int kVec = 8;
  MAS_HD static float to_op(bf16_t x) { return bits_float(uint32_t(x.bits) << 16); }
  MAS_HD static bf16_t from_op(float x) {
#if defined(__CUDA_ARCH__)
    return bf16_t{__bfloat16_as_ushort(__float2bfloat16_rn(x))};
#else
    return bf16_t{float_to_bf16_sw(x)};
#endif
  }
};

// ---------------------------------------------------------------------------------------------------
// Vector access: N elements at once; N * sizeof(T) a multiple of 16 (or 8) bytes -> 16 (8)-byte accesses
// (ld/st.global.v4 / .v2 on the device), N == 1 -> one scalar access.
// ---------------------------------------------------------------------------------------------------
#if defined(__CUDACC__)
using vec16_t = uint4;
using vec8_t = uint2;
#else
struct alignas(16) vec16_t {
  uint32_t x, y, z, w;
};
struct alignas(8) vec8_t {
  uint32_t x, y;
};
#endif

// Tells nvcc the pointer is in global memory (pointers read from the argument table are generic), so
// it emits ld.global/st.global.
template <class P>
MAS_HD P* global_ptr(P* p) {
#if defined(__CUDA_ARCH__)
  __builtin_assume(__isGlobal(p));
#endif
  return p;
}

template <class T, int N>
MAS_HD void load_raw(const T* src, T* dst) {
  constexpr int kBytes = N * int(sizeof(T));
  if constexpr (N == 1) {
    dst[0] = *global_ptr(src);
  } else if constexpr (kBytes % 16 == 0) {
    constexpr int kPer = 16 / int(sizeof(T));
MAS_UNROLL
    for (int k = 0; k < kBytes / 16; ++k) {
      union {
        vec16_t v;
        T e[kPer];
      } u;
      u.v = *global_ptr(reinterpret_cast<const vec16_t*>(src) + k);
MAS_UNROLL
      for (int j = 0; j < kPer; ++j) dst[k * kPer + j] = u.e[j];
    }
  } else {
    static_assert(kBytes == 8, "vector accesses are 8 or 16*k bytes");
    union {
      vec8_t v;
      T e[N];
    } u;
    u.v = *global_ptr(reinterpret_cast<const vec8_t*>(src));
MAS_UNROLL
    for (int j = 0; j < N; ++j) dst[j] = u.e[j];
  }
}

template <class T, int N>
MAS_HD void store_raw(T* dst, const T* src) {
  constexpr int kBytes = N * int(sizeof(T));
  if constexpr (N == 1) {
    *global_ptr(dst) = src[0];
  } else if constexpr (kBytes % 16 == 0) {
    constexpr int kPer = 16 / int(sizeof(T));
MAS_UNROLL
    for (int k = 0; k < kBytes / 16; ++k) {
      union {
        vec16_t v;
        T e[kPer];
      } u;
MAS_UNROLL
      for (int j = 0; j < kPer; ++j) u.e[j] = src[k * kPer + j];
      *global_ptr(reinterpret_cast<vec16_t*>(dst) + k) = u.v;
    }
  } else {
    static_assert(kBytes == 8, "vector accesses are 8 or 16*k bytes");
    union {
      vec8_t v;
      T e[N];
    } u;
MAS_UNROLL
    for (int j = 0; j < N; ++j) u.e[j] = src[j];
    *global_ptr(reinterpret_cast<vec8_t*>(dst)) = u.v;
  }
}

template <class T, int N>
MAS_HD void load_op(const T* src, typename Elem<T>::op_t* out) {
  T raw[N];
  load_raw<T, N>(src, raw);
MAS_UNROLL
  for (int j = 0; j < N; ++j) out[j] = Elem<T>::to_op(raw[j]);
}
template <class T, int N>
MAS_HD void store_op(T* dst, const typename Elem<T>::op_t* in) {
  T raw[N];
MAS_UNROLL
  for (int j = 0; j < N; ++j) raw[j] = Elem<T>::from_op(in[j]);
  store_raw<T, N>(dst, raw);
}
// Ω (float32) widened to the opmath type.
template <class op_t, int N>
MAS_HD void load_omega(const float* src, op_t* out) {
  float raw[N];
  load_raw<float, N>(src, raw);
MAS_UNROLL
  for (int j = 0; j < N; ++j) out[j] = static_cast<op_t>(raw[j]);
}

// Correctly rounded division / sqrt whatever the fast-math flags; NaN-propagating max (torch.maximum).
MAS_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
MAS_HD double div_rn(double a, double b) { return a / b; }
MAS_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return sqrtf(a);
#endif
}
MAS_HD double sqrt_rn(double a) { return sqrt(a); }
template <class T>
MAS_HD T max_nan(T a, T b) {
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}

template <class P>
MAS_HD bool all_aligned(const P* const* ps, int n) {
  bool ok = true;
  for (int i = 0; i < n; ++i) ok = ok && aligned16(ps[i]);  // null counts as aligned
  return ok;
}

// ---------------------------------------------------------------------------------------------------
// add_penalty_grad_: grad += scale * Ω * (θ − θ*)
// ---------------------------------------------------------------------------------------------------
enum PenaltySlot { kPenGrad = 0, kPenParam, kPenOmega, kPenStar, kPenDepth };
struct PenaltyArgs {
  double scale;
};

template <class T>
struct PenaltyOp {
  using op_t = typename Elem<T>::op_t;
  static constexpr int kVec = Elem<T>::kVec;
  using Table = TensorTable<kPenDepth, 80, NoExtra>;
  struct Launch {
    Table tab;
    PenaltyArgs args;
  };
  static_assert(sizeof(Launch) <= kMaxArgBytes, "kernel arguments over 4 KiB");

  T* g;
  const T* p;
  const float* om;
  const T* st;
  op_t scale;

  MAS_HD static bool skip(const PenaltyArgs&) { return false; }
  MAS_HD PenaltyOp(const Launch& L, int t)
      : g(static_cast<T*>(L.tab.ptr[kPenGrad][t])),
        p(static_cast<const T*>(L.tab.ptr[kPenParam][t])),
        om(static_cast<const float*>(L.tab.ptr[kPenOmega][t])),
        st(static_cast<const T*>(L.tab.ptr[kPenStar][t])),
        scale(static_cast<op_t>(L.args.scale)) {}
  MAS_HD bool aligned() const {
    const void* ps[4] = {g, p, om, st};
    return all_aligned(ps, 4);
  }
  template <int N>
  MAS_HD void apply(int64_t i) const {
    op_t G[N], P[N], O[N], S[N];
    load_op<T, N>(g + i, G);
    load_op<T, N>(p + i, P);
    load_omega<op_t, N>(om + i, O);
    load_op<T, N>(st + i, S);
MAS_UNROLL
    for (int j = 0; j < N; ++j) G[j] = G[j] + scale * O[j] * (P[j] - S[j]);
    store_op<T, N>(g + i, G);
  }
};

// ---------------------------------------------------------------------------------------------------
// SGD (torch.optim.SGD on grad + 2λΩ(θ−θ*))
// ---------------------------------------------------------------------------------------------------
enum SgdSlot { kSgdParam = 0, kSgdGrad, kSgdBuf, kSgdOmega, kSgdStar, kSgdDepth };
struct SgdArgs {
  double penalty_scale, lr, momentum, dampening, weight_decay;
  const float* grad_scale;  // device scalar or null: grads are divided by it (and stored back)
  const float* found_inf;   // device scalar or null: != 0 skips the step
  bool nesterov, maximize, first_step;
};

template <class T>
struct SgdOp {
  using op_t = typename Elem<T>::op_t;
  static constexpr int kVec = Elem<T>::kVec;
  using Table = TensorTable<kSgdDepth, 64, NoExtra>;
  struct Launch {
    Table tab;
    SgdArgs args;
  };
  static_assert(sizeof(Launch) <= kMaxArgBytes, "kernel arguments over 4 KiB");

  T *p, *g, *buf;
  const float* om;
  const T* st;
  op_t pscale, lr_neg, momentum, one_minus_damp, wd, sign, inv;
  bool has_mom, first, nest, l2, unscale;

  MAS_HD static bool skip(const SgdArgs& a) { return a.found_inf != nullptr && *global_ptr(a.found_inf) != 0.0f; }
  MAS_HD SgdOp(const Launch& L, int t)
      : p(static_cast<T*>(L.tab.ptr[kSgdParam][t])),
        g(static_cast<T*>(L.tab.ptr[kSgdGrad][t])),
        buf(static_cast<T*>(L.tab.ptr[kSgdBuf][t])),
        om(static_cast<const float*>(L.tab.ptr[kSgdOmega][t])),
        st(static_cast<const T*>(L.tab.ptr[kSgdStar][t])),
        pscale(static_cast<op_t>(L.args.penalty_scale)),
        lr_neg(static_cast<op_t>(-L.args.lr)),
        momentum(static_cast<op_t>(L.args.momentum)),
        one_minus_damp(static_cast<op_t>(1.0 - L.args.dampening)),
        wd(static_cast<op_t>(L.args.weight_decay)),
        sign(static_cast<op_t>(L.args.maximize ? -1.0 : 1.0)),
        inv(static_cast<op_t>(L.args.grad_scale != nullptr ? *global_ptr(L.args.grad_scale) : 1.0f)),
        has_mom(L.args.momentum != 0.0),
        first(L.args.first_step),
        nest(L.args.nesterov),
        l2(L.args.weight_decay != 0.0),
        unscale(L.args.grad_scale != nullptr) {}
  MAS_HD bool aligned() const {
    const void* ps[5] = {p, g, buf, om, st};
    return all_aligned(ps, 5);
  }
  template <int N>
  MAS_HD void apply(int64_t i) const {
    op_t P[N], G[N], B[N] = {}, O[N] = {}, S[N] = {};
    load_op<T, N>(p + i, P);
    load_op<T, N>(g + i, G);
    if (has_mom && !first) load_op<T, N>(buf + i, B);
    if (om != nullptr) {
      load_omega<op_t, N>(om + i, O);
      load_op<T, N>(st + i, S);
    }
    if (unscale) {
MAS_UNROLL
      for (int j = 0; j < N; ++j) G[j] = div_rn(G[j], inv);
      store_op<T, N>(g + i, G);  // grads are left unscaled, as torch's fused steps do
    }
MAS_UNROLL
    for (int j = 0; j < N; ++j) {
      op_t gj = G[j];
      if (om != nullptr) gj = gj + pscale * O[j] * (P[j] - S[j]);  // the loss-term gradient of R(θ)
      gj = gj * sign;                                              // maximize: -grad (exact)
      if (l2) gj = gj + wd * P[j];                                 // grad.add(param, alpha=wd)
      if (has_mom) {
        B[j] = first ? gj : B[j] * momentum + one_minus_damp * gj;  // buf = g | buf*m + (1-d)*g
        gj = nest ? gj + momentum * B[j] : B[j];
      }
      P[j] = P[j] + lr_neg * gj;                                   // param.add_(g, alpha=-lr)
    }
    store_op<T, N>(p + i, P);
    if (has_mom) store_op<T, N>(buf + i, B);
  }
};

// ---------------------------------------------------------------------------------------------------
// Adam / AdamW (torch.optim.Adam/AdamW on grad + 2λΩ(θ−θ*))
// ---------------------------------------------------------------------------------------------------
enum AdamSlot { kAdamParam = 0, kAdamGrad, kAdamExpAvg, kAdamExpAvgSq, kAdamMaxExpAvgSq, kAdamOmega, kAdamStar,
                kAdamStep, kAdamDepth };
struct AdamArgs {
  double penalty_scale, lr, beta1, beta2, weight_decay, eps;
  const float* grad_scale;  // device scalar or null
  const float* found_inf;   // device scalar or null: != 0 skips the step (and the step-count increment)
  bool amsgrad, maximize, decoupled;
  bool device_steps;  // step counts are device scalars (slot kAdamStep), incremented on the device; else
                      // the caller incremented host counters and passed the bias corrections as `extra`
  bool step_f64;      // device step counters are float64 (else float32)
};
struct AdamExtra {
  double step_size;  // lr / (1 - beta1^t)
  double bc2_sqrt;   // (1 - beta2^t) ** 0.5
};

// torch's lerp picks its formula by the weight: |w| < 0.5 -> m + w (g − m), else g − (g − m)(1 − w).
MAS_HD bool lerp_weight_small(double beta1) {
  const float w = static_cast<float>(1.0 - beta1);
  return (w < 0 ? -w : w) < 0.5f;
}

template <class T>
struct AdamOp {
  using op_t = typename Elem<T>::op_t;
  static constexpr int kVec = Elem<T>::kVec;
  using Table = TensorTable<kAdamDepth, 40, AdamExtra>;
  struct Launch {
    Table tab;
    AdamArgs args;
  };
  static_assert(sizeof(Launch) <= kMaxArgBytes, "kernel arguments over 4 KiB");

  T *p, *g, *m, *v, *vm;
  const float* om;
  const T* st;
  op_t pscale, sign, wd, decay, w, one_minus_w, beta2, one_minus_beta2, eps, neg_step_size, bc2_sqrt, inv;
  bool ams, l2, small_w, unscale;

  MAS_HD static bool skip(const AdamArgs& a) { return a.found_inf != nullptr && *global_ptr(a.found_inf) != 0.0f; }

  // Step counter of tensor t (device-step mode), after the increment.
  MAS_HD static double read_step(const Launch& L, int t) {
    const void* s = L.tab.ptr[kAdamStep][t];
    return L.args.step_f64 ? *global_ptr(static_cast<const double*>(s))
                           : static_cast<double>(*global_ptr(static_cast<const float*>(s)));
  }
  // One thread per tensor, in a launch of its own before the step's: step += 1 unless found_inf.
  MAS_HD static void increment_step(const Launch& L, int t) {
    if (!L.args.device_steps || t >= L.tab.ntensors || skip(L.args)) return;
    void* s = L.tab.ptr[kAdamStep][t];
    if (L.args.step_f64) *global_ptr(static_cast<double*>(s)) += 1.0;
    else *global_ptr(static_cast<float*>(s)) += 1.0f;
  }
  MAS_HD static AdamExtra bias_corrections(const Launch& L, int t) {
    if (!L.args.device_steps) return L.tab.extra[t];
    const double step = read_step(L, t);  // in double, as torch.optim's Python computes them
    const double bc1 = 1.0 - pow(L.args.beta1, step);
    const double bc2 = 1.0 - pow(L.args.beta2, step);
    return {L.args.lr / bc1, sqrt(bc2)};
  }

  MAS_HD AdamOp(const Launch& L, int t)
      : p(static_cast<T*>(L.tab.ptr[kAdamParam][t])),
        g(static_cast<T*>(L.tab.ptr[kAdamGrad][t])),
        m(static_cast<T*>(L.tab.ptr[kAdamExpAvg][t])),
        v(static_cast<T*>(L.tab.ptr[kAdamExpAvgSq][t])),
        vm(L.args.amsgrad ? static_cast<T*>(L.tab.ptr[kAdamMaxExpAvgSq][t]) : nullptr),
        om(static_cast<const float*>(L.tab.ptr[kAdamOmega][t])),
        st(static_cast<const T*>(L.tab.ptr[kAdamStar][t])),
        pscale(static_cast<op_t>(L.args.penalty_scale)),
        sign(static_cast<op_t>(L.args.maximize ? -1.0 : 1.0)),
        wd(static_cast<op_t>(L.args.weight_decay)),
        decay(static_cast<op_t>(L.args.decoupled && L.args.weight_decay != 0 ? 1.0 - L.args.lr * L.args.weight_decay
                                                                            : 1.0)),
        w(static_cast<op_t>(1.0 - L.args.beta1)),
        one_minus_w(op_t(1) - static_cast<op_t>(1.0 - L.args.beta1)),
        beta2(static_cast<op_t>(L.args.beta2)),
        one_minus_beta2(static_cast<op_t>(1.0 - L.args.beta2)),
        eps(static_cast<op_t>(L.args.eps)),
        inv(static_cast<op_t>(L.args.grad_scale != nullptr ? *global_ptr(L.args.grad_scale) : 1.0f)),
        ams(L.args.amsgrad),
        l2(L.args.weight_decay != 0 && !L.args.decoupled),
        small_w(lerp_weight_small(L.args.beta1)),
        unscale(L.args.grad_scale != nullptr) {
    const AdamExtra bc = bias_corrections(L, t);
    neg_step_size = static_cast<op_t>(-bc.step_size);
    bc2_sqrt = static_cast<op_t>(bc.bc2_sqrt);
  }
  MAS_HD bool aligned() const {
    const void* ps[7] = {p, g, m, v, vm, om, st};
    return all_aligned(ps, 7);
  }
  template <int N>
  MAS_HD void apply(int64_t i) const {
    op_t P[N], G[N], M[N], V[N], VM[N] = {}, O[N] = {}, S[N] = {};
    load_op<T, N>(p + i, P);
    load_op<T, N>(g + i, G);
    load_op<T, N>(m + i, M);
    load_op<T, N>(v + i, V);
    if (ams) load_op<T, N>(vm + i, VM);
    if (om != nullptr) {
      load_omega<op_t, N>(om + i, O);
      load_op<T, N>(st + i, S);
    }
    if (unscale) {
MAS_UNROLL
      for (int j = 0; j < N; ++j) G[j] = div_rn(G[j], inv);
      store_op<T, N>(g + i, G);  // grads are left unscaled, as torch's fused steps do
    }
MAS_UNROLL
    for (int j = 0; j < N; ++j) {
      op_t gj = G[j], pj = P[j];
      if (om != nullptr) gj = gj + pscale * O[j] * (pj - S[j]);  // the loss-term gradient of R(θ), before decay
      gj = gj * sign;                                             // maximize: -grad (exact)
      if (l2) gj = gj + wd * pj;                                  // grad.add(param, alpha=wd)
      pj = pj * decay;                                            // AdamW: param.mul_(1 - lr*wd); 1 otherwise
      M[j] = small_w ? M[j] + w * (gj - M[j]) : gj - (gj - M[j]) * one_minus_w;  // exp_avg.lerp_(g, 1-b1)
      V[j] = V[j] * beta2 + one_minus_beta2 * gj * gj;            // exp_avg_sq.mul_(b2).addcmul_(g, g, 1-b2)
      op_t second = V[j];
      if (ams) {
        VM[j] = max_nan(VM[j], V[j]);                             // torch.maximum(max_exp_avg_sq, exp_avg_sq)
        second = VM[j];
      }
      const op_t denom = div_rn(sqrt_rn(second), bc2_sqrt) + eps;  // (v.sqrt() / bc2_sqrt).add_(eps)
      P[j] = pj + neg_step_size * div_rn(M[j], denom);            // param.addcdiv_(m, denom, value=-step_size)
    }
    store_op<T, N>(p + i, P);
    store_op<T, N>(m + i, M);
    store_op<T, N>(v + i, V);
    if (ams) store_op<T, N>(vm + i, VM);
  }
};

}  // namespace cuda_optim
}  // namespace mas_ext
