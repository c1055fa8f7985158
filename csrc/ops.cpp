// The one place where mpl_fast's op schemas are declared (TORCH_LIBRARY). Backend files
// (cpu/*.cpp, cuda/*.cu) only register implementations. No Python here: CMake builds the same
// library for C++ users (load it with torch.ops.load_library); python/module.cpp adds the
// pybind11 module for the Python package.
#include <torch/library.h>

TORCH_LIBRARY(mpl_fast, m) {
  // Smoke op: out = x + alpha * y (proves schema -> CPU/CUDA kernel -> fake -> reference).
  m.def("scaled_add(Tensor x, Tensor y, float alpha) -> Tensor");

  // Multi-tensor ops of the MPL teacher feedback (csrc/multi_tensor.h, cpu/multi_tensor_dot.cpp,
  // cpu/fused_sgd.cpp, cuda/multi_tensor.cu; Python side mpl_fast/ops/{multi_tensor_dot,fused_sgd}.py).
  // sum_i <xs[i], ys[i]> as a 0-dim fp32 tensor. The .found_inf overload also sets found_inf
  // (1-element fp32) to 1 when the sum is non-finite, never clearing it. Two overloads rather
  // than an optional mutable argument: Inductor cannot lower a None `Tensor(a!)?` next to a
  // returned tensor, and the plain overload stays a pure function.
  m.def("multi_tensor_dot(Tensor[] xs, Tensor[] ys) -> Tensor");
  m.def("multi_tensor_dot.found_inf(Tensor[] xs, Tensor[] ys, Tensor(a!) found_inf) -> Tensor");
  // torch.optim.SGD's step in one pass. update_out ([] for none) receives theta_new - theta_old;
  // found_inf set => the step is skipped; found_inf_out is set to 1 when a gradient or a new
  // parameter value is non-finite.
  m.def(
      "fused_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!)[] update_out, *, float lr, Tensor? lr_tensor=None, float momentum=0., "
      "float dampening=0., float weight_decay=0., bool nesterov=False, bool maximize=False, "
      "bool first_step=False, Tensor? found_inf=None, Tensor(d!)? found_inf_out=None) -> ()");

  // Batched RandAugment / Cutout (csrc/augment.h): every image of a uint8 (N, C, H, W) batch runs
  // its own op sequence; codes (N, K) int32 and params (N, K, 6) float32 come from
  // mpl_fast/ops/augment.py, fill holds 1 or C uint8 values.
  m.def("augment_apply(Tensor images, Tensor codes, Tensor params, int[] fill) -> Tensor");
}
