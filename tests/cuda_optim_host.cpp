// Host harness for csrc/cuda/optim_cuda_math.h (compiled with g++ by tests/test_cuda_optim_math.py, no
// CUDA, no torch): runs the CUDA kernels' chunk planner and per-chunk bodies on the CPU, block after
// block and thread after thread, exactly as optim_cuda.cu launches them on the device.
//
//   mt_coverage   a counting op through the real planner/run_blocks: how often each element is visited,
//                 how many by the vector path, alignment of every vector access, number of launches
//   mt_*          the real PenaltyOp/SgdOp/AdamOp bodies (one dtype per call), as the launchers run them
//   conversions   the host float<->half/bfloat16 conversions (checked against torch)
#include "cuda/optim_cuda_math.h"

#include <type_traits>
#include <vector>

using namespace mas_ext::cuda_optim;

namespace {

// Runs one launch's blocks on the host: `grid` blocks of `nthreads` threads (no shared memory and no
// barriers in the kernels, so threads can run one after another).
template <class Op>
void run_launch(const typename Op::Launch& L, int64_t chunks, int64_t grid_cap, int nthreads) {
  const int64_t grid = chunks < grid_cap ? chunks : grid_cap;
  for (int64_t b = 0; b < grid; ++b) {
    for (int t = 0; t < nthreads; ++t) run_blocks<Op>(L, b, grid, t, nthreads);
  }
}

// ---------------------------------------------------------------------------------------- coverage
struct CountExtra {
  int64_t first;      // offset of the tensor's first element in the counts array
  int64_t tensor;     // index in the caller's list
};
struct CountArgs {
  int64_t* counts;
  int64_t* vec_elems;   // per tensor: elements handled by vector accesses
  int64_t* violations;  // misaligned vector accesses
  int elem_bytes;       // param dtype size
  int omega_slot;       // slot holding float32 data (-1: none)
};

template <int kVecN, class LikeTable>
struct CountOp {
  static constexpr int kVec = kVecN;
  using Table = TensorTable<LikeTable::kSlots, LikeTable::kMax, CountExtra>;
  struct Launch {
    Table tab;
    CountArgs args;
  };
  const Launch* L;
  int t;
  static bool skip(const CountArgs&) { return false; }
  CountOp(const Launch& l, int tt) : L(&l), t(tt) {}
  bool aligned() const {
    bool ok = true;
    for (int d = 0; d < Table::kSlots; ++d) ok = ok && aligned16(L->tab.ptr[d][t]);
    return ok;
  }
  template <int N>
  void apply(int64_t i) const {
    const CountArgs& a = L->args;
    for (int j = 0; j < N; ++j) a.counts[L->tab.extra[t].first + i + j] += 1;
    if (N > 1) {
      a.vec_elems[L->tab.extra[t].tensor] += N;
      for (int d = 0; d < Table::kSlots; ++d) {
        const uintptr_t base = reinterpret_cast<uintptr_t>(L->tab.ptr[d][t]);
        if (base == 0) continue;
        const int es = d == a.omega_slot ? 4 : a.elem_bytes;
        const int need = N * es >= 16 ? 16 : N * es;
        if ((base + uintptr_t(i) * es) % need != 0) a.violations[0] += 1;
      }
    }
  }
};

template <int kVecN, class LikeTable>
int coverage_t(int64_t n, const int64_t* numels, const int64_t* offsets, int elem_bytes, int omega_slot,
               int64_t grid_cap, int nthreads, int64_t* counts, int64_t* vec_elems, int64_t* violations,
               int64_t* launches, int64_t* max_tensors) {
  using Op = CountOp<kVecN, LikeTable>;
  static typename Op::Launch L;  // large: not on the stack
  L.args = CountArgs{counts, vec_elems, violations, elem_bytes, omega_slot};
  std::vector<int64_t> first(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) first[i + 1] = first[i] + numels[i];
  *launches = 0;
  *max_tensors = LikeTable::kMax;
  auto fill = [&](typename Op::Table& tab, int s, int64_t i) {
    for (int d = 0; d < LikeTable::kSlots; ++d) {
      // fake, 256-byte aligned bases per slot and tensor, shifted by the requested elements
      const int es = d == omega_slot ? 4 : elem_bytes;
      const uintptr_t base = (uintptr_t(1) << 40) + (uintptr_t(d) << 36) + (uintptr_t(i) << 12);
      tab.ptr[d][s] = reinterpret_cast<void*>(base + uintptr_t(offsets[i * LikeTable::kSlots + d] * es));
    }
    tab.extra[s] = CountExtra{first[i], i};
  };
  return plan_launches(n, numels, L.tab, fill, [&](int64_t chunks) {
    *launches += 1;
    run_launch<Op>(L, chunks, grid_cap, nthreads);
    return 0;
  });
}

template <class Fn>
int with_kind(int kind, const Fn& fn) {
  switch (kind) {
    case 0: return fn(float{});
    case 1: return fn(double{});
    case 2: return fn(f16_t{});
    case 3: return fn(bf16_t{});
  }
  return -2;
}

template <class Op, class Args, class Before>
int run_op(int64_t n, const int64_t* numels, void* const* slot_major, const uint32_t present_mask, const Args& args,
           const AdamExtra* extra, int64_t grid_cap, int nthreads, const Before& before, int64_t* launches) {
  static typename Op::Launch L;  // large: not on the stack
  L.args = args;
  constexpr int kDepth = Op::Table::kSlots;
  void* const* lists[kDepth];
  for (int d = 0; d < kDepth; ++d) lists[d] = (present_mask >> d) & 1u ? slot_major + d * n : nullptr;
  *launches = 0;
  auto fill = [&](typename Op::Table& tab, int s, int64_t i) {
    fill_slots(tab, s, i, lists);
    if constexpr (std::is_same_v<std::decay_t<decltype(tab.extra[0])>, AdamExtra>) {
      tab.extra[s] = extra != nullptr ? extra[i] : AdamExtra{0.0, 0.0};
    }
  };
  return plan_launches(n, numels, L.tab, fill, [&](int64_t chunks) {
    *launches += 1;
    before(L);
    run_launch<Op>(L, chunks, grid_cap, nthreads);
    return 0;
  });
}

struct NoBefore {
  template <class L>
  void operator()(const L&) const {}
};

}  // namespace

extern "C" {

// op: 0 penalty, 1 sgd, 2 adam (table capacity and slots of that op); kind: 0 f32, 1 f64, 2 f16, 3 bf16.
// offsets: n x slots element offsets of each slot's base pointer.
int mt_coverage(int op, int kind, int64_t n, const int64_t* numels, const int64_t* offsets, int64_t grid_cap,
                int nthreads, int64_t* counts, int64_t* vec_elems, int64_t* violations, int64_t* launches,
                int64_t* max_tensors) {
  return with_kind(kind, [&](auto tag) -> int {
    using T = decltype(tag);
    constexpr int kVec = Elem<T>::kVec;
    const int es = int(sizeof(T));
    switch (op) {
      case 0:
        return coverage_t<kVec, typename PenaltyOp<T>::Table>(n, numels, offsets, es, kPenOmega, grid_cap, nthreads,
                                                              counts, vec_elems, violations, launches, max_tensors);
      case 1:
        return coverage_t<kVec, typename SgdOp<T>::Table>(n, numels, offsets, es, kSgdOmega, grid_cap, nthreads,
                                                          counts, vec_elems, violations, launches, max_tensors);
      case 2:
        return coverage_t<kVec, typename AdamOp<T>::Table>(n, numels, offsets, es, kAdamOmega, grid_cap, nthreads,
                                                           counts, vec_elems, violations, launches, max_tensors);
    }
    return -2;
  });
}

int64_t mt_chunk_elems() { return kChunkElems; }
int mt_block_threads() { return kBlockThreads; }
int mt_vec(int kind) {
  return with_kind(kind, [](auto tag) { return Elem<decltype(tag)>::kVec; });
}
int64_t mt_launch_bytes(int op, int kind) {
  return with_kind(kind, [&](auto tag) -> int {
    using T = decltype(tag);
    switch (op) {
      case 0: return int(sizeof(typename PenaltyOp<T>::Launch));
      case 1: return int(sizeof(typename SgdOp<T>::Launch));
      case 2: return int(sizeof(typename AdamOp<T>::Launch));
    }
    return -2;
  });
}

// grad += scale * Ω * (θ − θ*); slot_major: kPenDepth x n pointers.
int mt_penalty(int kind, int64_t n, const int64_t* numels, void* const* slot_major, double scale, int64_t grid_cap,
               int nthreads, int64_t* launches) {
  return with_kind(kind, [&](auto tag) -> int {
    using Op = PenaltyOp<decltype(tag)>;
    const PenaltyArgs a{scale};
    return run_op<Op>(n, numels, slot_major, 0xfu, a, nullptr, grid_cap, nthreads, NoBefore{}, launches);
  });
}

int mt_sgd(int kind, int64_t n, const int64_t* numels, void* const* slot_major, uint32_t present_mask,
           double penalty_scale, double lr, double momentum, double dampening, double weight_decay, int nesterov,
           int maximize, int first_step, const float* grad_scale, const float* found_inf, int64_t grid_cap,
           int nthreads, int64_t* launches) {
  return with_kind(kind, [&](auto tag) -> int {
    using Op = SgdOp<decltype(tag)>;
    SgdArgs a{};
    a.penalty_scale = penalty_scale;
    a.lr = lr;
    a.momentum = momentum;
    a.dampening = dampening;
    a.weight_decay = weight_decay;
    a.grad_scale = grad_scale;
    a.found_inf = found_inf;
    a.nesterov = nesterov != 0;
    a.maximize = maximize != 0;
    a.first_step = first_step != 0;
    return run_op<Op>(n, numels, slot_major, present_mask, a, nullptr, grid_cap, nthreads, NoBefore{}, launches);
  });
}

// host_extra: 2n doubles (step_size, bc2_sqrt) when !device_steps.
int mt_adam(int kind, int64_t n, const int64_t* numels, void* const* slot_major, uint32_t present_mask,
            const double* host_extra, double penalty_scale, double lr, double beta1, double beta2,
            double weight_decay, double eps, int amsgrad, int maximize, int decoupled, int device_steps,
            int step_f64, const float* grad_scale, const float* found_inf, int64_t grid_cap, int nthreads,
            int64_t* launches) {
  return with_kind(kind, [&](auto tag) -> int {
    using T = decltype(tag);
    using Op = AdamOp<T>;
    AdamArgs a{};
    a.penalty_scale = penalty_scale;
    a.lr = lr;
    a.beta1 = beta1;
    a.beta2 = beta2;
    a.weight_decay = weight_decay;
    a.eps = eps;
    a.grad_scale = grad_scale;
    a.found_inf = found_inf;
    a.amsgrad = amsgrad != 0;
    a.maximize = maximize != 0;
    a.decoupled = decoupled != 0;
    a.device_steps = device_steps != 0;
    a.step_f64 = step_f64 != 0;
    // the step-count kernel before each launch: one thread per table entry
    auto before = [](const typename Op::Launch& L) {
      for (int t = 0; t < Op::Table::kMax; ++t) Op::increment_step(L, t);
    };
    return run_op<Op>(n, numels, slot_major, present_mask, a, reinterpret_cast<const AdamExtra*>(host_extra),
                      grid_cap, nthreads, before, launches);
  });
}

void mt_float_to_half(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = Elem<f16_t>::from_op(in[i]).bits;
}
void mt_half_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = Elem<f16_t>::to_op(f16_t{in[i]});
}
void mt_float_to_bf16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = Elem<bf16_t>::from_op(in[i]).bits;
}
void mt_bf16_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = Elem<bf16_t>::to_op(bf16_t{in[i]});
}

}  // extern "C"
