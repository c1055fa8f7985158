// MPL_HOST_DEVICE marks math shared by the CPU kernels (plain C++) and the CUDA kernels (nvcc).
#pragma once

#if defined(__CUDACC__)
#define MPL_HOST_DEVICE __host__ __device__
#else
#define MPL_HOST_DEVICE
#endif
