// CPU multi-tensor kernels for the MAS penalty and the fused optimizer steps
// (mas_ext.optim.SGD / Adam / AdamW).
//
//   add_penalty_grad_   grad += scale * Ω * (θ − θ*)                       (scale = 2λ)
//   fused_sgd_mas_      torch.optim.SGD step on grad + 2λΩ(θ−θ*)
//   fused_adam_mas_     torch.optim.Adam / AdamW step on grad + 2λΩ(θ−θ*)
//
// Every op takes lists of tensors (one entry per parameter) and makes ONE parallel
// pass over all of them: the elements of all tensors are cut into fixed-size work
// items that at::parallel_for shares between threads, so small tensors (biases) do
// not each pay for a parallel region and large ones are split across cores.  Inside
// a work item the loop is vectorised with at::vec::Vectorized; bfloat16/half values
// are widened to float32, all arithmetic is float32 (float64 for double params), and
// results are rounded once when stored.  Ω is always float32; θ*, the grad and the
// optimizer state have the parameter's dtype.
//
// The element-wise formulas follow torch.optim's single-tensor implementation
// operation by operation (same scalar constants computed in double, same order), so
// float32 results agree with torch.optim to float32 rounding.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <limits>
#include <optional>
#include <vector>

namespace mas_ext {
namespace {

using at::BFloat16;
using at::Half;
using at::Tensor;
using at::vec::Vectorized;

// ---------------------------------------------------------------------------------
// Work splitting: (tensor, [begin, end)) items of at most kChunk elements.
// ---------------------------------------------------------------------------------
constexpr int64_t kChunk = 1 << 14;           // multiple of every vector width
constexpr int64_t kMinElemsPerThread = 1 << 16;  // below this, threads cost more than they save

struct WorkItem {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

template <typename F>
void for_each_chunk(const std::vector<int64_t>& numels, const F& fn) {
  std::vector<WorkItem> work;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    for (int64_t b = 0; b < numels[t]; b += kChunk) {
      work.push_back({t, b, std::min(numels[t], b + kChunk)});
    }
  }
  if (work.empty()) return;
  const int64_t grain = std::max<int64_t>(1, kMinElemsPerThread / kChunk);
  at::parallel_for(0, static_cast<int64_t>(work.size()), grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) fn(work[i].tensor, work[i].begin, work[i].end);
  });
}

// ---------------------------------------------------------------------------------
// Loading and storing blocks of elements as opmath vectors.
//   float:           one Vectorized<float> per block
//   bfloat16/half:   one Vectorized<scalar_t> per block = two Vectorized<float>
//   double:          scalar loop only (kVectorized = false)
// ---------------------------------------------------------------------------------
template <typename scalar_t>
struct Access {
  using opmath_t = scalar_t;
  using OVec = Vectorized<opmath_t>;
  static constexpr bool kVectorized = false;
  static constexpr int kN = 1;
  static constexpr int64_t kStep = 1;
  static void load(const scalar_t*, OVec*) {}
  static void store(scalar_t*, const OVec*) {}
  static void load_omega(const float*, OVec*) {}
};

template <>
struct Access<float> {
  using opmath_t = float;
  using OVec = Vectorized<float>;
  static constexpr bool kVectorized = true;
  static constexpr int kN = 1;
  static constexpr int64_t kStep = OVec::size();
  C10_ALWAYS_INLINE static void load(const float* p, OVec* out) { out[0] = OVec::loadu(p); }
  C10_ALWAYS_INLINE static void store(float* p, const OVec* in) { in[0].store(p); }
  C10_ALWAYS_INLINE static void load_omega(const float* p, OVec* out) { out[0] = OVec::loadu(p); }
};

template <typename reduced_t>
struct ReducedAccess {
  using opmath_t = float;
  using OVec = Vectorized<float>;
  using RVec = Vectorized<reduced_t>;
  static constexpr bool kVectorized = true;
  static constexpr int kN = 2;
  static constexpr int64_t kStep = RVec::size();
  static_assert(RVec::size() == 2 * OVec::size(), "reduced vector must widen to two float vectors");
  C10_ALWAYS_INLINE static void load(const reduced_t* p, OVec* out) {
    auto both = at::vec::convert_to_float<reduced_t>(RVec::loadu(p));
    out[0] = std::get<0>(both);
    out[1] = std::get<1>(both);
  }
  C10_ALWAYS_INLINE static void store(reduced_t* p, const OVec* in) {
    at::vec::convert_from_float<reduced_t>(in[0], in[1]).store(p);
  }
  C10_ALWAYS_INLINE static void load_omega(const float* p, OVec* out) {
    out[0] = OVec::loadu(p);
    out[1] = OVec::loadu(p + OVec::size());
  }
};
template <>
struct Access<BFloat16> : ReducedAccess<BFloat16> {};
template <>
struct Access<Half> : ReducedAccess<Half> {};

// Element-wise helpers that read the same for a vector and a scalar.
//
// Without -march flags at::vec compiles its generic Vectorized<float> (plain arrays, left to the
// auto-vectoriser), whose sqrt() calls libm's sqrtf lane by lane (errno handling keeps it scalar) and
// whose maximum() tests lanes one by one. On x86-64, SSE2 is part of the baseline ISA, so those two
// use SSE2 instructions on the vector's lanes: same IEEE results (sqrt is correctly rounded either
// way), portable to every x86-64 CPU. Other builds (AVX2/AVX512/NEON Vectorized) use at::vec as is.
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__SSE2__) && !defined(CPU_CAPABILITY_AVX2) && \
    !defined(CPU_CAPABILITY_AVX512)
#define MAS_EXT_SSE2_GENERIC 1
C10_ALWAYS_INLINE Vectorized<float> vsqrt(const Vectorized<float>& x) {
  static_assert(Vectorized<float>::size() % 4 == 0, "generic vector width must be a multiple of 4 floats");
  __at_align__ float buf[Vectorized<float>::size()];
  x.store(buf);
  for (int i = 0; i < Vectorized<float>::size(); i += 4) _mm_store_ps(buf + i, _mm_sqrt_ps(_mm_load_ps(buf + i)));
  return Vectorized<float>::loadu(buf);
}
C10_ALWAYS_INLINE Vectorized<float> vmax(const Vectorized<float>& a, const Vectorized<float>& b) {  // NaN-propagating
  __at_align__ float xa[Vectorized<float>::size()];
  __at_align__ float xb[Vectorized<float>::size()];
  a.store(xa);
  b.store(xb);
  for (int i = 0; i < Vectorized<float>::size(); i += 4) {
    const __m128 va = _mm_load_ps(xa + i), vb = _mm_load_ps(xb + i);
    const __m128 m = _mm_max_ps(vb, va);               // va where either is NaN
    const __m128 b_nan = _mm_cmpunord_ps(vb, vb);
    _mm_store_ps(xa + i, _mm_or_ps(_mm_and_ps(b_nan, vb), _mm_andnot_ps(b_nan, m)));
  }
  return Vectorized<float>::loadu(xa);
}
#else
inline Vectorized<float> vsqrt(const Vectorized<float>& x) { return x.sqrt(); }
inline Vectorized<float> vmax(const Vectorized<float>& a, const Vectorized<float>& b) { return at::vec::maximum(a, b); }
#endif
inline Vectorized<double> vsqrt(const Vectorized<double>& x) { return x.sqrt(); }
inline Vectorized<double> vmax(const Vectorized<double>& a, const Vectorized<double>& b) { return at::vec::maximum(a, b); }
inline float vsqrt(float x) { return std::sqrt(x); }
inline double vsqrt(double x) { return std::sqrt(x); }


template <typename T>
inline T vmax(T a, T b) {  // NaN-propagating, as torch.maximum
  if (std::isnan(a)) return a;
  if (std::isnan(b)) return b;
  return a > b ? a : b;
}

// ---------------------------------------------------------------------------------
// Argument checking shared by the ops.
// ---------------------------------------------------------------------------------
bool is_fused_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// `t` can be read as a flat array aligned element by element with `param`.
bool same_layout(const Tensor& t, const Tensor& param) {
  return t.defined() && t.device().is_cpu() && t.sizes().equals(param.sizes()) &&
         (param.numel() <= 1 || t.strides().equals(param.strides()));
}

void check_param_list(const char* op, at::TensorList params) {
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu(), op, ": params[", i, "] is on ", p.device(), "; this kernel is CPU only");
    TORCH_CHECK(is_fused_dtype(p.scalar_type()), op, ": params[", i, "] has dtype ", p.scalar_type(),
                "; expected float32, float64, bfloat16 or float16");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": params[", i, "] must be dense (contiguous or a permutation of it)");
  }
}

void check_aligned(const char* op, const char* what, at::TensorList ts, at::TensorList params, bool same_dtype) {
  TORCH_CHECK(ts.size() == params.size(), op, ": ", what, " has ", ts.size(), " tensors but params has ", params.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK(!ts[i].is_sparse(), op, ": ", what, "[", i, "] is sparse; sparse tensors are not supported");
    TORCH_CHECK(same_layout(ts[i], params[i]), op, ": ", what, "[", i, "] must be a CPU tensor with the shape and strides of params[", i, "]");
    if (same_dtype) {
      TORCH_CHECK(ts[i].scalar_type() == params[i].scalar_type(), op, ": ", what, "[", i, "] has dtype ",
                  ts[i].scalar_type(), " but params[", i, "] has ", params[i].scalar_type());
    }
  }
}

// Optional penalty terms: omegas[i]/stars[i] both set (tracked) or both None (untracked).
void check_penalty(const char* op, const c10::List<std::optional<Tensor>>& omegas,
                   const c10::List<std::optional<Tensor>>& stars, at::TensorList params,
                   std::vector<Tensor>& om_out, std::vector<Tensor>& star_out) {
  TORCH_CHECK(omegas.size() == params.size() && stars.size() == params.size(), op,
              ": omegas and stars need one entry (a tensor or None) per param");
  om_out.resize(params.size());
  star_out.resize(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    std::optional<Tensor> o = omegas.get(i);
    std::optional<Tensor> s = stars.get(i);
    const bool has_o = o.has_value() && o->defined();
    const bool has_s = s.has_value() && s->defined();
    TORCH_CHECK(has_o == has_s, op, ": omegas[", i, "] and stars[", i, "] must both be tensors or both be None");
    if (!has_o) continue;
    TORCH_CHECK(o->scalar_type() == at::kFloat, op, ": omegas[", i, "] must be float32, got ", o->scalar_type());
    TORCH_CHECK(same_layout(*o, params[i]), op, ": omegas[", i, "] must have the shape and strides of params[", i, "]");
    TORCH_CHECK(s->scalar_type() == params[i].scalar_type(), op, ": stars[", i, "] has dtype ", s->scalar_type(),
                " but params[", i, "] has ", params[i].scalar_type());
    TORCH_CHECK(same_layout(*s, params[i]), op, ": stars[", i, "] must have the shape and strides of params[", i, "]");
    om_out[i] = *o;
    star_out[i] = *s;
  }
}

// found_inf != 0 means "skip this step" (GradScaler with a fused optimizer).
bool should_skip(const std::optional<Tensor>& found_inf) {
  if (!found_inf.has_value() || !found_inf->defined()) return false;
  TORCH_CHECK(found_inf->numel() == 1, "found_inf must have one element");
  return found_inf->item<double>() != 0.0;
}

std::optional<float> read_grad_scale(const std::optional<Tensor>& grad_scale) {
  if (!grad_scale.has_value() || !grad_scale->defined()) return std::nullopt;
  TORCH_CHECK(grad_scale->numel() == 1, "grad_scale must have one element");
  return grad_scale->item<float>();
}

template <typename T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

#define MAS_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// =================================================================================
// add_penalty_grad_: grad += scale * Ω * (θ − θ*)
// =================================================================================
template <typename scalar_t>
void penalty_chunk(scalar_t* g, const scalar_t* p, const float* om, const scalar_t* st, double scale_d,
                   int64_t begin, int64_t end) {
  using A = Access<scalar_t>;
  using opmath_t = typename A::opmath_t;
  using OVec = typename A::OVec;
  const opmath_t scale = static_cast<opmath_t>(scale_d);
  int64_t d = begin;
  if constexpr (A::kVectorized) {
    const OVec vscale(scale);
    for (; d + A::kStep <= end; d += A::kStep) {
      OVec G[A::kN], P[A::kN], O[A::kN], S[A::kN];
      A::load(g + d, G);
      A::load(p + d, P);
      A::load_omega(om + d, O);
      A::load(st + d, S);
      for (int j = 0; j < A::kN; ++j) G[j] = G[j] + vscale * O[j] * (P[j] - S[j]);
      A::store(g + d, G);
    }
  }
  for (; d < end; ++d) {
    const opmath_t gv = static_cast<opmath_t>(g[d]) +
        scale * static_cast<opmath_t>(om[d]) * (static_cast<opmath_t>(p[d]) - static_cast<opmath_t>(st[d]));
    g[d] = static_cast<scalar_t>(gv);
  }
}

void add_penalty_grad_cpu(at::TensorList grads, at::TensorList params, at::TensorList omegas,
                          at::TensorList stars, double scale) {
  constexpr const char* op = "mas_ext::add_penalty_grad_";
  TORCH_CHECK(grads.size() == params.size() && omegas.size() == params.size() && stars.size() == params.size(), op,
              ": grads, params, omegas and stars must have the same length (got ", grads.size(), ", ", params.size(),
              ", ", omegas.size(), ", ", stars.size(), ")");
  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<int64_t> numels(n, 0);  // 0 = handled below by the generic path
  std::vector<int64_t> generic;
  for (int64_t i = 0; i < n; ++i) {
    const Tensor &g = grads[i], &p = params[i], &o = omegas[i], &s = stars[i];
    TORCH_CHECK(g.defined(), op, ": grads[", i, "] is undefined (the parameter has no .grad)");
    TORCH_CHECK(g.device().is_cpu() && p.device().is_cpu() && o.device().is_cpu() && s.device().is_cpu(), op,
                ": tensors of entry ", i, " must all be on the CPU");
    TORCH_CHECK(!g.is_sparse(), op, ": grads[", i, "] is sparse; add the penalty to a dense gradient");
    TORCH_CHECK(g.sizes().equals(p.sizes()) && o.sizes().equals(p.sizes()) && s.sizes().equals(p.sizes()), op,
                ": grads[", i, "], omegas[", i, "] and stars[", i, "] must have the shape of params[", i, "] ",
                p.sizes());
    TORCH_CHECK(o.scalar_type() == at::kFloat, op, ": omegas[", i, "] must be float32, got ", o.scalar_type());
    TORCH_CHECK(at::isFloatingType(g.scalar_type()) && at::isFloatingType(p.scalar_type()), op,
                ": entry ", i, " must be a floating-point parameter and gradient");
    const bool fast = is_fused_dtype(p.scalar_type()) && g.scalar_type() == p.scalar_type() &&
                      s.scalar_type() == p.scalar_type() && p.is_non_overlapping_and_dense() &&
                      same_layout(g, p) && same_layout(o, p) && same_layout(s, p);
    if (fast) numels[i] = p.numel();
    else generic.push_back(i);
  }
  // Unusual layouts or mixed dtypes: the same formula with ATen ops, in (at least) float32.
  for (int64_t i : generic) {
    const auto math = at::promote_types(at::promote_types(params[i].scalar_type(), grads[i].scalar_type()), at::kFloat);
    Tensor d = params[i].to(math).sub(stars[i].to(math)).mul_(omegas[i].to(math));
    Tensor gm = grads[i].to(math).add_(d, scale);
    grads[i].copy_(gm);
  }
  for_each_chunk(numels, [&](int64_t t, int64_t b, int64_t e) {
    MAS_DISPATCH(params[t].scalar_type(), "add_penalty_grad_", [&] {
      penalty_chunk<scalar_t>(ptr_or_null<scalar_t>(grads[t]), ptr_or_null<scalar_t>(params[t]),
                              ptr_or_null<float>(omegas[t]), ptr_or_null<scalar_t>(stars[t]), scale, b, e);
    });
  });
}

// =================================================================================
// Shared by the two optimizer kernels.
//
// The per-element code must be straight-line for the compiler to keep it vectorised (a branch in
// the loop body makes GCC scalarise the generic Vectorized), so every option is either a template
// parameter (penalty, amsgrad, L2 weight decay, momentum mode, nesterov, lerp's formula, grad
// unscaling) or exact branch-free arithmetic: maximize multiplies by ±1 (exactly a negation) and
// AdamW's decay multiplies by 1 when it is off.
// =================================================================================
// Calls f(std::integral_constant<bool, b>) so a runtime flag becomes a template argument.
template <typename F>
C10_ALWAYS_INLINE void with_bool(bool b, const F& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

// =================================================================================
// SGD
// =================================================================================
struct SGDArgs {
  double penalty_scale, lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first_step;
  std::optional<float> grad_scale;
};

// Scalar constants: float for float/half/bfloat16 params (torch casts its double scalars to the
// tensor's opmath type), double for double params.
template <typename T, typename opmath_t>
struct SGDConsts {
  T pscale, lr_neg, momentum, one_minus_damp, wd, sign, inv;
  explicit SGDConsts(const SGDArgs& a)
      : pscale(static_cast<opmath_t>(a.penalty_scale)),
        lr_neg(static_cast<opmath_t>(-a.lr)),
        momentum(static_cast<opmath_t>(a.momentum)),
        one_minus_damp(static_cast<opmath_t>(1.0 - a.dampening)),
        wd(static_cast<opmath_t>(a.weight_decay)),
        sign(static_cast<opmath_t>(a.maximize ? -1.0 : 1.0)),
        inv(static_cast<opmath_t>(a.grad_scale ? *a.grad_scale : 1.0f)) {}
};

enum Mom : int { kNoMomentum = 0, kMomentum = 1, kMomentumFirst = 2 };

// One element (or one vector of elements) of torch.optim.SGD on grad + penalty, in torch's order.
template <bool kPen, int kMom, bool kNest, bool kL2, typename T, typename K>
C10_ALWAYS_INLINE void sgd_elem(T& p, T g, T& buf, const T& om, const T& st, const K& k) {
  if constexpr (kPen) g = g + k.pscale * om * (p - st);   // the loss-term gradient of R(θ)
  g = g * k.sign;                                          // maximize: -grad (exact)
  if constexpr (kL2) g = g + k.wd * p;                     // grad.add(param, alpha=wd)
  if constexpr (kMom == kMomentumFirst) buf = g;           // buf = grad.clone()
  if constexpr (kMom == kMomentum) buf = buf * k.momentum + k.one_minus_damp * g;  // mul_(m).add_(g, alpha=1-d)
  if constexpr (kMom != kNoMomentum) g = kNest ? g + k.momentum * buf : buf;
  p = p + k.lr_neg * g;                                    // param.add_(g, alpha=-lr)
}

struct SGDTensor {
  void *p, *g, *buf;
  const float* om;
  const void* st;
};

template <typename scalar_t, bool kPen, int kMom, bool kNest, bool kL2, bool kUnscale>
void sgd_chunk(const SGDTensor& tensor, int64_t begin, int64_t end, const SGDArgs& a) {
  using A = Access<scalar_t>;
  using opmath_t = typename A::opmath_t;
  using OVec = typename A::OVec;
  auto* p = static_cast<scalar_t*>(tensor.p);
  auto* g = static_cast<scalar_t*>(tensor.g);
  auto* buf = static_cast<scalar_t*>(tensor.buf);
  const float* om = tensor.om;
  const auto* st = static_cast<const scalar_t*>(tensor.st);
  int64_t d = begin;
  if constexpr (A::kVectorized) {
    const SGDConsts<OVec, opmath_t> k(a);
    for (; d + A::kStep <= end; d += A::kStep) {
      OVec P[A::kN], G[A::kN], B[A::kN], O[A::kN], S[A::kN];
      A::load(p + d, P);
      A::load(g + d, G);
      if constexpr (kMom == kMomentum) A::load(buf + d, B);
      if constexpr (kPen) {
        A::load_omega(om + d, O);
        A::load(st + d, S);
      }
      if constexpr (kUnscale) {
        for (int j = 0; j < A::kN; ++j) G[j] = G[j] / k.inv;
        A::store(g + d, G);                                // grads are left unscaled, as torch's fused steps do
      }
      for (int j = 0; j < A::kN; ++j) sgd_elem<kPen, kMom, kNest, kL2>(P[j], G[j], B[j], O[j], S[j], k);
      A::store(p + d, P);
      if constexpr (kMom != kNoMomentum) A::store(buf + d, B);
    }
  }
  const SGDConsts<opmath_t, opmath_t> k(a);
  for (; d < end; ++d) {
    opmath_t pv = p[d], gv = g[d], bv = kMom == kMomentum ? opmath_t(buf[d]) : opmath_t(0);
    const opmath_t ov = kPen ? opmath_t(om[d]) : opmath_t(0), sv = kPen ? opmath_t(st[d]) : opmath_t(0);
    if constexpr (kUnscale) {
      gv = gv / k.inv;
      g[d] = static_cast<scalar_t>(gv);
    }
    sgd_elem<kPen, kMom, kNest, kL2>(pv, gv, bv, ov, sv, k);
    p[d] = static_cast<scalar_t>(pv);
    if constexpr (kMom != kNoMomentum) buf[d] = static_cast<scalar_t>(bv);
  }
}

template <typename scalar_t>
void sgd_dispatch(const SGDTensor& t, int64_t b, int64_t e, const SGDArgs& a) {
  const int mom = a.momentum == 0 ? kNoMomentum : (a.first_step ? kMomentumFirst : kMomentum);
  with_bool(t.om != nullptr, [&](auto pen) {
    with_bool(a.weight_decay != 0, [&](auto l2) {
      with_bool(a.grad_scale.has_value(), [&](auto unscale) {
        constexpr bool kPen = decltype(pen)::value, kL2 = decltype(l2)::value, kUn = decltype(unscale)::value;
        if (mom == kNoMomentum) {
          sgd_chunk<scalar_t, kPen, kNoMomentum, false, kL2, kUn>(t, b, e, a);
          return;
        }
        with_bool(a.nesterov, [&](auto nest) {
          constexpr bool kNest = decltype(nest)::value;
          if (mom == kMomentum) sgd_chunk<scalar_t, kPen, kMomentum, kNest, kL2, kUn>(t, b, e, a);
          else sgd_chunk<scalar_t, kPen, kMomentumFirst, kNest, kL2, kUn>(t, b, e, a);
        });
      });
    });
  });
}

void fused_sgd_mas_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                       const c10::List<std::optional<Tensor>>& omegas, const c10::List<std::optional<Tensor>>& stars,
                       double penalty_scale, double lr, double momentum, double dampening, double weight_decay,
                       bool nesterov, bool maximize, bool is_first_step, const std::optional<Tensor>& grad_scale,
                       const std::optional<Tensor>& found_inf) {
  constexpr const char* op = "mas_ext::fused_sgd_mas_";
  check_param_list(op, params);
  check_aligned(op, "grads", grads, params, true);
  if (momentum != 0) check_aligned(op, "momentum_buffers", momentum_buffers, params, true);
  else TORCH_CHECK(momentum_buffers.empty(), op, ": momentum_buffers must be empty when momentum == 0");
  std::vector<Tensor> oms, sts;
  check_penalty(op, omegas, stars, params, oms, sts);
  if (should_skip(found_inf)) return;

  const SGDArgs a{penalty_scale, lr, momentum, dampening, weight_decay, nesterov, maximize, is_first_step,
                  read_grad_scale(grad_scale)};
  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<SGDTensor> ts(n);
  std::vector<int64_t> numels(n);
  for (int64_t i = 0; i < n; ++i) {
    ts[i] = {params[i].data_ptr(), grads[i].data_ptr(), momentum != 0 ? momentum_buffers[i].data_ptr() : nullptr,
             ptr_or_null<float>(oms[i]), sts[i].defined() ? sts[i].data_ptr() : nullptr};
    numels[i] = params[i].numel();
  }
  for_each_chunk(numels, [&](int64_t t, int64_t b, int64_t e) {
    MAS_DISPATCH(params[t].scalar_type(), "fused_sgd_mas_", [&] { sgd_dispatch<scalar_t>(ts[t], b, e, a); });
  });
}

// =================================================================================
// Adam / AdamW
// =================================================================================
struct AdamArgs {
  double penalty_scale, lr, beta1, beta2, weight_decay, eps;
  bool amsgrad, maximize, decoupled;
  std::optional<float> grad_scale;
};

struct AdamTensor {
  void *p, *g, *m, *v, *vmax;
  const float* om;
  const void* st;
  double step_size;  // lr / (1 - beta1^t)
  double bc2_sqrt;   // (1 - beta2^t) ** 0.5
};

template <typename T, typename opmath_t>
struct AdamConsts {
  T pscale, sign, wd, decay, w, one_minus_w, beta2, one_minus_beta2, eps, neg_step_size, bc2_sqrt, inv;
  AdamConsts(const AdamArgs& a, const AdamTensor& t)
      : pscale(static_cast<opmath_t>(a.penalty_scale)),
        sign(static_cast<opmath_t>(a.maximize ? -1.0 : 1.0)),
        wd(static_cast<opmath_t>(a.weight_decay)),
        decay(static_cast<opmath_t>(a.decoupled && a.weight_decay != 0 ? 1.0 - a.lr * a.weight_decay : 1.0)),
        w(static_cast<opmath_t>(1.0 - a.beta1)),
        one_minus_w(opmath_t(1) - static_cast<opmath_t>(1.0 - a.beta1)),
        beta2(static_cast<opmath_t>(a.beta2)),
        one_minus_beta2(static_cast<opmath_t>(1.0 - a.beta2)),
        eps(static_cast<opmath_t>(a.eps)),
        neg_step_size(static_cast<opmath_t>(-t.step_size)),
        bc2_sqrt(static_cast<opmath_t>(t.bc2_sqrt)),
        inv(static_cast<opmath_t>(a.grad_scale ? *a.grad_scale : 1.0f)) {}
};

// torch's lerp picks its formula by the weight: |w| < 0.5 -> m + w (g − m), else g − (g − m)(1 − w).
inline bool lerp_weight_small(double beta1) { return std::abs(static_cast<float>(1.0 - beta1)) < 0.5f; }

// One element (or vector) of torch.optim.Adam/AdamW (single-tensor path) on grad + penalty.
template <bool kPen, bool kAms, bool kL2, bool kSmallW, typename T, typename K>
C10_ALWAYS_INLINE void adam_elem(T& p, T g, T& m, T& v, T& vm, const T& om, const T& st, const K& k) {
  if constexpr (kPen) g = g + k.pscale * om * (p - st);  // the loss-term gradient of R(θ), at θ before decay
  g = g * k.sign;                                         // maximize: -grad (exact)
  if constexpr (kL2) g = g + k.wd * p;                    // grad.add(param, alpha=wd)
  p = p * k.decay;                                        // AdamW: param.mul_(1 - lr*wd); 1 otherwise (exact)
  if constexpr (kSmallW) m = m + k.w * (g - m);          // exp_avg.lerp_(grad, 1 - beta1)
  else m = g - (g - m) * k.one_minus_w;
  v = v * k.beta2 + k.one_minus_beta2 * g * g;            // exp_avg_sq.mul_(b2).addcmul_(g, g, value=1-b2)
  T denom;
  if constexpr (kAms) {
    vm = vmax(vm, v);                                     // torch.maximum(max_exp_avg_sq, exp_avg_sq)
    denom = vsqrt(vm) / k.bc2_sqrt + k.eps;
  } else {
    denom = vsqrt(v) / k.bc2_sqrt + k.eps;                // (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
  }
  p = p + k.neg_step_size * m / denom;                    // param.addcdiv_(exp_avg, denom, value=-step_size)
}

template <typename scalar_t, bool kPen, bool kAms, bool kL2, bool kUnscale, bool kSmallW>
void adam_chunk(const AdamTensor& tensor, int64_t begin, int64_t end, const AdamArgs& a) {
  using A = Access<scalar_t>;
  using opmath_t = typename A::opmath_t;
  using OVec = typename A::OVec;
  auto* p = static_cast<scalar_t*>(tensor.p);
  auto* g = static_cast<scalar_t*>(tensor.g);
  auto* m = static_cast<scalar_t*>(tensor.m);
  auto* v = static_cast<scalar_t*>(tensor.v);
  auto* vm = static_cast<scalar_t*>(tensor.vmax);
  const float* om = tensor.om;
  const auto* st = static_cast<const scalar_t*>(tensor.st);
  int64_t d = begin;
  if constexpr (A::kVectorized) {
    const AdamConsts<OVec, opmath_t> k(a, tensor);
    for (; d + A::kStep <= end; d += A::kStep) {
      OVec P[A::kN], G[A::kN], M[A::kN], V[A::kN], VM[A::kN], O[A::kN], S[A::kN];
      A::load(p + d, P);
      A::load(g + d, G);
      A::load(m + d, M);
      A::load(v + d, V);
      if constexpr (kAms) A::load(vm + d, VM);
      if constexpr (kPen) {
        A::load_omega(om + d, O);
        A::load(st + d, S);
      }
      if constexpr (kUnscale) {
        for (int j = 0; j < A::kN; ++j) G[j] = G[j] / k.inv;
        A::store(g + d, G);                               // grads are left unscaled, as torch's fused steps do
      }
      for (int j = 0; j < A::kN; ++j) adam_elem<kPen, kAms, kL2, kSmallW>(P[j], G[j], M[j], V[j], VM[j], O[j], S[j], k);
      A::store(p + d, P);
      A::store(m + d, M);
      A::store(v + d, V);
      if constexpr (kAms) A::store(vm + d, VM);
    }
  }
  const AdamConsts<opmath_t, opmath_t> k(a, tensor);
  for (; d < end; ++d) {
    opmath_t pv = p[d], gv = g[d], mv = m[d], vv = v[d], vmv = kAms ? opmath_t(vm[d]) : opmath_t(0);
    const opmath_t ov = kPen ? opmath_t(om[d]) : opmath_t(0), sv = kPen ? opmath_t(st[d]) : opmath_t(0);
    if constexpr (kUnscale) {
      gv = gv / k.inv;
      g[d] = static_cast<scalar_t>(gv);
    }
    adam_elem<kPen, kAms, kL2, kSmallW>(pv, gv, mv, vv, vmv, ov, sv, k);
    p[d] = static_cast<scalar_t>(pv);
    m[d] = static_cast<scalar_t>(mv);
    v[d] = static_cast<scalar_t>(vv);
    if constexpr (kAms) vm[d] = static_cast<scalar_t>(vmv);
  }
}

template <typename scalar_t>
void adam_dispatch(const AdamTensor& t, int64_t b, int64_t e, const AdamArgs& a) {
  with_bool(t.om != nullptr, [&](auto pen) {
    with_bool(a.amsgrad, [&](auto ams) {
      with_bool(a.weight_decay != 0 && !a.decoupled, [&](auto l2) {
        with_bool(a.grad_scale.has_value(), [&](auto unscale) {
          with_bool(lerp_weight_small(a.beta1), [&](auto small_w) {
            adam_chunk<scalar_t, decltype(pen)::value, decltype(ams)::value, decltype(l2)::value,
                       decltype(unscale)::value, decltype(small_w)::value>(t, b, e, a);
          });
        });
      });
    });
  });
}

void fused_adam_mas_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                        const c10::List<std::optional<Tensor>>& omegas, const c10::List<std::optional<Tensor>>& stars,
                        double penalty_scale, double lr, double beta1, double beta2, double weight_decay, double eps,
                        bool amsgrad, bool maximize, bool decoupled_weight_decay,
                        const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  constexpr const char* op = "mas_ext::fused_adam_mas_";
  check_param_list(op, params);
  check_aligned(op, "grads", grads, params, true);
  check_aligned(op, "exp_avgs", exp_avgs, params, true);
  check_aligned(op, "exp_avg_sqs", exp_avg_sqs, params, true);
  if (amsgrad) check_aligned(op, "max_exp_avg_sqs", max_exp_avg_sqs, params, true);
  else TORCH_CHECK(max_exp_avg_sqs.empty(), op, ": max_exp_avg_sqs must be empty when amsgrad is False");
  TORCH_CHECK(state_steps.size() == params.size(), op, ": state_steps needs one tensor per param");
  for (size_t i = 0; i < state_steps.size(); ++i) {
    TORCH_CHECK(state_steps[i].numel() == 1 && state_steps[i].device().is_cpu(), op, ": state_steps[", i,
                "] must be a one-element CPU tensor");
  }
  std::vector<Tensor> oms, sts;
  check_penalty(op, omegas, stars, params, oms, sts);
  if (should_skip(found_inf)) return;  // params, state and step counters all unchanged

  const AdamArgs a{penalty_scale, lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay,
                   read_grad_scale(grad_scale)};
  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<AdamTensor> ts(n);
  std::vector<int64_t> numels(n);
  for (int64_t i = 0; i < n; ++i) {
    state_steps[i].add_(1);
    // Bias corrections in double, exactly as torch.optim's Python computes them.
    const double step = state_steps[i].item<double>();
    const double bc1 = 1 - std::pow(beta1, step);
    const double bc2 = 1 - std::pow(beta2, step);
    ts[i] = {params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
             amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr, ptr_or_null<float>(oms[i]),
             sts[i].defined() ? sts[i].data_ptr() : nullptr, lr / bc1, std::pow(bc2, 0.5)};
    numels[i] = params[i].numel();
  }
  for_each_chunk(numels, [&](int64_t t, int64_t b, int64_t e) {
    MAS_DISPATCH(params[t].scalar_type(), "fused_adam_mas_", [&] { adam_dispatch<scalar_t>(ts[t], b, e, a); });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mas_ext, m) {
  m.def("add_penalty_grad_(Tensor(a!)[] grads, Tensor[] params, Tensor[] omegas, Tensor[] stars, float scale) -> ()");
  m.def(
      "fused_sgd_mas_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, Tensor?[] omegas, "
      "Tensor?[] stars, *, float penalty_scale, float lr, float momentum, float dampening, float weight_decay, "
      "bool nesterov, bool maximize, bool is_first_step, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "fused_adam_mas_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, Tensor?[] omegas, Tensor?[] stars, *, "
      "float penalty_scale, float lr, float beta1, float beta2, float weight_decay, float eps, bool amsgrad, "
      "bool maximize, bool decoupled_weight_decay, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
}

TORCH_LIBRARY_IMPL(mas_ext, CPU, m) {
  m.impl("add_penalty_grad_", &add_penalty_grad_cpu);
  m.impl("fused_sgd_mas_", &fused_sgd_mas_cpu);
  m.impl("fused_adam_mas_", &fused_adam_mas_cpu);
}

}  // namespace mas_ext
