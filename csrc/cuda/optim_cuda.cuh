// Launchers of the CUDA multi-tensor optimizer kernels (optim_cuda.cu); no torch/ATen types: raw
// pointers, a cudaStream_t, a cudaError_t back.  The kernels' host/device code is in optim_cuda_math.h;
// the torch bindings (argument checks, grouping by dtype, the current stream) in optim_binding.cpp.
//
// Every launcher takes n tensors described slot by slot: lists[slot][i] is the data pointer of tensor i
// in that slot (see the *Slot enums in optim_cuda_math.h), lists[slot] == nullptr for a slot that is
// absent for all tensors (momentum buffers without momentum, max_exp_avg_sqs without amsgrad, steps in
// host-step mode) and lists[slot][i] == nullptr for an untracked tensor's Ω/θ*.  All tensors of one
// call have the same dtype; tensors are walked flat over numels[i] elements (the caller checks that all
// slots of a tensor share its layout).  Nothing here synchronises with the host, so the calls can be
// captured in a CUDA graph (with device step counters for Adam).
#pragma once

#include <cuda_runtime_api.h>

#include <stdint.h>

#include "cuda/optim_cuda_math.h"

namespace mas_ext {
namespace cuda_optim {

enum class ScalarKind : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// grad += scale * Ω * (θ − θ*); lists: PenaltySlot.
cudaError_t launch_add_penalty_grad(ScalarKind kind, int64_t n, const int64_t* numels, void* const* const* lists,
                                    const PenaltyArgs& args, cudaStream_t stream);

// torch.optim.SGD step on grad + penalty; lists: SgdSlot.
cudaError_t launch_fused_sgd(ScalarKind kind, int64_t n, const int64_t* numels, void* const* const* lists,
                             const SgdArgs& args, cudaStream_t stream);

// torch.optim.Adam/AdamW step on grad + penalty; lists: AdamSlot.  host_extra: per-tensor bias
// corrections when !args.device_steps (the caller incremented its host counters), else null and
// lists[kAdamStep] holds the device counters (incremented here, on the stream, unless found_inf).
cudaError_t launch_fused_adam(ScalarKind kind, int64_t n, const int64_t* numels, void* const* const* lists,
                              const AdamExtra* host_extra, const AdamArgs& args, cudaStream_t stream);

}  // namespace cuda_optim
}  // namespace mas_ext
