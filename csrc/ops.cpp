// The one place where mpl_fast's op schemas are declared (TORCH_LIBRARY), plus the pybind11
// module that makes `import mpl_fast._C` load this library and report how it was built.
// Backend files (cpu/*.cpp, cuda/*.cu) only register implementations.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(mpl_fast, m) {
  // Smoke op: out = x + alpha * y (proves schema -> CPU/CUDA kernel -> fake -> reference).
  m.def("scaled_add(Tensor x, Tensor y, float alpha) -> Tensor");

  // Batched RandAugment / Cutout (csrc/augment.h): every image of a uint8 (N, C, H, W) batch runs
  // its own op sequence; codes (N, K) int32 and params (N, K, 6) float32 come from
  // mpl_fast/ops/augment.py, fill holds 1 or C uint8 values.
  m.def("augment_apply(Tensor images, Tensor codes, Tensor params, int[] fill) -> Tensor");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = TORCH_VERSION;
#ifdef MPL_FAST_WITH_CUDA
  info["with_cuda"] = true;
#else
  info["with_cuda"] = false;
#endif
#if defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "mpl_fast C++/CUDA kernels; the ops live in torch.ops.mpl_fast";
  module.def("build_info", &build_info, "How this extension was built (torch version, CUDA).");
}
