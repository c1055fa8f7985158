// The pybind11 module `mpl_fast._C`: importing it loads the op library (schemas and kernels
// register themselves through static initialisers) and reports how it was built.
#include <torch/extension.h>

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
