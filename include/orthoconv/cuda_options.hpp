// orthoconv/cuda_options.hpp: process-wide settings and memory statistics of the CUDA backend.
//
// Present in every build: without the CUDA backend set_cuda_options() is accepted and ignored and the memory
// statistics are zero, so tools can call these unconditionally.
//
// Precision: float32 everywhere. cuDNN may run float32 convolutions on tensor cores in TF32 (10-bit mantissa,
// ~1e-3 relative error) only when allow_tf32 is set; it is off by default and must stay off for certification
// and verification (their bounds assume float32 arithmetic). Changing it drops the cached cuDNN algorithm choices.
#pragma once

#include <cstdint>

namespace orthoconv {

struct CudaOptions {
  bool allow_tf32 = false;
  // Debugging: every pointer handed to the CUDA backend is checked to be device memory (cudaPointerGetAttributes,
  // one driver call each), so that a Tensor left on Device::cpu fails with a BackendError naming the operation
  // instead of a fault (or, with HMM, silently slow host accesses). Also set by ORTHOCONV_CUDA_CHECK_POINTERS=1.
  bool check_pointers = false;
  // cuDNN algorithms: timed once per shape with cudnnFind* (the fastest wins), or, when false, taken from cuDNN's
  // heuristics (cudnnGet*_v7: no timing runs; quicker first steps, for tools and compute-sanitizer). Also
  // ORTHOCONV_CUDNN_FIND=0. Changing it drops the cached choices.
  bool find_algorithms = true;
};

void set_cuda_options(const CudaOptions& options);
CudaOptions cuda_options();

// Device memory of the CUDA backend's caching arena (Tensor storage and the backend's own buffers; cuDNN's
// algorithm search allocates outside it once per shape).
struct CudaMemoryStats {
  int64_t in_use_bytes = 0;    // handed out now
  int64_t peak_bytes = 0;      // most handed out at once since the last reset
  int64_t reserved_bytes = 0;  // taken from cudaMalloc (in use + cached)
  int64_t allocations = 0;     // cudaMalloc calls so far: constant in a steady-state loop
};
CudaMemoryStats cuda_memory_stats();
void reset_cuda_peak_memory();

}  // namespace orthoconv
