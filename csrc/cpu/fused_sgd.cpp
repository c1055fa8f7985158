// CPU kernel of fused_sgd_: torch.optim.SGD's step over whole lists of parameters in one
// at::parallel_for over (tensor, chunk) work items, reading each parameter, gradient and
// momentum buffer once and writing the parameter, the buffer and (optionally) the applied
// update in the same pass.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/cpu_isa.h"
#include "multi_tensor.h"
#include "multi_tensor_checks.h"

namespace mpl_fast {
namespace {

struct SgdItem {
  void* p;
  const void* g;
  void* buf;  // null when momentum == 0
  void* upd;  // null when no update_out was asked for
  int64_t begin, n;
};

// Returns whether some gradient or some new parameter value of the chunk is inf or nan
// ((v - v) != 0 exactly then; a non-finite parameter or momentum buffer always shows up in the
// new parameter). An integer OR reduction, unlike a float sum, vectorises without -ffast-math.
// Only computed when the caller asked for found_inf_out (kCheck): otherwise it is work in the
// loop that nobody reads.
template <typename scalar_t, bool kMomentum, bool kNesterov, bool kWeightDecay, bool kUpdate, bool kCheck>
MPL_ALWAYS_INLINE bool sgd_chunk(const SgdItem& it, const SgdHyper<at::opmath_type<scalar_t>>& h) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* __restrict__ p = static_cast<scalar_t*>(it.p) + it.begin;
  const scalar_t* __restrict__ g = static_cast<const scalar_t*>(it.g) + it.begin;
  scalar_t* __restrict__ buf = kMomentum ? static_cast<scalar_t*>(it.buf) + it.begin : nullptr;
  scalar_t* __restrict__ upd = kUpdate ? static_cast<scalar_t*>(it.upd) + it.begin : nullptr;
  // A local copy: stores through p could alias a referenced h, forcing a reload per element
  // and blocking vectorisation.
  const SgdHyper<acc_t> hl = h;
  unsigned nonfinite = 0;
  for (int64_t i = 0; i < it.n; ++i) {
    const acc_t p_old = load_as<acc_t>(p[i]);
    const acc_t gi = load_as<acc_t>(g[i]);
    acc_t b = kMomentum ? load_as<acc_t>(buf[i]) : acc_t(0);
    const scalar_t p_new = static_cast<scalar_t>(sgd_element_static<acc_t, kMomentum, kNesterov, kWeightDecay>(p_old, gi, b, hl));
    p[i] = p_new;
    if constexpr (kMomentum) buf[i] = static_cast<scalar_t>(b);
    // Δθ exactly as applied: the stored new value minus the old one.
    if constexpr (kUpdate) upd[i] = static_cast<scalar_t>(static_cast<acc_t>(p_new) - p_old);
    if constexpr (kCheck) {
      const acc_t stored = static_cast<acc_t>(p_new);
      nonfinite |= static_cast<unsigned>(((gi - gi) + (stored - stored)) != acc_t(0));
    }
  }
  return nonfinite != 0;
}

template <typename scalar_t, bool kCheck>
MPL_ALWAYS_INLINE bool run_item_flags(const SgdItem& it, const SgdHyper<at::opmath_type<scalar_t>>& h, bool wd, bool nesterov) {
  // The flags that change which operations run are template parameters: no control flow in
  // the loop (6 combinations x with/without update_out x with/without the non-finite check).
  const bool upd = it.upd != nullptr;
  if (it.buf == nullptr) {
    if (wd) return upd ? sgd_chunk<scalar_t, false, false, true, true, kCheck>(it, h) : sgd_chunk<scalar_t, false, false, true, false, kCheck>(it, h);
    return upd ? sgd_chunk<scalar_t, false, false, false, true, kCheck>(it, h) : sgd_chunk<scalar_t, false, false, false, false, kCheck>(it, h);
  }
  if (nesterov) {
    if (wd) return upd ? sgd_chunk<scalar_t, true, true, true, true, kCheck>(it, h) : sgd_chunk<scalar_t, true, true, true, false, kCheck>(it, h);
    return upd ? sgd_chunk<scalar_t, true, true, false, true, kCheck>(it, h) : sgd_chunk<scalar_t, true, true, false, false, kCheck>(it, h);
  }
  if (wd) return upd ? sgd_chunk<scalar_t, true, false, true, true, kCheck>(it, h) : sgd_chunk<scalar_t, true, false, true, false, kCheck>(it, h);
  return upd ? sgd_chunk<scalar_t, true, false, false, true, kCheck>(it, h) : sgd_chunk<scalar_t, true, false, false, false, kCheck>(it, h);
}

template <typename scalar_t>
MPL_ALWAYS_INLINE bool run_item_body(const SgdItem& it, const SgdArgs& a, double lr, bool check) {
  using acc_t = at::opmath_type<scalar_t>;
  const SgdHyper<acc_t> h{static_cast<acc_t>(lr), static_cast<acc_t>(a.momentum),
                          static_cast<acc_t>(1.0 - a.dampening), static_cast<acc_t>(a.weight_decay),
                          a.nesterov, a.maximize, a.first_step};
  const bool wd = a.weight_decay != 0;
  return check ? run_item_flags<scalar_t, true>(it, h, wd, a.nesterov) : run_item_flags<scalar_t, false>(it, h, wd, a.nesterov);
}

template <typename scalar_t>
bool run_item(const SgdItem& it, const SgdArgs& a, double lr, bool check) {
  return run_item_body<scalar_t>(it, a, lr, check);
}

// The same body compiled for AVX2/FMA/F16C, chosen at run time (same machine, same bits).
template <typename scalar_t>
MPL_TARGET_AVX2 bool run_item_avx2(const SgdItem& it, const SgdArgs& a, double lr, bool check) {
  return run_item_body<scalar_t>(it, a, lr, check);
}

// And for AVX-512: the same operations (FMA contraction as in the AVX2 copy), twice as wide,
// which matters when parameters sit in cache (small models). Same bits as the AVX2 copy.
#if MPL_HAVE_AVX2_CLONE
template <typename scalar_t>
__attribute__((target("avx2,fma,f16c,avx512f,avx512vl"))) bool run_item_avx512(const SgdItem& it, const SgdArgs& a,
                                                                                double lr, bool check) {
  return run_item_body<scalar_t>(it, a, lr, check);
}

bool cpu_has_avx512() {
  static const bool ok = cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  return ok;
}
#endif

using SgdItemFn = bool (*)(const SgdItem&, const SgdArgs&, double, bool);

// fp16/bf16 stores go through c10's scalar rounding and do not vectorise: no AVX2 clone for them.
template <typename scalar_t>
SgdItemFn pick_isa() {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
#if MPL_HAVE_AVX2_CLONE
    if (cpu_has_avx512()) return &run_item_avx512<scalar_t>;
#endif
    if (cpu_has_avx2()) return &run_item_avx2<scalar_t>;
  }
  return &run_item<scalar_t>;
}

SgdItemFn pick_sgd_fn(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return pick_isa<float>();
    case at::kDouble: return pick_isa<double>();
    case at::kHalf: return pick_isa<c10::Half>();
    default: return pick_isa<c10::BFloat16>();  // the checks admit only these four
  }
}

bool flag_is_set(const c10::optional<at::Tensor>& flag) {
  return flag.has_value() && flag->defined() && *flag->const_data_ptr<float>() != 0.0f;
}

void fused_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   at::TensorList update_out, double lr, const c10::optional<at::Tensor>& lr_tensor,
                   double momentum, double dampening, double weight_decay, bool nesterov,
                   bool maximize, bool first_step, const c10::optional<at::Tensor>& found_inf,
                   const c10::optional<at::Tensor>& found_inf_out) {
  const SgdArgs args{lr, lr_tensor, momentum, dampening, weight_decay, nesterov, maximize, first_step};
  const auto grads_read =
      prepare_sgd_lists(params, grads, momentum_buffers, update_out, args, found_inf, found_inf_out);
  if (params.empty()) return;
  // Skipped step (e.g. AMP found an inf): nothing moves, so the applied update is zero.
  if (flag_is_set(found_inf)) {
    for (const at::Tensor& u : update_out) u.zero_();
    return;
  }
  const double lr_value =
      (lr_tensor.has_value() && lr_tensor->defined()) ? lr_tensor->item<double>() : lr;

  // Host scratch: one descriptor and one flag per 32K-element chunk.
  std::vector<SgdItem> items;
  std::vector<SgdItemFn> fns;
  int64_t total_elems = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    const SgdItemFn fn = pick_sgd_fn(params[i].scalar_type());
    void* buf = momentum != 0 ? momentum_buffers[i].mutable_data_ptr() : nullptr;
    void* upd = update_out.empty() ? nullptr : update_out[i].mutable_data_ptr();
    for (int64_t begin = 0; begin < n; begin += kCpuChunk) {
      items.push_back({params[i].mutable_data_ptr(), grads_read[i].const_data_ptr(), buf, upd,
                       begin, std::min(kCpuChunk, n - begin)});
      fns.push_back(fn);
    }
    total_elems += n;
  }
  std::vector<char> nonfinite(items.size());
  const bool check = found_inf_out.has_value() && found_inf_out->defined();
  const int64_t grain = total_elems < 4 * kCpuChunk ? static_cast<int64_t>(items.size()) + 1 : 1;
  at::parallel_for(0, static_cast<int64_t>(items.size()), grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) nonfinite[k] = fns[k](items[k], args, lr_value, check);
  });
  if (check) {
    for (char bad : nonfinite) {
      if (bad) {
        *found_inf_out->mutable_data_ptr<float>() = 1.0f;
        break;
      }
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mpl_fast, CPU, m) { m.impl("fused_sgd_", &fused_sgd_cpu); }

}  // namespace mpl_fast
