// One spelling for kernel launches and dynamic shared memory, so the kernels and their launch
// planning (csrc/cuda/*_kernels.cuh) compile both with nvcc and, for the emulated tests, with
// the host compiler on top of the SIMT emulator (csrc/emu/simt.h):
//   MPL_LAUNCH(grid, block, shared_bytes, stream, kernel<T>)(args...);  then MPL_LAUNCH_CHECK();
//   MPL_DYNAMIC_SHARED(T, name);  // extern __shared__ T name[] (the launch's shared_bytes)
// Under nvcc these are exactly the <<<...>>> launch, C10_CUDA_KERNEL_LAUNCH_CHECK() and
// extern __shared__; nothing of the emulator reaches the extension.
#pragma once

#if defined(__CUDACC__)
#include <c10/cuda/CUDAException.h>
#define MPL_LAUNCH(GRID, BLOCK, SHARED_BYTES, STREAM, ...) __VA_ARGS__<<<GRID, BLOCK, SHARED_BYTES, STREAM>>>
#define MPL_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define MPL_DYNAMIC_SHARED(T, NAME) extern __shared__ T NAME[]
#else
// Host compile: the emulator. c10 and std headers must already be included (see simt.h).
#include "emu/simt.h"
#define MPL_LAUNCH(GRID, BLOCK, SHARED_BYTES, STREAM, ...) \
  ((void)(STREAM), ::mpl_emu::make_launch(#__VA_ARGS__, &__VA_ARGS__, GRID, BLOCK, SHARED_BYTES))
#define MPL_LAUNCH_CHECK() ((void)0)
#define MPL_DYNAMIC_SHARED(T, NAME) T* const NAME = ::mpl_emu::dynamic_shared<T>()
#endif
