// ATen glue of the CUDA multi-tensor ops: argument checks and layouts (multi_tensor_checks.h),
// scratch and output allocation, then the launch planning and kernels of
// multi_tensor_kernels.cuh (which the emulated tests run on the CPU from the same source).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "cuda/multi_tensor_kernels.cuh"
#include "multi_tensor_checks.h"

namespace mpl_fast {
namespace {

FloatKind float_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return FloatKind::kFloat;
    case at::kDouble: return FloatKind::kDouble;
    case at::kHalf: return FloatKind::kHalf;
    default: return FloatKind::kBFloat16;  // the checks admit only these four
  }
}

at::Tensor multi_tensor_dot_cuda(at::TensorList xs, at::TensorList ys,
                                 const c10::optional<at::Tensor>& found_inf) {
  at::Device device(at::kCUDA);
  const auto pairs = prepare_dot_pairs(xs, ys, found_inf, &device);
  c10::cuda::CUDAGuard guard(device);
  std::vector<DotPairRef> refs;
  refs.reserve(pairs.size());
  for (const auto& [x, y] : pairs) {
    refs.push_back({x.const_data_ptr(), y.const_data_ptr(), x.numel(), float_kind(x.scalar_type()),
                    float_kind(y.scalar_type())});
  }
  at::Tensor partials = at::empty({dot_partials_count(refs.data(), refs.size())},
                                  at::TensorOptions().dtype(at::kDouble).device(device));
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kFloat).device(device));
  float* flag = (found_inf.has_value() && found_inf->defined()) ? found_inf->mutable_data_ptr<float>() : nullptr;
  launch_multi_tensor_dot(refs.data(), refs.size(), partials.mutable_data_ptr<double>(),
                          out.mutable_data_ptr<float>(), flag, c10::cuda::getCurrentCUDAStream());
  return out;
}

at::Tensor multi_tensor_dot_plain_cuda(at::TensorList xs, at::TensorList ys) {
  return multi_tensor_dot_cuda(xs, ys, c10::nullopt);
}

at::Tensor multi_tensor_dot_found_inf_cuda(at::TensorList xs, at::TensorList ys, at::Tensor& found_inf) {
  return multi_tensor_dot_cuda(xs, ys, found_inf);
}

void fused_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    at::TensorList update_out, double lr, const c10::optional<at::Tensor>& lr_tensor,
                    double momentum, double dampening, double weight_decay, bool nesterov,
                    bool maximize, bool first_step, const c10::optional<at::Tensor>& found_inf,
                    const c10::optional<at::Tensor>& found_inf_out) {
  const SgdArgs a{lr, lr_tensor, momentum, dampening, weight_decay, nesterov, maximize, first_step};
  const auto grads_read =
      prepare_sgd_lists(params, grads, momentum_buffers, update_out, a, found_inf, found_inf_out);
  if (params.empty()) return;
  c10::cuda::CUDAGuard guard(params[0].device());

  LrSource lr_source{lr, nullptr, false};
  at::Tensor lr_device;  // keeps a converted copy alive until the launches are queued
  if (lr_tensor.has_value() && lr_tensor->defined()) {
    if (lr_tensor->device().is_cpu()) {
      lr_source.value = lr_tensor->item<double>();  // a CPU tensor: read on the host, no sync
    } else {
      lr_device = (lr_tensor->scalar_type() == at::kFloat || lr_tensor->scalar_type() == at::kDouble)
                      ? *lr_tensor : lr_tensor->to(at::kFloat);  // tiny scratch for other dtypes
      lr_source.ptr = lr_device.const_data_ptr();
      lr_source.is_double = lr_device.scalar_type() == at::kDouble;
    }
  }
  const float* skip = (found_inf.has_value() && found_inf->defined()) ? found_inf->const_data_ptr<float>() : nullptr;
  float* report = (found_inf_out.has_value() && found_inf_out->defined())
                      ? found_inf_out->mutable_data_ptr<float>() : nullptr;
  std::vector<SgdTensorRef> refs(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    refs[i] = {params[i].mutable_data_ptr(), grads_read[i].const_data_ptr(),
               momentum != 0 ? momentum_buffers[i].mutable_data_ptr() : nullptr,
               update_out.empty() ? nullptr : update_out[i].mutable_data_ptr(), params[i].numel(),
               float_kind(params[i].scalar_type())};
  }
  const SgdScalars scalars{momentum, dampening, weight_decay, nesterov, maximize, first_step};
  launch_fused_sgd(refs.data(), refs.size(), scalars, lr_source, skip, report, c10::cuda::getCurrentCUDAStream());
}

}  // namespace

TORCH_LIBRARY_IMPL(mpl_fast, CUDA, m) {
  m.impl("multi_tensor_dot", &multi_tensor_dot_plain_cuda);
  m.impl("multi_tensor_dot.found_inf", &multi_tensor_dot_found_inf_cuda);
  m.impl("fused_sgd_", &fused_sgd_cuda);
}

}  // namespace mpl_fast
