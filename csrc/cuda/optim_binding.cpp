// CUDA kernels of mas_ext::add_penalty_grad_, fused_sgd_mas_ and fused_adam_mas_ (schemas in
// csrc/cpu/optim_cpu.cpp; same semantics as the CPU kernels there).  Thin: argument checks, grouping
// by dtype, raw pointers to the launchers of optim_cuda.cu on the current stream.  No host
// synchronisation: grad_scale/found_inf stay on the device, and Adam's step counters are read and
// incremented on the device when they live there (capturable); host (CPU) counters are incremented
// here and the bias corrections passed by value, as the CPU kernel does.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <optional>
#include <vector>

#include "cuda/optim_cuda.cuh"

namespace mas_ext {
namespace {

namespace co = cuda_optim;
using at::Tensor;

bool is_fused_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

co::ScalarKind kind_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return co::ScalarKind::kFloat32;
    case at::kDouble: return co::ScalarKind::kFloat64;
    case at::kHalf: return co::ScalarKind::kFloat16;
    case at::kBFloat16: return co::ScalarKind::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "mas_ext: no CUDA kernel for dtype ", t);
}

// `t` can be read as a flat array aligned element by element with `param` (same device, shape, strides).
bool same_layout(const Tensor& t, const Tensor& param) {
  return t.defined() && t.device() == param.device() && t.sizes().equals(param.sizes()) &&
         (param.numel() <= 1 || t.strides().equals(param.strides()));
}

void check_param_list(const char* op, at::TensorList params) {
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor& p = params[i];
    TORCH_CHECK(p.is_cuda(), op, ": params[", i, "] is on ", p.device(), "; expected CUDA");
    TORCH_CHECK(p.device() == params[0].device(), op, ": params[", i, "] is on ", p.device(), " but params[0] on ",
                params[0].device());
    TORCH_CHECK(is_fused_dtype(p.scalar_type()), op, ": params[", i, "] has dtype ", p.scalar_type(),
                "; expected float32, float64, bfloat16 or float16");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": params[", i,
                "] must be dense (contiguous or a permutation of it)");
  }
}

void check_aligned(const char* op, const char* what, at::TensorList ts, at::TensorList params) {
  TORCH_CHECK(ts.size() == params.size(), op, ": ", what, " has ", ts.size(), " tensors but params has ",
              params.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK(!ts[i].is_sparse(), op, ": ", what, "[", i, "] is sparse; sparse tensors are not supported");
    TORCH_CHECK(same_layout(ts[i], params[i]), op, ": ", what, "[", i,
                "] must be a tensor on the device of params[", i, "] with its shape and strides");
    TORCH_CHECK(ts[i].scalar_type() == params[i].scalar_type(), op, ": ", what, "[", i, "] has dtype ",
                ts[i].scalar_type(), " but params[", i, "] has ", params[i].scalar_type());
  }
}

// Optional penalty terms: omegas[i]/stars[i] both set (tracked) or both None (untracked).
void check_penalty(const char* op, const c10::List<std::optional<Tensor>>& omegas,
                   const c10::List<std::optional<Tensor>>& stars, at::TensorList params, std::vector<Tensor>& om_out,
                   std::vector<Tensor>& star_out) {
  TORCH_CHECK(omegas.size() == params.size() && stars.size() == params.size(), op,
              ": omegas and stars need one entry (a tensor or None) per param");
  om_out.assign(params.size(), Tensor());
  star_out.assign(params.size(), Tensor());
  for (size_t i = 0; i < params.size(); ++i) {
    std::optional<Tensor> o = omegas.get(i);
    std::optional<Tensor> s = stars.get(i);
    const bool has_o = o.has_value() && o->defined();
    const bool has_s = s.has_value() && s->defined();
    TORCH_CHECK(has_o == has_s, op, ": omegas[", i, "] and stars[", i, "] must both be tensors or both be None");
    if (!has_o) continue;
    TORCH_CHECK(o->scalar_type() == at::kFloat, op, ": omegas[", i, "] must be float32, got ", o->scalar_type());
    TORCH_CHECK(same_layout(*o, params[i]), op, ": omegas[", i, "] must have the device, shape and strides of params[",
                i, "]");
    TORCH_CHECK(s->scalar_type() == params[i].scalar_type(), op, ": stars[", i, "] has dtype ", s->scalar_type(),
                " but params[", i, "] has ", params[i].scalar_type());
    TORCH_CHECK(same_layout(*s, params[i]), op, ": stars[", i, "] must have the device, shape and strides of params[",
                i, "]");
    om_out[i] = *o;
    star_out[i] = *s;
  }
}

// A one-element float32 tensor on the params' device (grad_scale / found_inf), or null.
const float* device_scalar(const char* op, const char* what, const std::optional<Tensor>& t, const Tensor& param) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == param.device(), op, ": ", what,
              " must be a one-element float32 tensor on ", param.device(), " (got ", t->scalar_type(), " on ",
              t->device(), " with ", t->numel(), " elements)");
  return t->data_ptr<float>();
}

void* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Tensor indices grouped by dtype (each launcher call takes one dtype).
std::vector<std::vector<int64_t>> by_dtype(at::TensorList params, const std::vector<bool>& take) {
  std::array<std::vector<int64_t>, 4> g;
  for (size_t i = 0; i < params.size(); ++i) {
    if (take[i]) g[static_cast<int>(kind_of(params[i].scalar_type()))].push_back(static_cast<int64_t>(i));
  }
  std::vector<std::vector<int64_t>> out;
  for (auto& v : g) {
    if (!v.empty()) out.push_back(std::move(v));
  }
  return out;
}

// Slot-major pointer lists for the tensors in `idx`: get(slot, i) gives tensor i's pointer in that slot.
template <int kDepth, class Get>
struct Lists {
  std::array<std::vector<void*>, kDepth> slots;
  std::array<void* const*, kDepth> heads;
  std::vector<int64_t> numels;
  Lists(const std::vector<int64_t>& idx, at::TensorList params, const std::array<bool, kDepth>& present, const Get& get) {
    for (int d = 0; d < kDepth; ++d) {
      if (present[d]) {
        slots[d].reserve(idx.size());
        for (int64_t i : idx) slots[d].push_back(get(d, i));
      }
      heads[d] = present[d] ? slots[d].data() : nullptr;
    }
    for (int64_t i : idx) numels.push_back(params[i].numel());
  }
};
template <int kDepth, class Get>
Lists<kDepth, Get> make_lists(const std::vector<int64_t>& idx, at::TensorList params,
                              const std::array<bool, kDepth>& present, const Get& get) {
  return Lists<kDepth, Get>(idx, params, present, get);
}

// =================================================================================
// add_penalty_grad_: grad += scale * Ω * (θ − θ*)
// =================================================================================
void add_penalty_grad_cuda(at::TensorList grads, at::TensorList params, at::TensorList omegas, at::TensorList stars,
                           double scale) {
  constexpr const char* op = "mas_ext::add_penalty_grad_";
  TORCH_CHECK(grads.size() == params.size() && omegas.size() == params.size() && stars.size() == params.size(), op,
              ": grads, params, omegas and stars must have the same length (got ", grads.size(), ", ", params.size(),
              ", ", omegas.size(), ", ", stars.size(), ")");
  const size_t n = params.size();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<bool> fast(n, false);
  for (size_t i = 0; i < n; ++i) {
    const Tensor &g = grads[i], &p = params[i], &o = omegas[i], &s = stars[i];
    TORCH_CHECK(g.defined(), op, ": grads[", i, "] is undefined (the parameter has no .grad)");
    TORCH_CHECK(p.is_cuda() && p.device() == params[0].device() && g.device() == p.device() &&
                    o.device() == p.device() && s.device() == p.device(),
                op, ": tensors of entry ", i, " must all be on ", params[0].device());
    TORCH_CHECK(!g.is_sparse(), op, ": grads[", i, "] is sparse; add the penalty to a dense gradient");
    TORCH_CHECK(g.sizes().equals(p.sizes()) && o.sizes().equals(p.sizes()) && s.sizes().equals(p.sizes()), op,
                ": grads[", i, "], omegas[", i, "] and stars[", i, "] must have the shape of params[", i, "] ",
                p.sizes());
    TORCH_CHECK(o.scalar_type() == at::kFloat, op, ": omegas[", i, "] must be float32, got ", o.scalar_type());
    TORCH_CHECK(at::isFloatingType(g.scalar_type()) && at::isFloatingType(p.scalar_type()), op, ": entry ", i,
                " must be a floating-point parameter and gradient");
    fast[i] = is_fused_dtype(p.scalar_type()) && g.scalar_type() == p.scalar_type() &&
              s.scalar_type() == p.scalar_type() && p.is_non_overlapping_and_dense() && same_layout(g, p) &&
              same_layout(o, p) && same_layout(s, p);
  }
  // Unusual layouts or mixed dtypes: the same formula with ATen ops (on the current stream), in >= float32.
  for (size_t i = 0; i < n; ++i) {
    if (fast[i]) continue;
    const auto math = at::promote_types(at::promote_types(params[i].scalar_type(), grads[i].scalar_type()), at::kFloat);
    Tensor d = params[i].to(math).sub(stars[i].to(math)).mul_(omegas[i].to(math));
    grads[i].copy_(grads[i].to(math).add_(d, scale));
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(params[0].device().index()).stream();
  for (const auto& idx : by_dtype(params, fast)) {
    auto l = make_lists<co::kPenDepth>(idx, params, {true, true, true, true}, [&](int d, int64_t i) -> void* {
      switch (d) {
        case co::kPenGrad: return grads[i].data_ptr();
        case co::kPenParam: return params[i].data_ptr();
        case co::kPenOmega: return omegas[i].data_ptr();
        default: return stars[i].data_ptr();
      }
    });
    C10_CUDA_CHECK(co::launch_add_penalty_grad(kind_of(params[idx[0]].scalar_type()), static_cast<int64_t>(idx.size()),
                                               l.numels.data(), l.heads.data(), co::PenaltyArgs{scale}, stream));
  }
}

// =================================================================================
// SGD
// =================================================================================
void fused_sgd_mas_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                        const c10::List<std::optional<Tensor>>& omegas, const c10::List<std::optional<Tensor>>& stars,
                        double penalty_scale, double lr, double momentum, double dampening, double weight_decay,
                        bool nesterov, bool maximize, bool is_first_step, const std::optional<Tensor>& grad_scale,
                        const std::optional<Tensor>& found_inf) {
  constexpr const char* op = "mas_ext::fused_sgd_mas_";
  check_param_list(op, params);
  check_aligned(op, "grads", grads, params);
  if (momentum != 0) check_aligned(op, "momentum_buffers", momentum_buffers, params);
  else TORCH_CHECK(momentum_buffers.empty(), op, ": momentum_buffers must be empty when momentum == 0");
  std::vector<Tensor> oms, sts;
  check_penalty(op, omegas, stars, params, oms, sts);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  co::SgdArgs a{};
  a.penalty_scale = penalty_scale;
  a.lr = lr;
  a.momentum = momentum;
  a.dampening = dampening;
  a.weight_decay = weight_decay;
  a.grad_scale = device_scalar(op, "grad_scale", grad_scale, params[0]);
  a.found_inf = device_scalar(op, "found_inf", found_inf, params[0]);
  a.nesterov = nesterov;
  a.maximize = maximize;
  a.first_step = is_first_step;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(params[0].device().index()).stream();
  for (const auto& idx : by_dtype(params, std::vector<bool>(params.size(), true))) {
    auto l = make_lists<co::kSgdDepth>(idx, params, {true, true, momentum != 0, true, true},
                                       [&](int d, int64_t i) -> void* {
                                         switch (d) {
                                           case co::kSgdParam: return params[i].data_ptr();
                                           case co::kSgdGrad: return grads[i].data_ptr();
                                           case co::kSgdBuf: return momentum_buffers[i].data_ptr();
                                           case co::kSgdOmega: return ptr_or_null(oms[i]);
                                           default: return ptr_or_null(sts[i]);
                                         }
                                       });
    C10_CUDA_CHECK(co::launch_fused_sgd(kind_of(params[idx[0]].scalar_type()), static_cast<int64_t>(idx.size()),
                                        l.numels.data(), l.heads.data(), a, stream));
  }
}

// =================================================================================
// Adam / AdamW
// =================================================================================
void fused_adam_mas_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                         const c10::List<std::optional<Tensor>>& omegas, const c10::List<std::optional<Tensor>>& stars,
                         double penalty_scale, double lr, double beta1, double beta2, double weight_decay, double eps,
                         bool amsgrad, bool maximize, bool decoupled_weight_decay,
                         const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  constexpr const char* op = "mas_ext::fused_adam_mas_";
  check_param_list(op, params);
  check_aligned(op, "grads", grads, params);
  check_aligned(op, "exp_avgs", exp_avgs, params);
  check_aligned(op, "exp_avg_sqs", exp_avg_sqs, params);
  if (amsgrad) check_aligned(op, "max_exp_avg_sqs", max_exp_avg_sqs, params);
  else TORCH_CHECK(max_exp_avg_sqs.empty(), op, ": max_exp_avg_sqs must be empty when amsgrad is False");
  TORCH_CHECK(state_steps.size() == params.size(), op, ": state_steps needs one tensor per param");
  std::vector<Tensor> oms, sts;
  check_penalty(op, omegas, stars, params, oms, sts);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());

  // Step counters: all on the CPU (incremented here, bias corrections by value) or all on the params'
  // device (float32/float64, incremented and read by the kernels: no sync, capturable).
  const bool device_steps = state_steps[0].device() == params[0].device();
  const at::ScalarType step_dtype = state_steps[0].scalar_type();
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const Tensor& s = state_steps[i];
    TORCH_CHECK(s.numel() == 1, op, ": state_steps[", i, "] must have one element");
    if (device_steps) {
      TORCH_CHECK(s.device() == params[0].device() && s.scalar_type() == step_dtype &&
                      (step_dtype == at::kFloat || step_dtype == at::kDouble),
                  op, ": state_steps[", i, "] must be a float32/float64 scalar on ", params[0].device(),
                  " like state_steps[0] (got ", s.scalar_type(), " on ", s.device(), ")");
    } else {
      TORCH_CHECK(s.device().is_cpu(), op, ": state_steps must all be on the CPU or all on ", params[0].device(),
                  " (state_steps[", i, "] is on ", s.device(), ")");
    }
  }
  co::AdamArgs a{};
  a.penalty_scale = penalty_scale;
  a.lr = lr;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.weight_decay = weight_decay;
  a.eps = eps;
  a.grad_scale = device_scalar(op, "grad_scale", grad_scale, params[0]);
  a.found_inf = device_scalar(op, "found_inf", found_inf, params[0]);
  a.amsgrad = amsgrad;
  a.maximize = maximize;
  a.decoupled = decoupled_weight_decay;
  a.device_steps = device_steps;
  a.step_f64 = device_steps && step_dtype == at::kDouble;
  TORCH_CHECK(device_steps || a.found_inf == nullptr, op,
              ": found_inf needs the step counters on the device (state_steps on ", params[0].device(),
              "): skipping a step with host counters would need a host synchronisation");

  std::vector<co::AdamExtra> extra;
  if (!device_steps) {
    extra.resize(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      state_steps[i].add_(1);
      // Bias corrections in double, exactly as torch.optim's Python (and the CPU kernel) computes them.
      const double step = state_steps[i].item<double>();
      extra[i] = {lr / (1 - std::pow(beta1, step)), std::pow(1 - std::pow(beta2, step), 0.5)};
    }
  }
  if (device_steps) {  // the kernels skip empty tensors: their counters step here, as torch's do (not on found_inf)
    for (size_t i = 0; i < params.size(); ++i) {
      if (params[i].numel() != 0) continue;
      if (found_inf.has_value()) {
        state_steps[i].add_(found_inf->reshape({}).eq(0).to(state_steps[i].scalar_type()));
      } else {
        state_steps[i].add_(1);
      }
    }
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(params[0].device().index()).stream();
  for (const auto& idx : by_dtype(params, std::vector<bool>(params.size(), true))) {
    auto l = make_lists<co::kAdamDepth>(
        idx, params, {true, true, true, true, amsgrad, true, true, device_steps}, [&](int d, int64_t i) -> void* {
          switch (d) {
            case co::kAdamParam: return params[i].data_ptr();
            case co::kAdamGrad: return grads[i].data_ptr();
            case co::kAdamExpAvg: return exp_avgs[i].data_ptr();
            case co::kAdamExpAvgSq: return exp_avg_sqs[i].data_ptr();
            case co::kAdamMaxExpAvgSq: return max_exp_avg_sqs[i].data_ptr();
            case co::kAdamOmega: return ptr_or_null(oms[i]);
            case co::kAdamStar: return ptr_or_null(sts[i]);
            default: return state_steps[i].data_ptr();
          }
        });
    std::vector<co::AdamExtra> ex;
    if (!device_steps) {
      for (int64_t i : idx) ex.push_back(extra[i]);
    }
    C10_CUDA_CHECK(co::launch_fused_adam(kind_of(params[idx[0]].scalar_type()), static_cast<int64_t>(idx.size()),
                                         l.numels.data(), l.heads.data(), device_steps ? nullptr : ex.data(), a,
                                         stream));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mas_ext, CUDA, m) {
  m.impl("add_penalty_grad_", &add_penalty_grad_cuda);
  m.impl("fused_sgd_mas_", &fused_sgd_mas_cuda);
  m.impl("fused_adam_mas_", &fused_adam_mas_cuda);
}

}  // namespace mas_ext
