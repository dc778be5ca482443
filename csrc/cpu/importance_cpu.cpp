// CPU kernels for the exact per-sample MAS importance of Linear and Conv layers.
//
// Both ops add Σ_k |∂_k| into float32 accumulators, where ∂_k is sample k's
// weight gradient for the given grad_output (the back-propagated gradient of
// ‖f(x)‖² for g-MAS, the layer's own output for l-MAS). No op ever holds the
// N per-sample gradients: each thread owns one weight-sized accumulator, so the
// workspace is bounded by the thread count, not by the batch size.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "importance_shapes.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MAS_EXT_AVX2_KERNEL 1
#endif

namespace mas_ext {
namespace {

using Vec = at::vec::Vectorized<float>;

// Bound on the floats of the |G|, |A| copies of the no-positions Linear path (512 KiB).
constexpr int64_t kAbsChunkElems = int64_t{1} << 17;

// acc[i] += |src[i]| for n floats.
void abs_accumulate(float* acc, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    (Vec::loadu(acc + i) + Vec::loadu(src + i).abs()).store(acc + i);
  }
  for (; i < n; ++i) acc[i] += std::abs(src[i]);
}

// One float32 accumulator per thread of an at::parallel_for over `items` work items: thread 0 adds straight
// into `out` (the caller's float32 accumulator, so one thread needs no buffer at all), the others into
// private buffers that reduce() adds into `out` at the end. The buffers are one tensor made on the calling
// thread (every workspace here is: torch's allocator, and its profiler, see them all).
struct ThreadAccumulators {
  ThreadAccumulators(const at::Tensor& out, int64_t items)
      : out(out.data_ptr<float>()), numel(out.numel()),
        data(at::zeros({std::max<int64_t>(0, std::min<int64_t>(at::get_num_threads(), items) - 1), numel},
                       out.options())) {}
  float* get() {
    const int t = at::get_thread_num();
    return t == 0 ? out : data.data_ptr<float>() + (t - 1) * numel;
  }
  void reduce() {
    const int64_t extra = data.size(0);
    if (extra == 0) return;
    const float* d = data.data_ptr<float>();
    at::parallel_for(0, numel, 4096, [&](int64_t b, int64_t e) {
      for (int64_t t = 0; t < extra; ++t)
        for (int64_t i = b; i < e; ++i) out[i] += d[t * numel + i];
    });
  }
  float* out;
  int64_t numel;
  at::Tensor data;
};

// Per-thread scratch of `shape` for an at::parallel_for: one tensor (threads, *shape) made on the calling
// thread; slot() is the calling thread's.
struct ThreadScratch {
  ThreadScratch(at::IntArrayRef shape, const at::TensorOptions& options) {
    std::vector<int64_t> full{at::get_num_threads()};
    full.insert(full.end(), shape.begin(), shape.end());
    data = at::empty(full, options);
  }
  at::Tensor slot() const { return data[at::get_thread_num()]; }
  at::Tensor data;
};

// Rows of the (O, I) accumulator one work item covers: about `tile_elems` floats, sized to stay in the L2
// cache across the item's samples (the GEMM-then-|·| path: 2^15 floats, its gradient tile of the same size
// beside them; the register kernel: 2^17 floats, or a whole L2 where a core has less than 512 KiB. 2^17 was the
// best of 2^15..2^17 on a 512 KiB L2 (AVX2, Linear layers), and on a 1 MiB L2 (Zen 5) it beat the whole L2 by
// up to 20% on ResNet's 4×4 convs of 512 channels (AVX-512) and tied with it on other convs and on Linear
// layers: the packed operands streaming through the L2 need their share of it). The tile count is rounded
// up to a multiple of the thread count (threads then get equal shares) and the rows to a multiple of
// `multiple` (the register kernel's row block).
constexpr int64_t kGemmTileElems = int64_t{1} << 15;

int64_t register_tile_elems() {
  static const int64_t elems = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);  // bytes per core; 0 or -1 where unknown
    return l2 > 0 ? std::clamp<int64_t>(l2 / 4, kGemmTileElems, int64_t{1} << 17) : int64_t{1} << 17;
  }();
  return elems;
}

int64_t tile_rows(int64_t O, int64_t I, int64_t threads, int64_t multiple, int64_t tile_elems) {
  const int64_t cache_rows = std::max<int64_t>(1, tile_elems / std::max<int64_t>(I, 1));
  int64_t tiles = (O + cache_rows - 1) / cache_rows;
  tiles = (tiles + threads - 1) / threads * threads;
  const int64_t rows = (O + tiles - 1) / tiles;
  return std::min<int64_t>(std::max<int64_t>(O, 1), (rows + multiple - 1) / multiple * multiple);
}

// The work split of the per-sample importance GEMMs into out (O, I) over N samples. Tile-major: a work item
// is one row tile [r0, r1) over a run of samples [k0, k1), so the accumulator's tile stays in cache across
// those samples. With at least as many tiles as threads, threads own disjoint tiles of `out` and need no
// buffers of their own; with fewer, the samples are split too, each extra thread adding into an (O, I)
// buffer of its own. Each thread also gets a float32 scratch of scratch_elems(rows) floats (rows: the tile
// height). body(acc, scratch, r0, r1, k0, k1) adds its item into the (O, I) accumulator `acc`; rows are a
// multiple of `multiple` (but the last).
template <typename ScratchElems, typename Body>
void for_each_row_tile(const at::Tensor& out, int64_t N, int64_t multiple, int64_t tile_elems,
                       ScratchElems scratch_elems, Body body) {
  const int64_t O = out.size(0), I = out.numel() / std::max<int64_t>(O, 1);
  const int64_t threads = at::get_num_threads();
  const int64_t rows = tile_rows(O, I, threads, multiple, tile_elems), tiles = (O + rows - 1) / rows;
  const int64_t splits = tiles >= threads ? 1 : std::min<int64_t>(N, (threads + tiles - 1) / tiles);
  const int64_t per_split = (N + splits - 1) / splits;
  std::optional<ThreadAccumulators> acc;
  if (splits > 1) acc.emplace(out, tiles * splits);
  ThreadScratch scratch({scratch_elems(rows)}, out.options());
  float* const direct = out.data_ptr<float>();
  at::parallel_for(0, tiles * splits, 1, [&](int64_t begin, int64_t end) {
    float* wacc = acc ? acc->get() : direct;
    const at::Tensor own = scratch.slot();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r0 = (item / splits) * rows, r1 = std::min(O, r0 + rows);
      const int64_t k0 = (item % splits) * per_split, k1 = std::min(N, k0 + per_split);
      body(wacc, own, r0, r1, k0, k1);
    }
  });
  if (acc) acc->reduce();
}

// out (O, I) += Σ_k |G_kᵀ A_k + extra_k| for a (N, P, I), g (N, P, O) float32 contiguous, where
// extra(k, r0, rows, tile) may add to rows [r0, r0 + rows) of sample k's gradient before |·| (tied
// embeddings): each row tile of a sample's gradient is made by a GEMM into a cached buffer, then its |·|
// accumulated. No thread ever holds more than one tile of one sample's gradient.
template <typename Extra>
void per_sample_abs_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& g, Extra extra) {
  const int64_t N = a.size(0), I = a.size(2);
  std::vector<at::Tensor> gt, ak;  // per-sample operands, made once: (O, P) transposed view and (P, I)
  for (int64_t k = 0; k < N; ++k) gt.push_back(g[k].t()), ak.push_back(a[k]);
  for_each_row_tile(out, N, 1, kGemmTileElems, [&](int64_t rows) { return rows * I; },
                    [&](float* acc, const at::Tensor& scratch, int64_t r0, int64_t r1, int64_t k0, int64_t k1) {
    auto t = scratch.narrow(0, 0, (r1 - r0) * I).view({r1 - r0, I});
    for (int64_t k = k0; k < k1; ++k) {
      at::mm_out(t, gt[k].narrow(0, r0, r1 - r0), ak[k]);  // rows [r0, r1) of sample k's weight gradient
      extra(k, r0, r1 - r0, t.data_ptr<float>());
      abs_accumulate(acc + r0 * I, t.data_ptr<float>(), (r1 - r0) * I);
    }
  });
}

void check_accumulator(const at::Tensor& acc, const char* what, at::IntArrayRef shape) {
  TORCH_CHECK(acc.scalar_type() == at::kFloat, what, " accumulator must be float32, got ", acc.scalar_type());
  TORCH_CHECK(acc.is_contiguous(), what, " accumulator must be contiguous");
  TORCH_CHECK(acc.sizes().equals(shape), what, " accumulator has shape ", acc.sizes(), ", expected ", shape);
  TORCH_CHECK(acc.device().is_cpu(), what, " accumulator must be on the CPU");
}

void check_activation(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be a CPU tensor");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), what, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

// One sample's embedding rows for the tied kernel: rows (Q, D); for gradient row v, first[v] is the first q
// with index v (or -1) and next[q] the following one.
struct SampleRows {
  const int32_t* first;
  const int32_t* next;
  const float* rows;
  int64_t D;
};

#ifdef MAS_EXT_AVX2_KERNEL
// The register kernels: acc[o, i] += |Σ_p g[p, o] a[p, i] (+ the sample's embedding rows with index o)| for
// rows o in [r0, r1) and all I columns of one sample, its gradient made in registers one tile at a time (AVX2:
// 6 rows × 16 columns in 12 ymm accumulators; AVX-512: 12 rows × 32 columns in 24 zmm) and its |·| added to
// the accumulator straight from them, so the per-sample gradient never reaches memory. The operands are packed
// first, each written in sequence, so the P loop streams through memory instead of striding by I and O (with
// I or O a multiple of 1024 every row fell into one L1 set): a as strips of P × `width` floats (pack_strips;
// columns past I are zero) and g's rows [r0, r1) as panels of P × `rows` floats (pack_panels; rows past r1
// are zero). The rows and columns past the ends take the same register tile: their sums are computed and not
// stored.
struct RegisterTile {
  int64_t rows, width;
  int64_t strips_elems(int64_t P, int64_t I) const { return (I + width - 1) / width * width * P; }
  int64_t panels_elems(int64_t P, int64_t n) const { return (n + rows - 1) / rows * rows * P; }
};

// a (P, I) row-major. (A conv's im2col writes its strips itself: im2col3d.)
void pack_strips(const float* a, int64_t P, int64_t I, int64_t width, float* out) {
  for (int64_t i0 = 0; i0 < I; i0 += width, out += width * P) {
    const int64_t w = std::min(width, I - i0);
    for (int64_t p = 0; p < P; ++p) {
      std::copy(a + p * I + i0, a + p * I + i0 + w, out + p * width);
      std::fill(out + p * width + w, out + (p + 1) * width, 0.f);
    }
  }
}

// g(p, o) = g[p * sp + o * so] for rows [r0, r1): (P, O) row-major has (sp, so) = (O, 1), (O, P) (1, P).
void pack_panels(const float* g, int64_t P, int64_t r0, int64_t r1, int64_t sp, int64_t so, int64_t rows, float* out) {
  for (int64_t o = r0; o < r1; o += rows, out += rows * P) {
    const int64_t valid = std::min(rows, r1 - o);
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = g + (o + r) * so;
      for (int64_t p = 0; p < P; ++p) out[p * rows + r] = r < valid ? src[p * sp] : 0.f;
    }
  }
}

// Columns [i0, i0 + w) of the sample's embedding row q, which starts a tied weight's register tile (a strip's
// last columns through `edge`, zero past w). The kernels take the rows only where kExtra: without them the
// compiler keeps the whole tile in registers only if nothing indexes it with a run-time row, hence two
// instantiations and unrolled row loops.
inline const float* extra_row(const SampleRows* extra, int32_t q, int64_t i0, int64_t w, int64_t width, float* edge) {
  const float* src = extra->rows + q * extra->D + i0;
  if (w == width) return src;
  std::fill(edge, edge + width, 0.f);
  std::copy(src, src + w, edge);
  return edge;
}

// The register kernel for each instruction set: one body (register_kernel.inc) over each set's vector type.
namespace avx2 {
#define MAS_EXT_ISA_TARGET "avx2,fma"
struct Isa {
  using V = __m256;
  static constexpr int kLanes = 8, kRows = 6;
  __attribute__((target(MAS_EXT_ISA_TARGET))) static V zero() { return _mm256_setzero_ps(); }
  __attribute__((target(MAS_EXT_ISA_TARGET))) static V load(const float* p) { return _mm256_loadu_ps(p); }
  __attribute__((target(MAS_EXT_ISA_TARGET))) static V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  __attribute__((target(MAS_EXT_ISA_TARGET))) static V add(V a, V b) { return _mm256_add_ps(a, b); }
  __attribute__((target(MAS_EXT_ISA_TARGET))) static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  __attribute__((target(MAS_EXT_ISA_TARGET))) static V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  __attribute__((target(MAS_EXT_ISA_TARGET))) static void store(float* p, V a) { _mm256_storeu_ps(p, a); }
};
#include "register_kernel.inc"
#undef MAS_EXT_ISA_TARGET
}  // namespace avx2

namespace avx512 {
#define MAS_EXT_ISA_TARGET "avx512f"
struct Isa {
  using V = __m512;
  static constexpr int kLanes = 16, kRows = 12;
  __attribute__((target(MAS_EXT_ISA_TARGET))) static V zero() { return _mm512_setzero_ps(); }
  __attribute__((target(MAS_EXT_ISA_TARGET))) static V load(const float* p) { return _mm512_loadu_ps(p); }
  __attribute__((target(MAS_EXT_ISA_TARGET))) static V broadcast(const float* p) { return _mm512_set1_ps(*p); }
  __attribute__((target(MAS_EXT_ISA_TARGET))) static V add(V a, V b) { return _mm512_add_ps(a, b); }
  __attribute__((target(MAS_EXT_ISA_TARGET))) static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  __attribute__((target(MAS_EXT_ISA_TARGET))) static V abs(V a) { return _mm512_abs_ps(a); }
  __attribute__((target(MAS_EXT_ISA_TARGET))) static void store(float* p, V a) { _mm512_storeu_ps(p, a); }
};
#include "register_kernel.inc"
#undef MAS_EXT_ISA_TARGET
}  // namespace avx512

// The register kernel this CPU runs, or none (the caller then takes the GEMM-then-|·| path): AVX-512 where
// the CPU has it, else AVX2 with FMA. MAS_EXT_CPU_KERNEL=avx2 or =generic forces the AVX2 kernel or the
// GEMM path (the tests run all three on machines that have AVX-512).
struct RegisterKernel {
  const char* name;
  RegisterTile tile;
  void (*run)(float*, const float*, const float*, int64_t, int64_t, int64_t, int64_t, const SampleRows*);
  void (*run_extra)(float*, const float*, const float*, int64_t, int64_t, int64_t, int64_t, const SampleRows*);
};

// The choice, made once per process: the kernel (none: the GEMM path) and what cpu_kernel_name() says of it.
struct KernelChoice {
  const RegisterKernel* kernel;
  std::string name;
};

const KernelChoice& kernel_choice() {
  static const RegisterKernel avx512{"AVX-512 register kernel", {avx512::Isa::kRows, 2 * avx512::Isa::kLanes},
                                     avx512::abs_gemm<false>, avx512::abs_gemm<true>};
  static const RegisterKernel avx2{"AVX2 register kernel", {avx2::Isa::kRows, 2 * avx2::Isa::kLanes},
                                   avx2::abs_gemm<false>, avx2::abs_gemm<true>};
  static const KernelChoice choice = [] {
    const std::string want = std::getenv("MAS_EXT_CPU_KERNEL") ? std::getenv("MAS_EXT_CPU_KERNEL") : "";
    const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const RegisterKernel* kernel = want == "generic" || !has_avx2                         ? nullptr
                                   : want != "avx2" && __builtin_cpu_supports("avx512f") ? &avx512
                                                                                         : &avx2;
    const std::string forced = want == "avx2" || want == "generic" ? ", MAS_EXT_CPU_KERNEL=" + want : "";
    return KernelChoice{kernel, (kernel ? kernel->name : "GEMM-then-|.| tiles") + forced};
  }();
  return choice;
}

const RegisterKernel* register_kernel() { return kernel_choice().kernel; }
#endif

// out (O, I) += Σ_k |G_kᵀ A_k (+ extra[k])| by the register kernel above, with per_sample_abs_gemm's work
// split; each work item packs its samples' operands into the thread's scratch. False (nothing done) where the
// CPU has no register kernel: the caller then takes per_sample_abs_gemm.
bool per_sample_abs_gemm_registers(const at::Tensor& out, const at::Tensor& a, const at::Tensor& g,
                                   const std::vector<SampleRows>* extra) {
#ifdef MAS_EXT_AVX2_KERNEL
  if (const RegisterKernel* kernel = register_kernel()) {
    const RegisterTile tile = kernel->tile;
    const int64_t N = a.size(0), P = a.size(1), I = a.size(2), O = g.size(2), strips = tile.strips_elems(P, I);
    const float* ap = a.data_ptr<float>();
    const float* gp = g.data_ptr<float>();
    for_each_row_tile(out, N, tile.rows, register_tile_elems(), [&](int64_t rows) { return strips + tile.panels_elems(P, rows); },
                      [&](float* acc, const at::Tensor& scratch, int64_t r0, int64_t r1, int64_t k0, int64_t k1) {
      float* const apack = scratch.data_ptr<float>();
      float* const gpack = apack + strips;
      for (int64_t k = k0; k < k1; ++k) {
        pack_strips(ap + k * P * I, P, I, tile.width, apack);
        pack_panels(gp + k * P * O, P, r0, r1, O, 1, tile.rows, gpack);
        (extra ? kernel->run_extra : kernel->run)(acc, apack, gpack, P, I, r0, r1, extra ? &(*extra)[k] : nullptr);
      }
    });
    return true;
  }
#endif
  return false;
}

// input (N, P, I), grad_out (N, P, O): omega_w (O, I) += Σ_k |Σ_p g_kp a_kpᵀ|, omega_b (O) += Σ_k |Σ_p g_kp|.
void linear_importance_cpu(at::Tensor& omega_w, const std::optional<at::Tensor>& omega_b, const at::Tensor& input,
                           const at::Tensor& grad_out) {
  check_activation(input, "input");
  check_activation(grad_out, "grad_out");
  TORCH_CHECK(input.dim() == 3 && grad_out.dim() == 3, "linear_importance_: input and grad_out must be (N, P, features), got ",
              input.sizes(), " and ", grad_out.sizes());
  TORCH_CHECK(input.size(0) == grad_out.size(0) && input.size(1) == grad_out.size(1),
              "linear_importance_: input ", input.sizes(), " and grad_out ", grad_out.sizes(), " disagree on (N, P)");
  const int64_t N = input.size(0), P = input.size(1), I = input.size(2), O = grad_out.size(2);
  check_accumulator(omega_w, "weight", {O, I});
  if (omega_b) check_accumulator(*omega_b, "bias", {O});
  if (N == 0) return;
  // Detached: the worker threads of at::parallel_for run with grad mode on (it is thread-local and not
  // propagated), and mm_out refuses operands that require grad, as the input of a layer does in g-MAS.
  auto a = input.detach().to(at::kFloat).contiguous();
  auto g = grad_out.detach().to(at::kFloat).contiguous();

  if (P == 1) {
    // Σ_k |g_k a_kᵀ| = |G|ᵀ |A|: GEMMs of absolute values over chunks of samples, so the |·| copies stay
    // within a bound (kAbsChunkElems floats) whatever the batch size.
    const int64_t rows = std::max<int64_t>(64, kAbsChunkElems / std::max<int64_t>(1, O + I));
    const auto g2 = g.view({N, O}), a2 = a.view({N, I});
    for (int64_t k0 = 0; k0 < N; k0 += rows) {
      const int64_t k1 = std::min(N, k0 + rows);
      auto ga = g2.slice(0, k0, k1).abs();
      omega_w.addmm_(ga.t(), a2.slice(0, k0, k1).abs());
      if (omega_b) omega_b->add_(ga.sum(0));
    }
    return;
  }

  if (!per_sample_abs_gemm_registers(omega_w, a, g, nullptr)) {
    per_sample_abs_gemm(omega_w, a, g, [](int64_t, int64_t, int64_t, float*) {});
  }
  if (omega_b) omega_b->add_(g.sum(1).abs_().sum(0));
}

// An Embedding whose weight is also the output Linear's (tied embeddings): sample k's gradient of the shared
// (V, D) matrix is its Linear part Σ_p g_kp a_kpᵀ plus its embedding rows scattered to their indices, and
// |·| wraps the sum. input (N, P, D), grad_out (N, P, V), indices (N, Q) int64 (negative: skipped),
// rows (N, Q, D): omega (V, D) += Σ_k |Σ_p g_kp a_kpᵀ + Σ_q onehot(indices_kq) rows_kqᵀ|. As in
// linear_importance_, each thread holds one row tile of one sample's (V, D) gradient and one accumulator, never N of them.
void tied_embedding_importance_cpu(at::Tensor& omega, const at::Tensor& input, const at::Tensor& grad_out,
                                   const at::Tensor& indices, const at::Tensor& rows) {
  check_activation(input, "input");
  check_activation(grad_out, "grad_out");
  check_activation(rows, "rows");
  TORCH_CHECK(input.dim() == 3 && grad_out.dim() == 3 && rows.dim() == 3 && indices.dim() == 2,
              "tied_embedding_importance_: expected input (N, P, D), grad_out (N, P, V), indices (N, Q), rows (N, Q, D); got ",
              input.sizes(), ", ", grad_out.sizes(), ", ", indices.sizes(), ", ", rows.sizes());
  const int64_t N = input.size(0), P = input.size(1), D = input.size(2), V = grad_out.size(2), Q = indices.size(1);
  TORCH_CHECK(grad_out.size(0) == N && grad_out.size(1) == P, "tied_embedding_importance_: input ", input.sizes(),
              " and grad_out ", grad_out.sizes(), " disagree on (N, P)");
  TORCH_CHECK(indices.size(0) == N && rows.size(0) == N && rows.size(1) == Q && rows.size(2) == D,
              "tied_embedding_importance_: indices ", indices.sizes(), " and rows ", rows.sizes(),
              " do not match N = ", N, ", D = ", D);
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.device().is_cpu(), "indices must be a CPU int64 tensor");
  check_accumulator(omega, "weight", {V, D});
  if (N == 0) return;
  auto a = input.detach().to(at::kFloat).contiguous();
  auto g = grad_out.detach().to(at::kFloat).contiguous();
  auto r = rows.detach().to(at::kFloat).contiguous();
  auto idx = indices.contiguous();
  TORCH_CHECK(Q == 0 || idx.max().item<int64_t>() < V, "tied_embedding_importance_: an index is >= V = ", V);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const float* rp = r.data_ptr<float>();
  // Per sample, its rows listed by index (first[v], next[q]) for the register kernel.
  std::vector<int32_t> first(N * V, -1), next(std::max<int64_t>(N * Q, 1), -1);
  std::vector<SampleRows> lists;
  for (int64_t k = 0; k < N; ++k) {
    for (int64_t q = Q - 1; q >= 0; --q) {
      const int64_t v = ip[k * Q + q];
      if (v < 0) continue;
      next[k * Q + q] = first[k * V + v];
      first[k * V + v] = static_cast<int32_t>(q);
    }
    lists.push_back({first.data() + k * V, next.data() + k * Q, rp + k * Q * D, D});
  }
  if (per_sample_abs_gemm_registers(omega, a, g, &lists)) return;
  per_sample_abs_gemm(omega, a, g, [&](int64_t k, int64_t r0, int64_t rows, float* tile) {
    for (int64_t q = 0; q < Q; ++q) {  // sample k's embedding rows that fall in this tile
      const int64_t v = ip[k * Q + q] - r0;
      if (v < 0 || v >= rows) continue;
      const float* src = rp + (k * Q + q) * D;
      float* dst = tile + v * D;
      for (int64_t j = 0; j < D; ++j) dst[j] += src[j];
    }
  });
}

struct ConvGeom {
  int64_t C, in[3], out[3], k[3], s[3], p[3], d[3];
};

// The output columns [lo, hi) whose tap i2 reads inside an input row: xx = o2 * s - p + i2 * d in [0, in).
void tap_columns(const ConvGeom& g, int64_t i2, int64_t& lo, int64_t& hi) {
  const int64_t off = i2 * g.d[2] - g.p[2], s = g.s[2];
  lo = std::min(g.out[2], off >= 0 ? 0 : (-off + s - 1) / s);
  hi = std::max(lo, std::min(g.out[2], (g.in[2] - off + s - 1) / s));
}

// im2col of one sample, any of 1-3 spatial dims expressed as 3-D (missing dims have size 1):
// x (C, D, H, W) -> cols (C * kd * kh * kw, oD * oH * oW) = (I, L), element (i, p) written at
// out[(i / width) * width * L + p * width + i % width]: width = 1 is the row-major (I, L) matrix, the
// register kernel's width its packed strips (the last strip's columns past I zero: their sums are never stored,
// but garbage there could be denormals that slow the FMAs).
void im2col3d(const float* x, float* out, const ConvGeom& g, int64_t width) {
  const int64_t L = g.out[0] * g.out[1] * g.out[2];
  int64_t row = 0;
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t i0 = 0; i0 < g.k[0]; ++i0)
      for (int64_t i1 = 0; i1 < g.k[1]; ++i1)
        for (int64_t i2 = 0; i2 < g.k[2]; ++i2, ++row) {
          float* dst = out + (row / width) * width * L + row % width;
          const float* xc = x + c * g.in[0] * g.in[1] * g.in[2];
          for (int64_t o0 = 0; o0 < g.out[0]; ++o0) {
            const int64_t z = o0 * g.s[0] - g.p[0] + i0 * g.d[0];
            for (int64_t o1 = 0; o1 < g.out[1]; ++o1) {
              const int64_t y = o1 * g.s[1] - g.p[1] + i1 * g.d[1];
              float* drow = dst + (o0 * g.out[1] + o1) * g.out[2] * width;
              const int64_t off = i2 * g.d[2] - g.p[2], s = g.s[2];
              int64_t lo = g.out[2], hi = g.out[2];  // a row outside the input: all zero
              const float* xrow = xc;
              if (z >= 0 && z < g.in[0] && y >= 0 && y < g.in[1]) {
                tap_columns(g, i2, lo, hi);
                xrow = xc + (z * g.in[1] + y) * g.in[2] + off;
              }
              if (width == 1 && s == 1) {
                std::fill(drow, drow + lo, 0.f);
                std::copy(xrow + lo, xrow + hi, drow + lo);
                std::fill(drow + hi, drow + g.out[2], 0.f);
                continue;
              }
              for (int64_t o2 = 0; o2 < lo; ++o2) drow[o2 * width] = 0.f;
              for (int64_t o2 = lo; o2 < hi; ++o2) drow[o2 * width] = xrow[o2 * s];
              for (int64_t o2 = hi; o2 < g.out[2]; ++o2) drow[o2 * width] = 0.f;
            }
          }
        }
  if (row % width) {  // the last strip's columns past I
    float* last = out + row / width * width * L;
    for (int64_t p = 0; p < L; ++p) std::fill(last + p * width + row % width, last + (p + 1) * width, 0.f);
  }
}

// Floats of the packed im2col operands of one run of samples in conv_importance_registers (8 MiB).
constexpr int64_t kConvPackElems = int64_t{1} << 21;

// omega (O, I = C·K) += Σ_k |Σ_p g_k[:, p] cols_k[:, p]ᵀ| for groups = 1 by the register kernel, samples in
// runs: as many as fit their im2col operands in kConvPackElems floats, rounded up to a multiple of the thread
// count (a workspace bounded by the thread count, never by the batch). Per run, the threads first write each
// sample's im2col straight into the kernel's strips, then share the accumulator's row tiles over the run as
// the Linear op does, each packing its rows of g from the (O, L) layout. Against per-sample GEMMs whose
// (O, I) gradients go through memory (the path of groups > 1): ResNet-18's convs of 4×4 to 16×16 positions
// ran 1.6-2.9× faster, as fast as the batch's weight-gradient GEMM within 10-30%. False (nothing done) where
// the CPU has no register kernel or the weight's rows are narrower than one strip (a first conv layer's
// C·K = 9 columns took 2× the time of the GEMM path).
bool conv_importance_registers(at::Tensor& omega_w, const at::Tensor& x, const at::Tensor& g, const ConvGeom& geo,
                               int64_t K, int64_t L) {
#ifdef MAS_EXT_AVX2_KERNEL
  const RegisterKernel* kernel = register_kernel();
  const int64_t N = x.size(0), O = g.size(1), I = geo.C * K, sample_in = x.numel() / std::max<int64_t>(N, 1);
  if (!kernel || I < kernel->tile.width) return false;  // fewer columns than a strip: mostly zeros computed
  const RegisterTile tile = kernel->tile;
  const int64_t threads = at::get_num_threads(), per = tile.strips_elems(L, I);
  const int64_t fit = std::max<int64_t>(1, kConvPackElems / per), run = std::min(N, (fit + threads - 1) / threads * threads);
  const float* xp = x.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  auto strips = at::empty({run, per}, x.options());
  float* const sp = strips.data_ptr<float>();
  for (int64_t k0 = 0; k0 < N; k0 += run) {
    const int64_t m = std::min(run, N - k0);
    at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) im2col3d(xp + (k0 + k) * sample_in, sp + k * per, geo, tile.width);
    });
    for_each_row_tile(omega_w, m, tile.rows, register_tile_elems(), [&](int64_t rows) { return tile.panels_elems(L, rows); },
                      [&](float* acc, const at::Tensor& scratch, int64_t r0, int64_t r1, int64_t s0, int64_t s1) {
      float* const gpack = scratch.data_ptr<float>();
      for (int64_t k = s0; k < s1; ++k) {
        pack_panels(gp + (k0 + k) * O * L, L, r0, r1, 1, L, tile.rows, gpack);
        kernel->run(acc, sp + k * per, gpack, L, I, r0, r1, nullptr);
      }
    });
  }
  return true;
#else
  return false;
#endif
}

// Σ_o a[o] · b[o · s] over o in [0, n): Vec::size() partial sums where b is contiguous (s = 1).
float strided_dot(const float* a, const float* b, int64_t n, int64_t s) {
  float total = 0.f;
  int64_t o = 0;
  if (s == 1) {
    Vec acc(0.f);
    for (; o + Vec::size() <= n; o += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + o), Vec::loadu(b + o), acc);
    float lanes[Vec::size()];
    acc.store(lanes);
    for (int j = 0; j < Vec::size(); ++j) total += lanes[j];
  }
  for (; o < n; ++o) total += a[o] * b[o * s];
  return total;
}

// Depthwise (groups = C = O): sample k's weight gradient at (c, tap) is Σ_p g_k[c, p] · x_k[c, p·s − pad + tap·d],
// a dot product of a row of g with a (strided) row of x per output row, so nothing is unfolded. acc (C, K) += its
// |·|. Against the im2col + grouped GEMM path, which writes K copies of the input per sample: ConvNeXt's 7×7
// depthwise convs (96-768 channels, 56×56 to 7×7 positions) spent 5× a plain weight-gradient's time there.
void conv_importance_depthwise(float* acc, const float* x, const float* g, const ConvGeom& geo) {
  const int64_t L = geo.out[0] * geo.out[1] * geo.out[2], in = geo.in[0] * geo.in[1] * geo.in[2];
  const int64_t s = geo.s[2];
  for (int64_t c = 0; c < geo.C; ++c) {
    const float* xc = x + c * in;
    const float* gc = g + c * L;
    for (int64_t i0 = 0; i0 < geo.k[0]; ++i0)
      for (int64_t i1 = 0; i1 < geo.k[1]; ++i1)
        for (int64_t i2 = 0; i2 < geo.k[2]; ++i2) {
          const int64_t off = i2 * geo.d[2] - geo.p[2];
          int64_t lo, hi;
          tap_columns(geo, i2, lo, hi);
          float total = 0.f;
          for (int64_t o0 = 0; o0 < geo.out[0]; ++o0) {
            const int64_t z = o0 * geo.s[0] - geo.p[0] + i0 * geo.d[0];
            if (z < 0 || z >= geo.in[0]) continue;
            for (int64_t o1 = 0; o1 < geo.out[1]; ++o1) {
              const int64_t y = o1 * geo.s[1] - geo.p[1] + i1 * geo.d[1];
              if (y < 0 || y >= geo.in[1] || hi <= lo) continue;
              const float* xrow = xc + (z * geo.in[1] + y) * geo.in[2] + off;
              total += strided_dot(gc + (o0 * geo.out[1] + o1) * geo.out[2] + lo, xrow + lo * s, hi - lo, s);
            }
          }
          acc[(c * geo.k[0] + i0) * geo.k[1] * geo.k[2] + i1 * geo.k[2] + i2] += std::fabs(total);
        }
  }
}

// input (N, C, *spatial), grad_out (N, O, *out_spatial), weight (O, C/groups, *kernel).
void conv_importance_cpu(at::Tensor& omega_w, const std::optional<at::Tensor>& omega_b, const at::Tensor& input,
                         const at::Tensor& grad_out, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_activation(input, "input");
  check_activation(grad_out, "grad_out");
  const int64_t nd = input.dim() - 2;
  TORCH_CHECK(nd >= 1 && nd <= 3, "conv_importance_: input must be (N, C, *spatial) with 1-3 spatial dims, got ", input.sizes());
  TORCH_CHECK(grad_out.dim() == input.dim() && grad_out.size(0) == input.size(0),
              "conv_importance_: grad_out ", grad_out.sizes(), " does not match input ", input.sizes());
  TORCH_CHECK((int64_t)kernel_size.size() == nd && (int64_t)stride.size() == nd && (int64_t)padding.size() == nd &&
                  (int64_t)dilation.size() == nd,
              "conv_importance_: kernel_size, stride, padding and dilation need ", nd, " entries each");
  const int64_t N = input.size(0), C = input.size(1), O = grad_out.size(1);
  TORCH_CHECK(groups >= 1 && C % groups == 0 && O % groups == 0, "conv_importance_: groups=", groups,
              " must divide in_channels=", C, " and out_channels=", O);
  ConvGeom geo{};
  geo.C = C;
  for (int i = 0; i < 3; ++i) geo.in[i] = geo.out[i] = geo.k[i] = geo.s[i] = geo.d[i] = 1, geo.p[i] = 0;
  std::vector<int64_t> wshape{O, C / groups};
  for (int64_t i = 0; i < nd; ++i) {
    const int j = 3 - nd + i;
    geo.in[j] = input.size(2 + i);
    geo.out[j] = grad_out.size(2 + i);
    geo.k[j] = kernel_size[i], geo.s[j] = stride[i], geo.p[j] = padding[i], geo.d[j] = dilation[i];
    const int64_t expect = (geo.in[j] + 2 * geo.p[j] - geo.d[j] * (geo.k[j] - 1) - 1) / geo.s[j] + 1;
    TORCH_CHECK(expect == geo.out[j], "conv_importance_: grad_out spatial size ", grad_out.sizes(),
                " does not match the convolution of input ", input.sizes());
    wshape.push_back(kernel_size[i]);
  }
  check_accumulator(omega_w, "weight", wshape);
  if (omega_b) check_accumulator(*omega_b, "bias", {O});
  if (N == 0) return;
  auto x = input.detach().to(at::kFloat).contiguous();  // detached: see linear_importance_cpu
  auto g = grad_out.detach().to(at::kFloat).contiguous();
  const int64_t K = geo.k[0] * geo.k[1] * geo.k[2], L = geo.out[0] * geo.out[1] * geo.out[2];
  const int64_t Cg = C / groups, Og = O / groups, sample_in = C * geo.in[0] * geo.in[1] * geo.in[2];

  if (omega_b) omega_b->add_(g.view({N, O, L}).sum(2).abs_().sum(0));
  if (L == 0) return;  // no output positions (an input shorter than the kernel's reach): every gradient is 0
  if (groups == 1 && conv_importance_registers(omega_w, x, g, geo, K, L)) return;
  ThreadAccumulators acc_w(omega_w, N);
  if (Cg == 1 && Og == 1) {  // depthwise
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      float* wacc = acc_w.get();
      for (int64_t k = begin; k < end; ++k)
        conv_importance_depthwise(wacc, x.data_ptr<float>() + k * sample_in, g.data_ptr<float>() + k * O * L, geo);
    });
    acc_w.reduce();
    return;
  }
  ThreadScratch cols_ws({groups, Cg * K, L}, x.options()), tmp_ws({groups, Og, Cg * K}, x.options());
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    auto cols = cols_ws.slot();
    auto tmp = tmp_ws.slot();
    float* wacc = acc_w.get();
    for (int64_t k = begin; k < end; ++k) {
      im2col3d(x.data_ptr<float>() + k * sample_in, cols.data_ptr<float>(), geo, 1);
      auto gk = g[k].view({groups, Og, L});
      at::bmm_out(tmp, gk, cols.transpose(1, 2));  // per-group weight gradient of sample k
      abs_accumulate(wacc, tmp.data_ptr<float>(), O * Cg * K);
    }
  });
  acc_w.reduce();
}


// Σ_c x[c] - shift, or Σ_c (x[c] - shift)² with `squares`, over the C floats of one row: Vec::size() float
// partial sums, added in double.
double row_sum(const float* x, int64_t C, float shift, bool squares) {
  Vec acc(0.f);
  const Vec vs(shift);
  int64_t c = 0;
  for (; c + Vec::size() <= C; c += Vec::size()) {
    const Vec d = Vec::loadu(x + c) - vs;
    acc = acc + (squares ? d * d : d);
  }
  float lanes[Vec::size()];
  acc.store(lanes);
  double total = 0.0;
  for (int j = 0; j < Vec::size(); ++j) total += lanes[j];
  for (; c < C; ++c) total += squares ? double(x[c] - shift) * (x[c] - shift) : double(x[c] - shift);
  return total;
}

// Positions summed apart before their sum joins the sample's: two-level sums keep float32 accuracy over long
// sequences (and over per_sample=False's N·T positions).
constexpr int64_t kNormBlock = 64;

// sw[c] += Σ_p g[p, c] x̂[p, c], sb[c] += Σ_p g[p, c] over positions [p0, p1) of x, g (P, C) row-major, x̂ by
// the row's shift (mean, or 0 with rms) and 1 / sqrt(mean((x - shift)²) + eps). blk: 2C floats of scratch.
void norm_partial_sums(const float* x, const float* g, int64_t p0, int64_t p1, int64_t C, double eps, bool rms,
                       float* sw, float* sb, float* blk) {
  const int64_t CV = C / Vec::size() * Vec::size();
  float* const bw = blk;
  float* const bb = blk + C;
  for (int64_t q0 = p0; q0 < p1; q0 += kNormBlock) {
    std::fill(blk, blk + 2 * C, 0.f);
    for (int64_t p = q0; p < std::min(p1, q0 + kNormBlock); ++p) {
      const float* xr = x + p * C;
      const float* gr = g + p * C;
      const float shift = rms ? 0.f : static_cast<float>(row_sum(xr, C, 0.f, false) / C);
      const float rstd = static_cast<float>(1.0 / std::sqrt(row_sum(xr, C, shift, true) / C + eps));
      const Vec vr(rstd), vs(shift);
      int64_t c = 0;
      for (; c < CV; c += Vec::size()) {
        const Vec gv = Vec::loadu(gr + c);
        (Vec::loadu(bw + c) + gv * ((Vec::loadu(xr + c) - vs) * vr)).store(bw + c);
        (Vec::loadu(bb + c) + gv).store(bb + c);
      }
      for (; c < C; ++c) bw[c] += gr[c] * ((xr[c] - shift) * rstd), bb[c] += gr[c];
    }
    for (int64_t c = 0; c < C; ++c) sw[c] += bw[c], sb[c] += bb[c];
  }
}

// LayerNorm / RMSNorm affine parameters, normalised over the last dim: input, grad_out (N, P, C):
//   omega_w (C) += Σ_k |Σ_p g_kp ⊙ x̂_kp|, omega_b (C) += Σ_k |Σ_p g_kp| (omega_b may be absent),
// x̂ = (x - mean) / sqrt(var + eps) with the biased variance, or with rms: x / sqrt(mean(x²) + eps), per
// position over its C features, in float32. One pass over x and g. With at least as many samples as threads,
// each thread takes whole samples (two C-sized sums and one accumulator pair); with fewer, each sample's
// positions are split over the threads, whose partial sums (fewer than 2 × threads of them) are added per
// sample before |·|.
void norm_affine_importance_cpu(at::Tensor& omega_w, const std::optional<at::Tensor>& omega_b, const at::Tensor& input,
                                const at::Tensor& grad_out, double eps, bool rms) {
  check_activation(input, "input");
  check_activation(grad_out, "grad_out");
  const auto shape = norm_affine_shape(input, grad_out, eps);
  const int64_t N = shape[0], P = shape[1], C = shape[2];
  check_accumulator(omega_w, "weight", {C});
  if (omega_b) check_accumulator(*omega_b, "bias", {C});
  if (N == 0 || P == 0 || C == 0) return;
  const auto x = input.detach().to(at::kFloat).contiguous();
  const auto g = grad_out.detach().to(at::kFloat).contiguous();
  const float* xp = x.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  float* const ow = omega_w.data_ptr<float>();
  float* const ob = omega_b ? omega_b->data_ptr<float>() : nullptr;
  const int64_t threads = at::get_num_threads();
  const int64_t parts = N >= threads ? 1 : std::min<int64_t>(P, (threads + N - 1) / N);
  ThreadScratch scratch({(parts == 1 ? 4 : 2) * C}, x.options());
  if (parts == 1) {
    ThreadAccumulators acc_w(omega_w, N);
    std::optional<ThreadAccumulators> acc_b;
    if (omega_b) acc_b.emplace(*omega_b, N);
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      float* const sw = scratch.slot().data_ptr<float>();
      float* const sb = sw + C;
      float* const tw = acc_w.get();
      float* const tb = acc_b ? acc_b->get() : nullptr;
      for (int64_t k = begin; k < end; ++k) {
        std::fill(sw, sw + 2 * C, 0.f);
        norm_partial_sums(xp + k * P * C, gp + k * P * C, 0, P, C, eps, rms, sw, sb, sw + 2 * C);
        abs_accumulate(tw, sw, C);
        if (tb) abs_accumulate(tb, sb, C);
      }
    });
    acc_w.reduce();
    if (acc_b) acc_b->reduce();
    return;
  }
  const int64_t per_part = (P + parts - 1) / parts;
  at::Tensor partial = at::zeros({N * parts, 2 * C}, x.options());
  float* const pp = partial.data_ptr<float>();
  at::parallel_for(0, N * parts, 1, [&](int64_t begin, int64_t end) {
    float* const blk = scratch.slot().data_ptr<float>();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / parts, p0 = (item % parts) * per_part;
      float* const sw = pp + item * 2 * C;
      norm_partial_sums(xp + k * P * C, gp + k * P * C, p0, std::min(P, p0 + per_part), C, eps, rms, sw, sw + C, blk);
    }
  });
  for (int64_t k = 0; k < N; ++k) {  // each sample's parts in order, then |·|
    float* const sw = pp + k * parts * 2 * C;
    for (int64_t j = 1; j < parts; ++j) {
      for (int64_t c = 0; c < 2 * C; ++c) sw[c] += sw[j * 2 * C + c];
    }
    abs_accumulate(ow, sw, C);
    if (ob) abs_accumulate(ob, sw + C, C);
  }
}

}  // namespace

// For mas_ext.backend() (csrc/module.cpp): the register kernel the importance ops run on this CPU, or the
// GEMM path's name where there is none, and MAS_EXT_CPU_KERNEL where it made the choice.
const char* cpu_kernel_name() {
#ifdef MAS_EXT_AVX2_KERNEL
  return kernel_choice().name.c_str();
#else
  return "GEMM-then-|.| tiles";
#endif
}

TORCH_LIBRARY_FRAGMENT(mas_ext, m) {
  m.def("linear_importance_(Tensor(a!) omega_w, Tensor(b!)? omega_b, Tensor input, Tensor grad_out) -> ()");
  m.def(
      "conv_importance_(Tensor(a!) omega_w, Tensor(b!)? omega_b, Tensor input, Tensor grad_out, int[] kernel_size, "
      "int[] stride, int[] padding, int[] dilation, int groups) -> ()");
  m.def(
      "tied_embedding_importance_(Tensor(a!) omega, Tensor input, Tensor grad_out, Tensor indices, Tensor rows) "
      "-> ()");
  m.def(
      "norm_affine_importance_(Tensor(a!) omega_w, Tensor(b!)? omega_b, Tensor input, Tensor grad_out, float eps, "
      "bool rms) -> ()");
}

TORCH_LIBRARY_IMPL(mas_ext, CPU, m) {
  m.impl("linear_importance_", &linear_importance_cpu);
  m.impl("conv_importance_", &conv_importance_cpu);
  m.impl("tied_embedding_importance_", &tied_embedding_importance_cpu);
  m.impl("norm_affine_importance_", &norm_affine_importance_cpu);
}

}  // namespace mas_ext
