// Type-checking stub (see ../../README.md): not the real header.
#pragma once
#include <cuda_runtime_api.h>

namespace c10::cuda {
void check_cuda_error(cudaError_t err);
}
#define C10_CUDA_CHECK(EXPR) ::c10::cuda::check_cuda_error(EXPR)
