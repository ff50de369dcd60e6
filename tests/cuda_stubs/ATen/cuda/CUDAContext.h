// Type-checking stub (see ../../README.md): not the real header.
#pragma once
#include <cuda_runtime_api.h>

namespace at::cuda {
struct CUDAStream {
  operator cudaStream_t() const;  // the real CUDAStream converts implicitly too
};
CUDAStream getCurrentCUDAStream(signed char device_index = -1);
cudaDeviceProp* getCurrentDeviceProperties();
}  // namespace at::cuda
