// CUDA kernels for the exact per-sample MAS importance (see csrc/cpu/importance_cpu.cpp for the CPU ops
// and the schemas). No torch/ATen header: raw pointers, a stream, and a cudaError_t back; the bindings in
// importance_binding.cpp check the tensors and pick the stream. All accumulators are float32 and are
// added to (+=), never overwritten; nothing per-sample reaches global memory.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda/index_math.cuh"

namespace mas_ext {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// input (N, P, I), grad_out (N, P, O), both of `dtype`, contiguous:
//   omega_w (O, I) += Σ_k |Σ_p g_kp a_kpᵀ|, omega_b (O) += Σ_k |Σ_p g_kp| (omega_b may be null).
// P == 1 runs the abs-GEMM |G|ᵀ|A|; P > 1 the per-sample tiles.
cudaError_t linear_importance(DType dtype, float* omega_w, float* omega_b, const void* input, const void* grad_out,
                              int64_t N, int64_t P, int64_t I, int64_t O, int num_sms, cudaStream_t stream);

// input (N, C, *in) with the conv's zero padding still to apply, grad_out (N, O, *out), both of `dtype`,
// contiguous; geometry in `shape` (1-3 spatial dims as 3-D). omega_w (O, C/groups, *kernel) and omega_b
// (O, may be null) as the CPU op. `workspace` holds conv_workspace_elems(shape, S) elements of `dtype`
// for S = conv_chunk_samples(shape, N, workspace_elems) samples at a time (at least one sample's).
cudaError_t conv_importance(DType dtype, float* omega_w, float* omega_b, const void* input, const void* grad_out,
                            const ConvShape& shape, int64_t N, void* workspace, int64_t workspace_elems, int num_sms,
                            cudaStream_t stream);

// Tied embedding + linear: input (N, P, D), grad_out (N, P, V), rows (N, Q, D) of `dtype`, indices (N, Q)
// int64 (negative or >= V: skipped):
//   omega (V, D) += Σ_k |Σ_p g_kp a_kpᵀ + Σ_q onehot(indices_kq) rows_kqᵀ|.
cudaError_t tied_embedding_importance(DType dtype, float* omega, const void* input, const void* grad_out,
                                      const int64_t* indices, const void* rows, int64_t N, int64_t P, int64_t D,
                                      int64_t V, int64_t Q, int num_sms, cudaStream_t stream);

// LayerNorm (rms false) / RMSNorm (rms true) over the last dim: input, grad_out (N, P, C) of `dtype`:
//   omega_w (C) += Σ_k |Σ_p g_kp ⊙ x̂_kp|, omega_b (C, may be null) += Σ_k |Σ_p g_kp|,
// x̂ = (x - mean) / sqrt(var + eps) or x / sqrt(mean(x²) + eps) per position, in float32. `stats` is a
// workspace of 2 * N * P floats (each position's shift and scale).
cudaError_t norm_affine_importance(DType dtype, float* omega_w, float* omega_b, const void* input, const void* grad_out,
                                   int64_t N, int64_t P, int64_t C, float eps, bool rms, float* stats, int num_sms,
                                   cudaStream_t stream);

}  // namespace cuda
}  // namespace mas_ext
