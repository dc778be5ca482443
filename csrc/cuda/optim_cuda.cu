// CUDA multi-tensor fused optimizer steps with the MAS penalty (see optim_cuda_math.h for the design and
// the numerics; optim_binding.cpp for the torch ops).  Free of torch/ATen headers.
//
// ptxas (nvcc 13.0, -O3 -std=c++17 -Xptxas -v): registers per thread; every kernel 0 bytes stack frame,
// 0 bytes spill stores/loads.  512 threads per block (__launch_bounds__), so float32 Adam runs 2 blocks
// (32 warps) per SM, the 16-bit Adam bodies (8 elements per 16-byte access, 7 streams) 1 block.
//                        float   double  float16  bfloat16
//   Adam/AdamW  sm_80      53      64      110      108
//               sm_90      55      64      116      108
//   SGD         sm_80      44      58       57       60
//               sm_90      45      58       59       62
//   penalty     sm_80/90   32      32       32       32
//   step count  sm_80/90    8       8        8        8
// PTX: ld.global.v4.{f32,u32} / st.global.v4.u32 (float, float16, bfloat16, Ω), ld/st.global.v2.f64 (double);
// div.rn / sqrt.rn also with --use_fast_math (which does flush float32 denormals to zero).
#include "cuda/optim_cuda.cuh"

// Kernel arguments read in place from parameter space (sm_70+; the tables are up to 4 KiB).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
#define MAS_GRID_CONSTANT
#else
#define MAS_GRID_CONSTANT __grid_constant__
#endif

namespace mas_ext {
namespace cuda_optim {
namespace {

template <class Op>
__global__ void __launch_bounds__(kBlockThreads) multi_tensor_kernel(const MAS_GRID_CONSTANT typename Op::Launch L) {
  run_blocks<Op>(L, blockIdx.x, gridDim.x, threadIdx.x, blockDim.x);
}

template <class T>
__global__ void adam_step_count_kernel(const MAS_GRID_CONSTANT typename AdamOp<T>::Launch L) {
  AdamOp<T>::increment_step(L, threadIdx.x);
}

// Plans the launches for n tensors and launches `Op`'s kernel once per full table; `before` runs just
// before each (the Adam step counter increment).
template <class Op, class Args, class Fill, class Before>
cudaError_t launch_multi(int64_t n, const int64_t* numels, const Args& args, const Fill& fill, const Before& before,
                         cudaStream_t stream) {
  typename Op::Launch L;
  L.args = args;
  const int rc = plan_launches(n, numels, L.tab, fill, [&](int64_t chunks) -> int {
    before(L);
    const cudaError_t pre = cudaGetLastError();
    if (pre != cudaSuccess) return static_cast<int>(pre);
    const unsigned grid = static_cast<unsigned>(chunks < kMaxGrid ? chunks : kMaxGrid);
    multi_tensor_kernel<Op><<<grid, kBlockThreads, 0, stream>>>(L);
    return static_cast<int>(cudaGetLastError());
  });
  if (rc < 0) return cudaErrorInvalidValue;  // a tensor with more than 2^31 chunks
  return static_cast<cudaError_t>(rc);
}

struct NoBefore {
  template <class L>
  void operator()(const L&) const {}
};

template <class T>
cudaError_t penalty_t(int64_t n, const int64_t* numels, void* const* const* lists, const PenaltyArgs& a,
                      cudaStream_t s) {
  using Op = PenaltyOp<T>;
  auto fill = [&](typename Op::Table& tab, int slot, int64_t i) { fill_slots(tab, slot, i, lists); };
  return launch_multi<Op>(n, numels, a, fill, NoBefore{}, s);
}

template <class T>
cudaError_t sgd_t(int64_t n, const int64_t* numels, void* const* const* lists, const SgdArgs& a, cudaStream_t s) {
  using Op = SgdOp<T>;
  auto fill = [&](typename Op::Table& tab, int slot, int64_t i) { fill_slots(tab, slot, i, lists); };
  return launch_multi<Op>(n, numels, a, fill, NoBefore{}, s);
}

template <class T>
cudaError_t adam_t(int64_t n, const int64_t* numels, void* const* const* lists, const AdamExtra* extra,
                   const AdamArgs& a, cudaStream_t s) {
  using Op = AdamOp<T>;
  auto fill = [&](typename Op::Table& tab, int slot, int64_t i) {
    fill_slots(tab, slot, i, lists);
    tab.extra[slot] = extra != nullptr ? extra[i] : AdamExtra{0.0, 0.0};
  };
  auto before = [&](const typename Op::Launch& L) {
    if (a.device_steps) adam_step_count_kernel<T><<<1, Op::Table::kMax, 0, s>>>(L);
  };
  return launch_multi<Op>(n, numels, a, fill, before, s);
}

}  // namespace

#define MAS_CUDA_DISPATCH(KIND, FN, ...)                                  \
  switch (KIND) {                                                         \
    case ScalarKind::kFloat32: return FN<float>(__VA_ARGS__);             \
    case ScalarKind::kFloat64: return FN<double>(__VA_ARGS__);            \
    case ScalarKind::kFloat16: return FN<f16_t>(__VA_ARGS__);             \
    case ScalarKind::kBFloat16: return FN<bf16_t>(__VA_ARGS__);           \
  }                                                                       \
  return cudaErrorInvalidValue

cudaError_t launch_add_penalty_grad(ScalarKind kind, int64_t n, const int64_t* numels, void* const* const* lists,
                                    const PenaltyArgs& args, cudaStream_t stream) {
  MAS_CUDA_DISPATCH(kind, penalty_t, n, numels, lists, args, stream);
}

cudaError_t launch_fused_sgd(ScalarKind kind, int64_t n, const int64_t* numels, void* const* const* lists,
                             const SgdArgs& args, cudaStream_t stream) {
  MAS_CUDA_DISPATCH(kind, sgd_t, n, numels, lists, args, stream);
}

cudaError_t launch_fused_adam(ScalarKind kind, int64_t n, const int64_t* numels, void* const* const* lists,
                              const AdamExtra* host_extra, const AdamArgs& args, cudaStream_t stream) {
  MAS_CUDA_DISPATCH(kind, adam_t, n, numels, lists, host_extra, args, stream);
}

}  // namespace cuda_optim
}  // namespace mas_ext
