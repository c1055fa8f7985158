// The one place where mpl_fast's op schemas are declared (TORCH_LIBRARY). Backend files
// (cpu/*.cpp, cuda/*.cu) only register implementations. No Python here: CMake builds the same
// library for C++ users (load it with torch.ops.load_library); python/module.cpp adds the
// pybind11 module for the Python package.
#include <torch/library.h>

TORCH_LIBRARY(mpl_fast, m) {
  // Smoke op: out = x + alpha * y (proves schema -> CPU/CUDA kernel -> fake -> reference).
  m.def("scaled_add(Tensor x, Tensor y, float alpha) -> Tensor");
}
