// CUDA dispatcher entry for source_fast::covariance_accumulate_ (compiled only in CUDA builds).
// Checks the arguments, turns the tensors into the launcher's plain descriptors plus a work list
// of upper-triangle tiles, ships both to the device in one async copy, and launches on the
// current stream. The kernel itself lives in covariance_cuda.cu, which sees no torch header.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../covariance.h"
#include "covariance_kernels.cuh"

namespace source_fast {
namespace {

CovDtype cov_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return CovDtype::kFloat32;
    case at::kHalf:
      return CovDtype::kFloat16;
    default:
      return CovDtype::kBFloat16;  // check_covariance_args admitted only these three
  }
}

CovLayer describe_layer(const at::Tensor& cov, const at::Tensor& x, const std::optional<at::Tensor>& mask,
                        bool append_ones) {
  CovLayer layer{};
  layer.x = x.data_ptr();
  layer.cov = cov.data_ptr<float>();
  layer.rows = x.size(0);
  layer.d = x.size(1);
  layer.x_stride_row = x.stride(0);
  layer.x_stride_col = x.stride(1);
  layer.cov_stride_row = cov.stride(0);
  layer.cov_stride_col = cov.stride(1);
  layer.append_ones = append_ones ? 1 : 0;
  if (mask.has_value()) {
    layer.mask = mask->data_ptr();
    layer.mask_stride = mask->stride(0);
    layer.mask_itemsize = static_cast<int32_t>(mask->element_size());
    layer.mask_is_float = mask->is_floating_point() ? 1 : 0;
  }
  return layer;
}

// One grouped launch over the upper-triangle tiles of the layers in `order`.
void launch_group(at::TensorList covs, at::TensorList xs, const c10::List<std::optional<at::Tensor>>& masks,
                  const c10::List<bool>& append_ones, std::vector<size_t> order, at::ScalarType dtype, float alpha,
                  cudaStream_t stream, bool pipelined) {
  if (order.empty()) return;
  // Layers with the most rows first: their tiles take longest, so they should start first.
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return xs[a].size(0) > xs[b].size(0); });

  std::vector<CovLayer> layers;
  std::vector<CovTile> tiles;
  for (const size_t i : order) {
    const auto layer_index = static_cast<int32_t>(layers.size());
    layers.push_back(describe_layer(covs[i], xs[i], masks.get(i), append_ones.get(i)));
    const auto side = static_cast<int32_t>(cov_tiles_per_side(covs[i].size(0)));
    for (int32_t ti = 0; ti < side; ++ti) {
      for (int32_t tj = ti; tj < side; ++tj) tiles.push_back(CovTile{layer_index, ti, tj, 0});
    }
  }

  // Descriptors and work list travel in one pinned buffer and one async copy on `stream`; the
  // caching host allocator keeps the pinned block alive until that copy has finished.
  const size_t layer_bytes = layers.size() * sizeof(CovLayer);
  const size_t tile_bytes = tiles.size() * sizeof(CovTile);
  static_assert(sizeof(CovLayer) % alignof(CovTile) == 0, "tiles must stay aligned after the layers");
  at::Tensor host = at::empty({static_cast<int64_t>(layer_bytes + tile_bytes)},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr<uint8_t>(), layers.data(), layer_bytes);
  std::memcpy(host.data_ptr<uint8_t>() + layer_bytes, tiles.data(), tile_bytes);
  const at::Tensor device_buf = host.to(xs[order[0]].device(), /*non_blocking=*/true);
  const uint8_t* base = device_buf.data_ptr<uint8_t>();
  const auto* layer_ptr = reinterpret_cast<const CovLayer*>(base);
  const auto* tile_ptr = reinterpret_cast<const CovTile*>(base + layer_bytes);
  const auto num_tiles = static_cast<int64_t>(tiles.size());
  C10_CUDA_CHECK(pipelined
                     ? covariance_accumulate_pipelined_launch(cov_dtype(dtype), layer_ptr, tile_ptr, num_tiles, alpha, stream)
                     : covariance_accumulate_launch(cov_dtype(dtype), layer_ptr, tile_ptr, num_tiles, alpha, stream));
}

void covariance_accumulate_cuda(at::TensorList covs, at::TensorList xs,
                                const c10::List<std::optional<at::Tensor>>& masks, const c10::List<bool>& append_ones,
                                double alpha) {
  check_covariance_args(covs, xs, masks, append_ones, alpha);
  check_distinct_covs(covs, xs);
  if (xs.empty()) return;
  const c10::cuda::CUDAGuard guard(xs[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Each call ships its layer descriptors from a pinned host buffer that is reused afterwards: a
  // captured graph would replay that copy from whatever the buffer then holds.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
              "covariance_accumulate_ cannot be captured in a CUDA graph (its per-call layer descriptors "
              "come from a reused host buffer); call it outside the capture");

  // One launch per input dtype present (the kernel is templated on it); normally exactly one.
  for (const at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    std::vector<size_t> order;
    for (size_t i = 0; i < xs.size(); ++i) {
      if (xs[i].scalar_type() == dtype && xs[i].size(0) > 0 && covs[i].numel() > 0) order.push_back(i);
    }
    if (order.empty()) continue;
    // The kernel's tensor-core paths need these; refusing here keeps a __trap() from poisoning the
    // context. What counts is the architecture the device code was built for, which can be below the
    // GPU's (PTX of an older one, JIT-compiled by the driver).
    const int arch = covariance_kernels_ptx_version();
    const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
    const int needed = dtype == at::kBFloat16 ? 80 : dtype == at::kHalf ? 70 : 0;
    TORCH_CHECK(arch >= needed, "covariance_accumulate_: ", dtype == at::kBFloat16 ? "bfloat16" : "float16",
                " inputs need device code for compute capability ", needed / 10, ".0 or newer; this GPU is ",
                props->major, ".", props->minor, " and source_fast._C's code for it targets ", arch / 10, ".",
                arch % 10, " (rebuild with TORCH_CUDA_ARCH_LIST including ", props->major, ".", props->minor, ")");
    // The pipelined kernel (fp16/bf16, sm_80+) is opt-in until it has been timed on a GPU; the
    // layers it cannot take (strided, unaligned, d % 8 != 0) go to the general kernel.
    const char* pipeline_env = std::getenv("SOURCE_FAST_COV_PIPELINE");
    const bool pipeline =
        dtype != at::kFloat && pipeline_env != nullptr && std::strcmp(pipeline_env, "1") == 0 && arch >= 80;
    std::vector<size_t> general, pipelined;
    for (const size_t i : order) {
      const at::Tensor& x = xs[i];
      const bool fits = x.size(1) > 0 && x.size(1) % 8 == 0 && x.stride(1) == 1 && x.stride(0) % 8 == 0 &&
                        reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
      (pipeline && fits ? pipelined : general).push_back(i);
    }
    launch_group(covs, xs, masks, append_ones, general, dtype, static_cast<float>(alpha), stream, false);
    launch_group(covs, xs, masks, append_ones, pipelined, dtype, static_cast<float>(alpha), stream, true);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(source_fast, CUDA, m) {
  m.impl("covariance_accumulate_", &covariance_accumulate_cuda);
}

}  // namespace source_fast
