// CUDA implementations of the importance ops (schemas in csrc/cpu/importance_cpu.cpp): tensor checks, the
// common dtype, the current stream, then the torch-free launchers of importance_cuda.cu. No host sync.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <vector>

#include "cuda/importance_cuda.cuh"
#include "importance_shapes.h"

namespace mas_ext {
namespace {

namespace mc = mas_ext::cuda;

constexpr int64_t kConvWorkspaceBytes = int64_t(64) << 20;  // im2col chunk bound, independent of the batch

// The SM count (to size the sample splits), after checking the device is sm_80+ (the kernels' bf16/fp16
// tensor-core tiles; built for sm_80 and sm_90 only).
int sm_count(int device) {
  int n = 0, major = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    TORCH_CHECK(false, "mas_ext CUDA importance: cannot query device ", device);
  }
  TORCH_CHECK(major >= 8, "mas_ext CUDA importance kernels need compute capability 8.0 or newer (device ", device,
              " is ", major, ".x)");
  return n;
}

mc::DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return mc::DType::kFloat32;
    case at::kHalf:
      return mc::DType::kFloat16;
    case at::kBFloat16:
      return mc::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "mas_ext CUDA importance: activations must be float32, float16 or bfloat16, got ", t);
  }
  return mc::DType::kFloat32;  // unreachable
}

void check_accumulator(const at::Tensor& acc, const char* what, at::IntArrayRef shape, const at::Tensor& like) {
  TORCH_CHECK(acc.scalar_type() == at::kFloat, what, " accumulator must be float32, got ", acc.scalar_type());
  TORCH_CHECK(acc.is_contiguous(), what, " accumulator must be contiguous");
  TORCH_CHECK(acc.sizes().equals(shape), what, " accumulator has shape ", acc.sizes(), ", expected ", shape);
  TORCH_CHECK(acc.device() == like.device(), what, " accumulator is on ", acc.device(), ", the activations on ",
              like.device());
}

void check_activation(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda(), what, " must be a CUDA tensor");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), what, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

// The tensors in one dtype (their promotion: no precision lost), contiguous, detached; float64 in float32, as
// the CPU ops compute it (the accumulators are float32).
std::vector<at::Tensor> common(std::initializer_list<at::Tensor> ts) {
  at::ScalarType t = ts.begin()->scalar_type();
  for (const auto& x : ts) {
    TORCH_CHECK(x.device() == ts.begin()->device(), "mas_ext CUDA importance: tensors on ", x.device(), " and ",
                ts.begin()->device());
    t = at::promote_types(t, x.scalar_type());
  }
  if (t == at::kDouble) t = at::kFloat;
  dtype_of(t);
  std::vector<at::Tensor> out;
  for (const auto& x : ts) out.push_back(x.detach().to(t).contiguous());
  return out;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

void linear_importance_cuda(at::Tensor& omega_w, const std::optional<at::Tensor>& omega_b, const at::Tensor& input,
                            const at::Tensor& grad_out) {
  check_activation(input, "input");
  check_activation(grad_out, "grad_out");
  TORCH_CHECK(input.dim() == 3 && grad_out.dim() == 3, "linear_importance_: input and grad_out must be (N, P, features), got ",
              input.sizes(), " and ", grad_out.sizes());
  TORCH_CHECK(input.size(0) == grad_out.size(0) && input.size(1) == grad_out.size(1), "linear_importance_: input ",
              input.sizes(), " and grad_out ", grad_out.sizes(), " disagree on (N, P)");
  const int64_t N = input.size(0), P = input.size(1), I = input.size(2), O = grad_out.size(2);
  check_accumulator(omega_w, "weight", {O, I}, input);
  if (omega_b) check_accumulator(*omega_b, "bias", {O}, input);
  if (N == 0) return;
  const c10::cuda::CUDAGuard guard(input.device());
  const auto t = common({input, grad_out});
  check_launch(mc::linear_importance(dtype_of(t[0].scalar_type()), omega_w.data_ptr<float>(),
                                     omega_b ? omega_b->data_ptr<float>() : nullptr, t[0].data_ptr(), t[1].data_ptr(), N,
                                     P, I, O, sm_count(input.get_device()), c10::cuda::getCurrentCUDAStream().stream()),
               "linear_importance_");
}

void conv_importance_cuda(at::Tensor& omega_w, const std::optional<at::Tensor>& omega_b, const at::Tensor& input,
                          const at::Tensor& grad_out, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_activation(input, "input");
  check_activation(grad_out, "grad_out");
  const int64_t nd = input.dim() - 2;
  TORCH_CHECK(nd >= 1 && nd <= 3, "conv_importance_: input must be (N, C, *spatial) with 1-3 spatial dims, got ",
              input.sizes());
  TORCH_CHECK(grad_out.dim() == input.dim() && grad_out.size(0) == input.size(0), "conv_importance_: grad_out ",
              grad_out.sizes(), " does not match input ", input.sizes());
  TORCH_CHECK((int64_t)kernel_size.size() == nd && (int64_t)stride.size() == nd && (int64_t)padding.size() == nd &&
                  (int64_t)dilation.size() == nd,
              "conv_importance_: kernel_size, stride, padding and dilation need ", nd, " entries each");
  const int64_t N = input.size(0), C = input.size(1), O = grad_out.size(1);
  TORCH_CHECK(groups >= 1 && C % groups == 0 && O % groups == 0, "conv_importance_: groups=", groups,
              " must divide in_channels=", C, " and out_channels=", O);
  mc::ConvShape shape{};
  shape.C = C, shape.O = O, shape.groups = groups;
  for (int i = 0; i < 3; ++i) shape.in[i] = shape.out[i] = shape.k[i] = shape.s[i] = shape.d[i] = 1, shape.p[i] = 0;
  std::vector<int64_t> wshape{O, C / groups};
  for (int64_t i = 0; i < nd; ++i) {
    const int j = 3 - nd + i;
    TORCH_CHECK(kernel_size[i] >= 1 && stride[i] >= 1 && dilation[i] >= 1 && padding[i] >= 0,
                "conv_importance_: bad kernel_size/stride/padding/dilation");
    shape.in[j] = input.size(2 + i), shape.out[j] = grad_out.size(2 + i);
    shape.k[j] = kernel_size[i], shape.s[j] = stride[i], shape.p[j] = padding[i], shape.d[j] = dilation[i];
    TORCH_CHECK(mc::conv_out_size(shape.in[j], shape.k[j], shape.s[j], shape.p[j], shape.d[j]) == shape.out[j],
                "conv_importance_: grad_out spatial size ", grad_out.sizes(), " does not match the convolution of input ",
                input.sizes());
    wshape.push_back(kernel_size[i]);
  }
  check_accumulator(omega_w, "weight", wshape, input);
  if (omega_b) check_accumulator(*omega_b, "bias", {O}, input);
  if (N == 0) return;
  const c10::cuda::CUDAGuard guard(input.device());
  const auto t = common({input, grad_out});
  const int64_t per_sample = mc::conv_workspace_elems(shape, 1);
  const int64_t budget = std::max<int64_t>(per_sample, kConvWorkspaceBytes / (int64_t)t[0].element_size());
  const int64_t S = mc::conv_chunk_samples(shape, N, budget);
  at::Tensor ws = at::empty({mc::conv_workspace_elems(shape, S)}, t[0].options());  // stream-ordered by the allocator
  check_launch(mc::conv_importance(dtype_of(t[0].scalar_type()), omega_w.data_ptr<float>(),
                                   omega_b ? omega_b->data_ptr<float>() : nullptr, t[0].data_ptr(), t[1].data_ptr(),
                                   shape, N, ws.data_ptr(), ws.numel(), sm_count(input.get_device()),
                                   c10::cuda::getCurrentCUDAStream().stream()),
               "conv_importance_");
}

void tied_embedding_importance_cuda(at::Tensor& omega, const at::Tensor& input, const at::Tensor& grad_out,
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
              "tied_embedding_importance_: indices ", indices.sizes(), " and rows ", rows.sizes(), " do not match N = ", N,
              ", D = ", D);
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.device() == input.device(),
              "tied_embedding_importance_: indices must be int64 on ", input.device());
  check_accumulator(omega, "weight", {V, D}, input);
  if (N == 0) return;
  // An index >= V is skipped on the GPU (checking it would need a host sync); negative ones, as on the CPU.
  const c10::cuda::CUDAGuard guard(input.device());
  const auto t = common({input, grad_out, rows});
  const auto idx = indices.contiguous();
  check_launch(mc::tied_embedding_importance(dtype_of(t[0].scalar_type()), omega.data_ptr<float>(), t[0].data_ptr(),
                                             t[1].data_ptr(), idx.data_ptr<int64_t>(), t[2].data_ptr(), N, P, D, V, Q,
                                             sm_count(input.get_device()), c10::cuda::getCurrentCUDAStream().stream()),
               "tied_embedding_importance_");
}

void norm_affine_importance_cuda(at::Tensor& omega_w, const std::optional<at::Tensor>& omega_b, const at::Tensor& input,
                                 const at::Tensor& grad_out, double eps, bool rms) {
  check_activation(input, "input");
  check_activation(grad_out, "grad_out");
  const auto shape = norm_affine_shape(input, grad_out, eps);
  const int64_t N = shape[0], P = shape[1], C = shape[2];
  check_accumulator(omega_w, "weight", {C}, input);
  if (omega_b) check_accumulator(*omega_b, "bias", {C}, input);
  if (N == 0 || P == 0 || C == 0) return;
  const c10::cuda::CUDAGuard guard(input.device());
  const auto t = common({input, grad_out});
  at::Tensor stats = at::empty({N * P * 2}, input.options().dtype(at::kFloat));  // stream-ordered by the allocator
  check_launch(mc::norm_affine_importance(dtype_of(t[0].scalar_type()), omega_w.data_ptr<float>(),
                                          omega_b ? omega_b->data_ptr<float>() : nullptr, t[0].data_ptr(),
                                          t[1].data_ptr(), N, P, C, static_cast<float>(eps), rms,
                                          stats.data_ptr<float>(), sm_count(input.get_device()),
                                          c10::cuda::getCurrentCUDAStream().stream()),
               "norm_affine_importance_");
}

}  // namespace

TORCH_LIBRARY_IMPL(mas_ext, CUDA, m) {
  m.impl("linear_importance_", &linear_importance_cuda);
  m.impl("conv_importance_", &conv_importance_cuda);
  m.impl("tied_embedding_importance_", &tied_embedding_importance_cuda);
  m.impl("norm_affine_importance_", &norm_affine_importance_cuda);
}

}  // namespace mas_ext
