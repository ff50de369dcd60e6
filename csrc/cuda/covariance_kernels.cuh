// Launcher interface of the CUDA covariance kernel: plain structs, raw pointers, element strides
// and a cudaStream_t. No torch header may be included here: covariance_cuda.cu includes only
// this and CUDA headers, so it compiles with a bare `nvcc -c` (tests/test_nvcc_compile.py).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace source_fast {

enum class CovDtype : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One layer: covs[i] (D, D) += alpha · X̂ᵀX̂ over kept rows, X̂ = [x, 1] when append_ones.
struct CovLayer {
  const void* x;      // (rows, d) elements of the launch's dtype
  const void* mask;   // (rows,) elements of mask_itemsize bytes, or nullptr: every row is kept
  float* cov;         // (D, D), D = d + append_ones
  int64_t rows;
  int64_t d;
  int64_t x_stride_row;  // strides in elements, like torch's
  int64_t x_stride_col;
  int64_t mask_stride;
  int64_t cov_stride_row;
  int64_t cov_stride_col;
  int32_t mask_itemsize;  // 1, 2, 4 or 8
  int32_t mask_is_float;  // a row is dropped when its mask is ±0 (float) / all-zero bits (bool, int)
  int32_t append_ones;
  int32_t unused;
};

// One CTA's work: output tile (ti, tj), ti <= tj, of layer `layer`, over all of the layer's rows.
struct CovTile {
  int32_t layer;
  int32_t ti;
  int32_t tj;
  int32_t unused;
};

// Edge of the square output tile each CTA computes.
constexpr int64_t kCovTile = 128;

inline int64_t cov_tiles_per_side(int64_t dim) { return (dim + kCovTile - 1) / kCovTile; }

// Launches one grid of num_tiles CTAs over every layer's upper-triangle tiles. layers and tiles
// must be in device memory and stay valid until the kernel has run (stream order is enough).
// Each element of every cov has exactly one writer and is updated with a plain read-add-write, so
// the result is deterministic and a symmetric cov stays exactly symmetric. Tiles must not
// overlap between layers (no two layers may share a cov). bfloat16 needs sm_80 or newer.
cudaError_t covariance_accumulate_launch(CovDtype dtype, const CovLayer* layers, const CovTile* tiles,
                                         int64_t num_tiles, float alpha, cudaStream_t stream);

// The cp.async-pipelined kernel for fp16/bf16 on sm_80+ (opt-in: SOURCE_FAST_COV_PIPELINE=1 until
// timed against the kernel above). Same contract, plus: every layer's x has unit column stride, a
// row stride that is a multiple of 8 elements, a 16-byte aligned base and d a positive multiple of 8.
cudaError_t covariance_accumulate_pipelined_launch(CovDtype dtype, const CovLayer* layers, const CovTile* tiles,
                                                   int64_t num_tiles, float alpha, cudaStream_t stream);

// The virtual architecture the kernels' device code targets on the current device (e.g. 90, or 75
// when sm_75 PTX was JIT-compiled for a newer GPU); 0 if it cannot be read. bf16 and the pipelined
// kernel need 80: checking the device alone would let them trap on such builds.
int covariance_kernels_ptx_version();

// Build facts for build_info(): the CUDA runtime the kernels were compiled against ("13.0") and
// the compiled architectures ("80,90", from nvcc's __CUDA_ARCH_LIST__).
const char* cuda_build_version();
const char* cuda_build_archs();

}  // namespace source_fast
