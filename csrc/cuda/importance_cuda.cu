// CUDA kernels for the exact per-sample MAS importance: Linear (with and without positions), Conv (1-3-d,
// stride/padding/dilation/groups, im2col of a bounded chunk of samples into a caller's workspace) and a
// tied Embedding + Linear weight; and the affine weight and bias of LayerNorm/RMSNorm. The layout of the work is in index_math.cuh (tested on the CPU).
//
// One kernel does every weight: block (x, y, z) owns a BM x BN tile of omega (of group z / nsplit) and
// the samples of split z % nsplit. Per sample it reduces the positions on tensor cores (wmma m16n16k16,
// fp32 accumulators, for fp16/bf16 inputs; fp32 FMAs for float32 inputs, so float32 results are float32
// rounding, not TF32), adds the absolute value of that per-sample tile into a second register tile, and
// at the end atomically adds the second tile into omega. Nothing per-sample reaches global memory.
//
// ptxas, nvcc 13.0 -O3 (`nvcc -c -std=c++17 -O3 -Icsrc -gencode=arch=compute_XX,code=sm_XX -Xptxas -v`),
// registers per thread, static shared memory, spill bytes (stores+loads) sm_80/sm_90; gemm template
// arguments <T, FeatContig (linear: features contiguous; conv: positions), AbsLoad (abs-GEMM), Tied>:
//   bias_feat_kernel<bf16, false>                   sm_80  32 regs  sm_90  32 regs  smem     0 B  spill 0/0
//   bias_feat_kernel<bf16, true>                    sm_80  32 regs  sm_90  32 regs  smem     0 B  spill 0/0
//   bias_feat_kernel<float, false>                  sm_80  32 regs  sm_90  32 regs  smem     0 B  spill 0/0
//   bias_feat_kernel<float, true>                   sm_80  32 regs  sm_90  32 regs  smem     0 B  spill 0/0
//   bias_feat_kernel<half, false>                   sm_80  32 regs  sm_90  32 regs  smem     0 B  spill 0/0
//   bias_feat_kernel<half, true>                    sm_80  32 regs  sm_90  32 regs  smem     0 B  spill 0/0
//   bias_pos_kernel<bf16>                           sm_80  32 regs  sm_90  32 regs  smem     0 B  spill 0/0
//   bias_pos_kernel<float>                          sm_80  32 regs  sm_90  32 regs  smem     0 B  spill 0/0
//   bias_pos_kernel<half>                           sm_80  32 regs  sm_90  32 regs  smem     0 B  spill 0/0
//   im2col_kernel<bf16>                             sm_80  40 regs  sm_90  40 regs  smem     0 B  spill 0/0
//   im2col_kernel<float>                            sm_80  40 regs  sm_90  40 regs  smem     0 B  spill 0/0
//   im2col_kernel<half>                             sm_80  40 regs  sm_90  40 regs  smem     0 B  spill 0/0
//   importance_gemm_kernel<bf16, false, false, false> sm_80 126 regs  sm_90 127 regs  smem 17408 B  spill 0/0
//   importance_gemm_kernel<bf16, true, false, false> sm_80 126 regs  sm_90 127 regs  smem 17408 B  spill 0/0
//   importance_gemm_kernel<bf16, true, false, true> sm_80 124 regs  sm_90  96 regs  smem 18048 B  spill 0/0
//   importance_gemm_kernel<bf16, true, true, false> sm_80 126 regs  sm_90 127 regs  smem 17408 B  spill 0/0
//   importance_gemm_kernel<float, false, false, false> sm_80  96 regs  sm_90  96 regs  smem 17408 B  spill 0/0
//   importance_gemm_kernel<float, true, false, false> sm_80  96 regs  sm_90  96 regs  smem 17408 B  spill 0/0
//   importance_gemm_kernel<float, true, false, true> sm_80  94 regs  sm_90  94 regs  smem 18048 B  spill 0/0
//   importance_gemm_kernel<float, true, true, false> sm_80  96 regs  sm_90  96 regs  smem 17408 B  spill 0/0
//   importance_gemm_kernel<half, false, false, false> sm_80 100 regs  sm_90 100 regs  smem 17408 B  spill 0/0
//   importance_gemm_kernel<half, true, false, false> sm_80 100 regs  sm_90  99 regs  smem 17408 B  spill 0/0
//   importance_gemm_kernel<half, true, false, true> sm_80  94 regs  sm_90  96 regs  smem 18048 B  spill 0/0
//   importance_gemm_kernel<half, true, true, false> sm_80 124 regs  sm_90 124 regs  smem 17408 B  spill 0/0
//   norm_affine_kernel<bf16 | half | float>        sm_80 39-40 regs sm_90 32 regs smem  2048 B  spill 0/0
//   norm_stats_kernel<bf16 | half | float>         sm_80  32 regs  sm_90  32 regs  smem     0 B  spill 0/0
// PTX (`nvcc -ptx`, compute_80 and compute_90): wmma.mma.sync.aligned.col.row.m16n16k16.f32.bf16.bf16.f32 and
// .f32.f32 (f16) in the 16-bit gemm kernels, 8 per kernel per BK stage; fp32 kernels: FFMA only.
#include "cuda/importance_cuda.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

namespace mas_ext {
namespace cuda {
namespace {

using bf16 = __nv_bfloat16;
using half = __half;

// ----------------------------------------------------------------------------- scalar helpers
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(bf16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float abs_value(float v) { return fabsf(v); }
__device__ __forceinline__ half abs_value(half v) { return __habs(v); }
__device__ __forceinline__ bf16 abs_value(bf16 v) { return __habs(v); }

template <typename T>
__device__ __forceinline__ T zero_value();
template <>
__device__ __forceinline__ float zero_value<float>() { return 0.f; }
template <>
__device__ __forceinline__ half zero_value<half>() { return __ushort_as_half(0); }
template <>
__device__ __forceinline__ bf16 zero_value<bf16>() { return __ushort_as_bfloat16(0); }

// ----------------------------------------------------------------------------- shared memory layout
// Operand tiles, position-major: sG[k][m] = G(p0 + k, m0 + m), sA[k][n] = A(p0 + k, n0 + n). The float
// tile sC[m][n] (per-sample sums for the tied rows, the final |.|-sums) reuses the same bytes.
constexpr int LDC = BN + 4;

template <typename T>
struct Smem {
  static constexpr int PAD = sizeof(T) == 4 ? 4 : 8;  // wmma: ldm a multiple of 8 halves / 4 floats
  static constexpr int LDG = BM + PAD;
  static constexpr int LDA = BN + PAD;
  static constexpr int OPERAND_BYTES = BK * (LDG + LDA) * int(sizeof(T));
  static constexpr int C_BYTES = BM * LDC * int(sizeof(float));
  static constexpr int BYTES = OPERAND_BYTES > C_BYTES ? OPERAND_BYTES : C_BYTES;
};

// ----------------------------------------------------------------------------- per-thread tiles
// float32 inputs: each thread owns rows ty + 8i (i < 8) and columns tx + 16j (j < 4) of the 64 x 64 tile.
struct FmaTile {
  using Elem = float;
  static constexpr int LDG = Smem<float>::LDG, LDA = Smem<float>::LDA;
  float acc[8][4];
  float sum[8][4];
  int tx, ty;

  __device__ FmaTile() : tx(threadIdx.x % 16), ty(threadIdx.x / 16) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) sum[i][j] = 0.f;
  }
  __device__ void zero_acc() {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  }
  __device__ void mma(const float* sG, const float* sA) {
#pragma unroll 8
    for (int k = 0; k < BK; ++k) {
      float a[8], b[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = sG[k * LDG + ty + 8 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = sA[k * LDA + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }
  __device__ void abs_add() {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) sum[i][j] += fabsf(acc[i][j]);
  }
  __device__ void store_acc(float* sC) const { store(acc, sC); }
  __device__ void store_sum(float* sC) const { store(sum, sC); }
  __device__ void load_acc(const float* sC) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = sC[(ty + 8 * i) * LDC + tx + 16 * j];
  }

 private:
  __device__ void store(const float (&t)[8][4], float* sC) const {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) sC[(ty + 8 * i) * LDC + tx + 16 * j] = t[i][j];
  }
};

// fp16/bf16 inputs: 4 warps in 2 x 2, each a 32 x 32 sub-tile of 2 x 2 wmma 16 x 16 fragments.
// A(m, k) = sG[k][m] is a col_major matrix_a, B(k, n) = sA[k][n] a row_major matrix_b. acc and sum are
// accumulator fragments of one shape, so |.| is taken element by element whatever their layout.
template <typename T>
struct WmmaTile {
  using Elem = T;
  static constexpr int LDG = Smem<T>::LDG, LDA = Smem<T>::LDA;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2];
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> sum[2][2];
  int wm, wn;

  __device__ WmmaTile() : wm(threadIdx.x / 32 / 2), wn(threadIdx.x / 32 % 2) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(sum[i][j], 0.f);
  }
  __device__ void zero_acc() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
  }
  __device__ void mma(const T* sG, const T* sA) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    using namespace nvcuda;
#pragma unroll
    for (int k0 = 0; k0 < BK; k0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], sG + k0 * LDG + wm * 32 + i * 16, LDG);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], sA + k0 * LDA + wn * 32 + j * 16, LDA);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
#else
    __trap();  // bf16 wmma needs sm_80; the extension is built for sm_80 and sm_90 only
#endif
  }
  __device__ void abs_add() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int t = 0; t < acc[i][j].num_elements; ++t) sum[i][j].x[t] += fabsf(acc[i][j].x[t]);
  }
  __device__ float* at(float* sC, int i, int j) const { return sC + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16; }
  __device__ void store_acc(float* sC) const {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::store_matrix_sync(at(sC, i, j), acc[i][j], LDC, nvcuda::wmma::mem_row_major);
  }
  __device__ void store_sum(float* sC) const {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::store_matrix_sync(at(sC, i, j), sum[i][j], LDC, nvcuda::wmma::mem_row_major);
  }
  __device__ void load_acc(float* sC) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::load_matrix_sync(acc[i][j], at(sC, i, j), LDC, nvcuda::wmma::mem_row_major);
  }
};

template <typename T>
using TileFor = typename std::conditional<std::is_same<T, float>::value, FmaTile, WmmaTile<T>>::type;

// ----------------------------------------------------------------------------- operand loads
// BK positions x WIDTH features of one operand into s[k][f] (zeros outside [0, rows) x [0, fmax)). With
// features contiguous (linear) consecutive threads read consecutive features; with positions contiguous
// (conv) consecutive positions.
template <typename T, bool FeatContig, bool AbsLoad, int WIDTH>
__device__ __forceinline__ void load_tile(T* __restrict__ s, int ld, const T* __restrict__ base, const OperandDesc& d,
                                          int64_t p0, int64_t rows, int64_t f0, int64_t fmax) {
#pragma unroll 4
  for (int e = threadIdx.x; e < BK * WIDTH; e += THREADS) {
    const int k = FeatContig ? e / WIDTH : e % BK;
    const int f = FeatContig ? e % WIDTH : e / BK;
    const int64_t off = tile_load_offset(d, p0 + k, f0 + f, rows, fmax);
    T v = zero_value<T>();
    if (off >= 0) {
      v = base[off];
      if (AbsLoad) v = abs_value(v);
    }
    s[k * ld + f] = v;
  }
}

struct GemmArgs {
  GemmGeometry geo;
  const void* g;
  const void* a;
  float* omega;
  // tied embedding rows: indices (n_items, Q), rows (n_items, Q, Nf)
  const int64_t* indices;
  const void* rows;
  int64_t Q;
};

// Tied embedding: the rows of sample s whose index falls in [m0, m0 + BM) join the sample's tile before
// |.|. The indices are scanned THREADS at a time; the hits of each chunk are compacted (warp ballots)
// into a list and their rows added into the float tile sC (shared atomics: an index may repeat).
template <typename T, typename Tile>
__device__ void add_embedding_rows(Tile& tile, float* sC, const GemmArgs& args, int64_t s, int64_t m0, int64_t n0) {
  __shared__ int hits[THREADS];
  __shared__ int warp_hits[THREADS / 32];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t vmax = min64(m0 + BM, args.geo.M);
  const int64_t* idx = args.indices + s * args.Q;
  const T* rows = static_cast<const T*>(args.rows) + s * args.Q * args.geo.Nf;
  bool stored = false;
  for (int64_t q0 = 0; q0 < args.Q; q0 += THREADS) {
    const int64_t q = q0 + tid;
    const int64_t v = q < args.Q ? idx[q] : -1;
    const bool hit = v >= m0 && v < vmax;
    const unsigned ballot = __ballot_sync(0xffffffffu, hit);
    if (lane == 0) warp_hits[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, n = 0;
#pragma unroll
    for (int w = 0; w < THREADS / 32; ++w) {
      before += w < warp ? warp_hits[w] : 0;
      n += warp_hits[w];
    }
    if (hit) hits[before + __popc(ballot & ((1u << lane) - 1u))] = tid;
    __syncthreads();
    if (n == 0) continue;  // block-uniform
    if (!stored) {
      tile.store_acc(sC);
      stored = true;
      __syncthreads();
    }
    for (int e = tid; e < n * BN; e += THREADS) {
      const int h = e / BN, c = e % BN;
      const int64_t qq = q0 + hits[h];
      if (n0 + c < args.geo.Nf) atomicAdd(&sC[(idx[qq] - m0) * LDC + c], to_float(rows[qq * args.geo.Nf + n0 + c]));
    }
    __syncthreads();
  }
  if (stored) {
    tile.load_acc(sC);
    __syncthreads();  // the next sample's operand loads overwrite sC
  }
}

// ----------------------------------------------------------------------------- the importance GEMM
template <typename T, bool FeatContig, bool AbsLoad, bool Tied>
__global__ void __launch_bounds__(THREADS) importance_gemm_kernel(const GemmArgs args) {
  using Tile = TileFor<T>;
  __shared__ __align__(128) unsigned char smem[Smem<T>::BYTES];
  T* sG = reinterpret_cast<T*>(smem);
  T* sA = sG + BK * Smem<T>::LDG;
  float* sC = reinterpret_cast<float*>(smem);
  const GemmGeometry& geo = args.geo;

  const int64_t n0 = int64_t(blockIdx.x) * BN, m0 = int64_t(blockIdx.y) * BM;
  const int64_t grp = blockIdx.z / geo.plan.nsplit, split = blockIdx.z % geo.plan.nsplit;
  const int64_t s_begin = split_begin(geo.plan, split), s_end = split_end(geo.plan, split, geo.n_items);
  if (s_begin >= s_end) return;  // never, by plan_splits; block-uniform
  const T* g = static_cast<const T*>(args.g);
  const T* a = static_cast<const T*>(args.a);

  Tile tile;
  for (int64_t s = s_begin; s < s_end; ++s) {
    tile.zero_acc();
    const int64_t rows = item_rows(s, geo.positions, geo.rows_total);
    const T* gs = g + operand_offset(geo.gd, s, 0, 0, grp);
    const T* as = a + operand_offset(geo.ad, s, 0, 0, grp);
    for (int64_t p0 = 0; p0 < rows; p0 += BK) {
      load_tile<T, FeatContig, AbsLoad, BM>(sG, Smem<T>::LDG, gs, geo.gd, p0, rows, m0, geo.M);
      load_tile<T, FeatContig, AbsLoad, BN>(sA, Smem<T>::LDA, as, geo.ad, p0, rows, n0, geo.Nf);
      __syncthreads();
      tile.mma(sG, sA);
      __syncthreads();
    }
    if constexpr (Tied) add_embedding_rows<T>(tile, sC, args, s, m0, n0);
    tile.abs_add();
  }
  tile.store_sum(sC);
  __syncthreads();
  float* out = args.omega + grp * geo.M * geo.omega_ld;
  for (int e = threadIdx.x; e < BM * BN; e += THREADS) {
    const int m = e / BN, n = e % BN;
    if (m0 + m < geo.M && n0 + n < geo.Nf) atomicAdd(out + (m0 + m) * geo.omega_ld + n0 + n, sC[m * LDC + n]);
  }
}

// ----------------------------------------------------------------------------- bias
// Features contiguous: a thread per output feature o.
template <typename T, bool AbsLoad>
__global__ void __launch_bounds__(THREADS) bias_feat_kernel(float* omega_b, const T* g, const BiasGeometry geo) {
  const int64_t o = int64_t(blockIdx.x) * THREADS + threadIdx.x;
  if (o >= geo.O) return;
  const int64_t sb = split_begin(geo.plan, blockIdx.y), se = split_end(geo.plan, blockIdx.y, geo.n_items);
  float total = 0.f;
  for (int64_t s = sb; s < se; ++s) {
    const int64_t rows = item_rows(s, geo.positions, geo.rows_total);
    const T* gs = g + operand_offset(geo.gd, s, 0, o, 0);
    float acc = 0.f;
    for (int64_t p = 0; p < rows; ++p) {
      const float v = to_float(gs[p * geo.gd.pos_stride]);
      acc += AbsLoad ? fabsf(v) : v;
    }
    total += fabsf(acc);
  }
  if (se > sb) atomicAdd(omega_b + o, total);
}

// Positions contiguous (conv): a warp per output feature o.
template <typename T>
__global__ void __launch_bounds__(THREADS) bias_pos_kernel(float* omega_b, const T* g, const BiasGeometry geo) {
  const int64_t o = int64_t(blockIdx.x) * (THREADS / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (o >= geo.O) return;  // warp-uniform
  const int64_t sb = split_begin(geo.plan, blockIdx.y), se = split_end(geo.plan, blockIdx.y, geo.n_items);
  float total = 0.f;
  for (int64_t s = sb; s < se; ++s) {
    const int64_t rows = item_rows(s, geo.positions, geo.rows_total);
    const T* gs = g + operand_offset(geo.gd, s, 0, o, 0);
    float acc = 0.f;
    for (int64_t p = lane; p < rows; p += 32) acc += to_float(gs[p * geo.gd.pos_stride]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    total += fabsf(acc);
  }
  if (lane == 0 && se > sb) atomicAdd(omega_b + o, total);
}

// ----------------------------------------------------------------------------- im2col
// cols (S, C*K, L) of the samples x (S, C, *in); padding zeros included.
template <typename T>
__global__ void __launch_bounds__(256) im2col_kernel(T* __restrict__ cols, const T* __restrict__ x, const ConvShape shape,
                                                     int64_t S) {
  const int64_t R = conv_cols_rows(shape), L = conv_out_volume(shape), in = shape.C * conv_in_volume(shape);
  const int64_t total = S * R * L;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t l = e % L, rs = e / L;
    const int64_t r = rs % R, s = rs / R;
    const int64_t off = im2col_offset(shape, r, l);
    cols[e] = off >= 0 ? x[s * in + off] : zero_value<T>();
  }
}


// ----------------------------------------------------------------------------- norm affine (LayerNorm, RMSNorm)
// Row statistics, a warp per row of C features: stats[2r] = the shift (the mean; 0 for rms), stats[2r + 1] =
// 1 / sqrt(mean((x - shift)²) + eps). Two passes over the row (the second from L1/L2).
template <typename T>
__global__ void __launch_bounds__(256) norm_stats_kernel(float* __restrict__ stats, const T* __restrict__ x, int64_t rows,
                                                         int64_t C, float eps, bool rms) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const T* xr = x + r * C;
    float shift = 0.f;
    if (!rms) {
      float sum = 0.f;
      for (int64_t c = lane; c < C; c += 32) sum += to_float(xr[c]);
#pragma unroll
      for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      shift = sum / float(C);
    }
    float sq = 0.f;
    for (int64_t c = lane; c < C; c += 32) {
      const float d = to_float(xr[c]) - shift;
      sq += d * d;
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, off);
    if (lane == 0) {
      stats[2 * r] = shift;
      stats[2 * r + 1] = rsqrtf(sq / float(C) + eps);
    }
  }
}

// Per sample k (grid y, strided) and 32 features c (grid x, one per lane): NORM_LANES rows of threads split
// the P positions, their sums meet in shared memory, and |Σ_p g x̂| and |Σ_p g| go to omega by one atomicAdd
// per feature and sample.
constexpr int NORM_LANES = 8;

template <typename T>
__global__ void __launch_bounds__(32 * NORM_LANES) norm_affine_kernel(float* __restrict__ omega_w, float* __restrict__ omega_b,
                                                                      const T* __restrict__ x, const T* __restrict__ g,
                                                                      const float* __restrict__ stats, int64_t N,
                                                                      int64_t P, int64_t C) {
  __shared__ float sw[NORM_LANES][32], sb[NORM_LANES][32];
  const int64_t c = int64_t(blockIdx.x) * 32 + threadIdx.x;
  for (int64_t k = blockIdx.y; k < N; k += gridDim.y) {
    float acc_w = 0.f, acc_b = 0.f;
    if (c < C) {
      for (int64_t p = threadIdx.y; p < P; p += NORM_LANES) {
        const int64_t row = k * P + p;
        const float gv = to_float(g[row * C + c]);
        acc_w += gv * ((to_float(x[row * C + c]) - stats[2 * row]) * stats[2 * row + 1]);
        acc_b += gv;
      }
    }
    sw[threadIdx.y][threadIdx.x] = acc_w;
    sb[threadIdx.y][threadIdx.x] = acc_b;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
      for (int j = 1; j < NORM_LANES; ++j) acc_w += sw[j][threadIdx.x], acc_b += sb[j][threadIdx.x];
      atomicAdd(omega_w + c, fabsf(acc_w));
      if (omega_b != nullptr) atomicAdd(omega_b + c, fabsf(acc_b));
    }
    __syncthreads();  // the shared sums are rewritten for the next sample
  }
}

// ----------------------------------------------------------------------------- launchers
template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(Tag<float>{});
    case DType::kFloat16:
      return f(Tag<half>{});
    case DType::kBFloat16:
      return f(Tag<bf16>{});
  }
  return cudaErrorInvalidValue;
}

int64_t target_blocks(int num_sms) { return int64_t(num_sms > 0 ? num_sms : 1) * 4; }

template <typename T, bool FeatContig, bool AbsLoad, bool Tied>
cudaError_t launch_gemm(const GemmArgs& args, cudaStream_t stream) {
  const GemmGeometry& geo = args.geo;
  if (geo.M <= 0 || geo.Nf <= 0 || geo.n_items <= 0) return cudaSuccess;
  if (geo.grid_y > MAX_GRID_YZ || geo.grid_z > MAX_GRID_YZ || geo.grid_x > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(unsigned(geo.grid_x), unsigned(geo.grid_y), unsigned(geo.grid_z));
  importance_gemm_kernel<T, FeatContig, AbsLoad, Tied><<<grid, THREADS, 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bias(float* omega_b, const void* g, const BiasGeometry& geo, cudaStream_t stream) {
  if (omega_b == nullptr || geo.O <= 0 || geo.n_items <= 0) return cudaSuccess;
  if (geo.grid_y > MAX_GRID_YZ || geo.grid_x > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(unsigned(geo.grid_x), unsigned(geo.grid_y));
  const T* gp = static_cast<const T*>(g);
  if (!geo.feat_contig) {
    bias_pos_kernel<T><<<grid, THREADS, 0, stream>>>(omega_b, gp, geo);
  } else if (geo.abs_load) {
    bias_feat_kernel<T, true><<<grid, THREADS, 0, stream>>>(omega_b, gp, geo);
  } else {
    bias_feat_kernel<T, false><<<grid, THREADS, 0, stream>>>(omega_b, gp, geo);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t linear_importance(DType dtype, float* omega_w, float* omega_b, const void* input, const void* grad_out,
                              int64_t N, int64_t P, int64_t I, int64_t O, int num_sms, cudaStream_t stream) {
  if (N <= 0 || P <= 0 || O <= 0) return cudaSuccess;
  const int64_t target = target_blocks(num_sms);
  const GemmGeometry geo = linear_geometry(N, P, I, O, target);
  return dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    GemmArgs args{geo, grad_out, input, omega_w, nullptr, nullptr, 0};
    cudaError_t err = geo.abs_load ? launch_gemm<T, true, true, false>(args, stream)
                                   : launch_gemm<T, true, false, false>(args, stream);
    if (err != cudaSuccess) return err;
    return launch_bias<T>(omega_b, grad_out, bias_geometry(geo, true, O, target), stream);
  });
}

cudaError_t conv_importance(DType dtype, float* omega_w, float* omega_b, const void* input, const void* grad_out,
                            const ConvShape& shape, int64_t N, void* workspace, int64_t workspace_elems, int num_sms,
                            cudaStream_t stream) {
  const int64_t L = conv_out_volume(shape);
  if (N <= 0 || L <= 0 || shape.O <= 0) return cudaSuccess;
  if (shape.groups <= 0 || shape.C % shape.groups || shape.O % shape.groups) return cudaErrorInvalidValue;
  const int64_t per_sample = conv_workspace_elems(shape, 1);
  if (per_sample > 0 && (workspace == nullptr || workspace_elems < per_sample)) return cudaErrorInvalidValue;
  const int64_t target = target_blocks(num_sms);
  const int64_t S = conv_chunk_samples(shape, N, workspace_elems);
  const int64_t in = shape.C * conv_in_volume(shape);
  return dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    const T* x = static_cast<const T*>(input);
    const T* g = static_cast<const T*>(grad_out);
    cudaError_t err =
        launch_bias<T>(omega_b, grad_out, bias_geometry(conv_chunk_geometry(shape, N, target), false, shape.O, target),
                       stream);
    if (err != cudaSuccess || per_sample == 0) return err;
    T* cols = static_cast<T*>(workspace);
    for (int64_t c0 = 0; c0 < N; c0 += S) {
      const int64_t sn = min64(S, N - c0);
      const int64_t total = conv_workspace_elems(shape, sn);
      const int64_t blocks = min64(ceil_div(total, 256), int64_t(num_sms > 0 ? num_sms : 1) * 32);
      im2col_kernel<T><<<unsigned(blocks), 256, 0, stream>>>(cols, x + c0 * in, shape, sn);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      GemmArgs args{conv_chunk_geometry(shape, sn, target), g + c0 * shape.O * L, cols, omega_w, nullptr, nullptr, 0};
      if ((err = launch_gemm<T, false, false, false>(args, stream)) != cudaSuccess) return err;
    }
    return cudaSuccess;
  });
}

cudaError_t tied_embedding_importance(DType dtype, float* omega, const void* input, const void* grad_out,
                                      const int64_t* indices, const void* rows, int64_t N, int64_t P, int64_t D,
                                      int64_t V, int64_t Q, int num_sms, cudaStream_t stream) {
  if (N <= 0 || D <= 0 || V <= 0) return cudaSuccess;
  const GemmGeometry geo = tied_geometry(N, P, D, V, target_blocks(num_sms));
  return dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    GemmArgs args{geo, grad_out, input, omega, indices, rows, Q};
    return launch_gemm<T, true, false, true>(args, stream);
  });
}

cudaError_t norm_affine_importance(DType dtype, float* omega_w, float* omega_b, const void* input, const void* grad_out,
                                   int64_t N, int64_t P, int64_t C, float eps, bool rms, float* stats, int num_sms,
                                   cudaStream_t stream) {
  if (N <= 0 || P <= 0 || C <= 0) return cudaSuccess;
  if (stats == nullptr) return cudaErrorInvalidValue;
  return dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    const T* x = static_cast<const T*>(input);
    const int64_t rows = N * P;
    const int64_t stat_blocks = min64(ceil_div(rows, 8), int64_t(num_sms > 0 ? num_sms : 1) * 32);
    norm_stats_kernel<T><<<unsigned(stat_blocks), 256, 0, stream>>>(stats, x, rows, C, eps, rms);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    const int64_t gx = ceil_div(C, 32);
    if (gx > 0x7fffffff) return cudaErrorInvalidConfiguration;
    const dim3 grid(unsigned(gx), unsigned(min64(N, MAX_GRID_YZ)));
    norm_affine_kernel<T><<<grid, dim3(32, NORM_LANES), 0, stream>>>(omega_w, omega_b, x, static_cast<const T*>(grad_out),
                                                                    stats, N, P, C);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace mas_ext
