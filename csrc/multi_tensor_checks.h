// Host-side argument checks and layout handling shared by the CPU and CUDA kernels of the
// multi-tensor ops. Every message names the op, the argument and the list index.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <vector>

#include "checks.h"

namespace mpl_fast {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_list_float(const at::Tensor& t, const char* op, const char* name, size_t i) {
  MPL_CHECK_ARG(t.defined(), op, ": `", name, "[", i, "]` is undefined (None)");
  MPL_CHECK_ARG(is_supported_float(t.scalar_type()), op, ": `", name, "[", i,
                "]` must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  MPL_CHECK_ARG(t.layout() == at::kStrided, op, ": `", name, "[", i,
                "]` must be a dense (strided) tensor, got layout ", t.layout());
}

inline void check_pair(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                       const char* name, size_t i, const at::Device& device, const char* op) {
  check_list_float(t, op, name, i);
  MPL_CHECK_ARG(t.sizes() == ref.sizes(), op, ": `", name, "[", i, "]` must have the shape of `",
                ref_name, "[", i, "]` ", ref.sizes(), ", got ", t.sizes());
  MPL_CHECK_ARG(t.device() == device, op, ": `", name, "[", i, "]` is on ", t.device(),
                " but the first tensor of the lists is on ", device);
}

// A one-element float32 flag on `device` (found_inf / found_inf_out).
inline void check_flag(const c10::optional<at::Tensor>& flag, const char* op, const char* name,
                       const at::Device& device) {
  if (!flag.has_value() || !flag->defined()) return;
  MPL_CHECK_ARG(flag->scalar_type() == at::kFloat && flag->numel() == 1, op, ": `", name,
                "` must be a float32 tensor with one element, got ", flag->scalar_type(),
                " with ", flag->numel(), " elements");
  MPL_CHECK_ARG(flag->device() == device, op, ": `", name, "` is on ", flag->device(),
                " but the tensors are on ", device);
}

// Strides equal wherever they matter (dimensions of size 1 never move through memory).
inline bool same_strides(const at::Tensor& a, const at::Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// Two tensors can be walked element by element in storage order when both are dense with the
// same strides (contiguous, channels_last, ...): no copy is needed for any such pair.
inline bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.is_non_overlapping_and_dense() && b.is_non_overlapping_and_dense() &&
         same_strides(a, b);
}

// Validates xs/ys of multi_tensor_dot and returns the pairs to read: the inputs themselves
// when their layouts agree, else contiguous copies (a documented temporary, only for those
// pairs). Empty pairs are dropped.
inline std::vector<std::pair<at::Tensor, at::Tensor>> prepare_dot_pairs(
    at::TensorList xs, at::TensorList ys, const c10::optional<at::Tensor>& found_inf,
    at::Device* device_out) {
  constexpr const char* op = "multi_tensor_dot";
  MPL_CHECK_ARG(xs.size() == ys.size(), op, ": `xs` has ", xs.size(), " tensors but `ys` has ",
                ys.size());
  MPL_CHECK_ARG(!xs.empty(), op, ": `xs` and `ys` are empty (the Python wrapper handles that)");
  check_list_float(xs[0], op, "xs", 0);
  const at::Device device = xs[0].device();
  check_flag(found_inf, op, "found_inf", device);
  std::vector<std::pair<at::Tensor, at::Tensor>> pairs;
  pairs.reserve(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    check_list_float(xs[i], op, "xs", i);
    MPL_CHECK_ARG(xs[i].device() == device, op, ": `xs[", i, "]` is on ", xs[i].device(),
                  " but `xs[0]` is on ", device);
    check_pair(xs[i], "xs", ys[i], "ys", i, device, op);
    if (xs[i].numel() == 0) continue;
    if (same_dense_layout(xs[i], ys[i])) {
      pairs.emplace_back(xs[i], ys[i]);
    } else {
      pairs.emplace_back(xs[i].contiguous(), ys[i].contiguous());
    }
  }
  *device_out = device;
  return pairs;
}

struct SgdArgs {
  double lr;
  c10::optional<at::Tensor> lr_tensor;
  double momentum, dampening, weight_decay;
  bool nesterov, maximize, first_step;
};

// Validates the lists of fused_sgd_. Parameters, momentum buffers and update outputs are
// written in place, so they must share one dense layout; a gradient with another layout is
// copied into the parameter's (a documented temporary). Returns the gradients to read.
inline std::vector<at::Tensor> prepare_sgd_lists(
    at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList updates,
    const SgdArgs& a, const c10::optional<at::Tensor>& found_inf,
    const c10::optional<at::Tensor>& found_inf_out) {
  constexpr const char* op = "fused_sgd_";
  const size_t n = params.size();
  MPL_CHECK_ARG(grads.size() == n, op, ": `grads` has ", grads.size(),
                " tensors but `params` has ", n);
  MPL_CHECK_ARG(a.momentum == 0 || bufs.size() == n, op, ": momentum is ", a.momentum,
                " so `momentum_buffers` needs one tensor per parameter (", n, "), got ",
                bufs.size());
  MPL_CHECK_ARG(a.momentum != 0 || bufs.empty(), op,
                ": momentum is 0 so `momentum_buffers` must be empty, got ", bufs.size(), " tensors");
  MPL_CHECK_ARG(updates.empty() || updates.size() == n, op, ": `update_out` has ",
                updates.size(), " tensors but `params` has ", n, " (pass [] for none)");
  MPL_CHECK_ARG(a.lr >= 0, op, ": `lr` must be >= 0, got ", a.lr);
  MPL_CHECK_ARG(a.momentum >= 0, op, ": `momentum` must be >= 0, got ", a.momentum);
  MPL_CHECK_ARG(!a.nesterov || (a.momentum > 0 && a.dampening == 0), op,
                ": `nesterov` needs momentum > 0 and dampening == 0, got momentum ", a.momentum,
                " and dampening ", a.dampening);
  std::vector<at::Tensor> grads_read;
  if (n == 0) return grads_read;
  check_list_float(params[0], op, "params", 0);
  const at::Device device = params[0].device();
  if (a.lr_tensor.has_value() && a.lr_tensor->defined()) {
    const at::Tensor& lr = *a.lr_tensor;
    MPL_CHECK_ARG(lr.numel() == 1 && at::isFloatingType(lr.scalar_type()), op,
                  ": `lr` as a tensor must be a one-element floating-point tensor, got ",
                  lr.scalar_type(), " with ", lr.numel(), " elements");
    MPL_CHECK_ARG(lr.device() == device || lr.device().is_cpu(), op, ": `lr` is on ",
                  lr.device(), " but the parameters are on ", device);
  }
  check_flag(found_inf, op, "found_inf", device);
  check_flag(found_inf_out, op, "found_inf_out", device);
  if (found_inf.has_value() && found_inf->defined() && found_inf_out.has_value() &&
      found_inf_out->defined()) {
    MPL_CHECK_ARG(!found_inf->is_same(*found_inf_out) &&
                      found_inf->data_ptr() != found_inf_out->data_ptr(),
                  op, ": `found_inf` and `found_inf_out` must be different tensors: a flag "
                  "cannot be both detected and acted on in one pass");
  }
  grads_read.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_list_float(p, op, "params", i);
    MPL_CHECK_ARG(p.device() == device, op, ": `params[", i, "]` is on ", p.device(),
                  " but `params[0]` is on ", device);
    MPL_CHECK_ARG(p.is_non_overlapping_and_dense(), op, ": `params[", i,
                  "]` must be non-overlapping and dense (it is updated in place), got strides ",
                  p.strides());
    check_pair(p, "params", grads[i], "grads", i, device, op);
    MPL_CHECK_ARG(grads[i].scalar_type() == p.scalar_type(), op, ": `grads[", i,
                  "]` must have the dtype of `params[", i, "]` (", p.scalar_type(), "), got ",
                  grads[i].scalar_type());
    if (a.momentum != 0) {
      check_pair(p, "params", bufs[i], "momentum_buffers", i, device, op);
      MPL_CHECK_ARG(bufs[i].scalar_type() == p.scalar_type() && same_strides(bufs[i], p),
                    op, ": `momentum_buffers[", i, "]` must have the dtype (", p.scalar_type(),
                    ") and strides ", p.strides(), " of `params[", i, "]`, got ",
                    bufs[i].scalar_type(), " with strides ", bufs[i].strides());
    }
    if (!updates.empty()) {
      check_pair(p, "params", updates[i], "update_out", i, device, op);
      MPL_CHECK_ARG(updates[i].scalar_type() == p.scalar_type() && same_strides(updates[i], p),
                    op, ": `update_out[", i, "]` must have the dtype (", p.scalar_type(),
                    ") and strides ", p.strides(), " of `params[", i, "]`, got ",
                    updates[i].scalar_type(), " with strides ", updates[i].strides());
    }
    if (same_strides(grads[i], p)) {
      grads_read.push_back(grads[i]);
    } else {
      grads_read.push_back(at::empty_like(p).copy_(grads[i]));
    }
  }
  return grads_read;
}

}  // namespace mpl_fast
