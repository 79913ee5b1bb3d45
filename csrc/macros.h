// Shared macros: lets the arithmetic headers in ops/common/ compile for host and device.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define REID_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always_inline: the helpers must inline into the vectorised, per-ISA clones of the CPU loops.
#define REID_HOST_DEVICE inline __attribute__((always_inline))
#else
#define REID_HOST_DEVICE inline
#endif
