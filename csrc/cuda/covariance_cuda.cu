// CUDA kernel for source_fast::covariance_accumulate_: one grouped launch over the upper-triangle
// output tiles of every layer (the SYRK half of X̂ᵀX̂), fp32 accumulation, tensor cores (WMMA,
// fp32 accumulators) for fp16/bf16 and FFMA for fp32 (TF32 would lose the 13 mantissa bits that
// eigendecompositions of the covariances care about). Includes CUDA headers only.
//
// Each CTA owns one 128×128 tile (ti <= tj) and loops over all rows of its layer, so every cov
// element has one writer: no atomics, deterministic sums, and the mirrored (j, i) element gets the
// very float written to (i, j). Rows are not split across CTAs: GPT-2-sized layer lists give
// thousands of tiles, enough to fill a GPU; a split over rows would need atomics (order-dependent
// rounding, no exact symmetry) or a workspace pass.
//
// The loader builds X̂'s tiles in shared memory: dropped rows (mask == 0) and rows past the end
// become zeros, and the virtual ones column (index d) is synthesized, so X̂ is never materialized
// and the ones block (column sums, kept-row count) falls out of the same MMA.
#include "covariance_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <type_traits>

namespace source_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kBM = static_cast<int>(kCovTile);  // tile rows (i) == tile cols (j)
constexpr int kBK = 32;                          // rows of X consumed per main-loop step
// Padding keeps WMMA's 32-byte fragment alignment (row pitch 272 B for 16-bit, 528 B for fp32)
// and staggers banks between consecutive k rows.
template <typename T>
constexpr int kPad = 16 / static_cast<int>(sizeof(T));
template <typename T>
constexpr int kPitch = kBM + kPad<T>;

template <typename T>
__device__ __forceinline__ T one_value();
template <>
__device__ __forceinline__ float one_value<float>() { return 1.0f; }
template <>
__device__ __forceinline__ __half one_value<__half>() { return __ushort_as_half(0x3C00); }
template <>
__device__ __forceinline__ __nv_bfloat16 one_value<__nv_bfloat16>() { return __ushort_as_bfloat16(0x3F80); }

template <typename T>
__device__ __forceinline__ T zero_value() {
  if constexpr (std::is_same_v<T, float>) {
    return 0.0f;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __ushort_as_half(0);
  } else {
    return __ushort_as_bfloat16(0);
  }
}

// Whether this compilation pass can emit WMMA for T: fp16 needs sm_70, bf16 sm_80. The host pass
// (no __CUDA_ARCH__) compiles every branch; it only needs the declarations.
template <typename T>
__host__ __device__ constexpr bool mma_supported() {
#if defined(__CUDA_ARCH__)
  return __CUDA_ARCH__ >= (std::is_same_v<T, __nv_bfloat16> ? 800 : 700);
#else
  return true;
#endif
}

// Same rule as torch's `mask != 0`: NaN keeps the row, -0.0 drops it.
__device__ __forceinline__ bool row_kept(const CovLayer& L, int64_t r) {
  if (L.mask == nullptr) return true;
  const char* p = static_cast<const char*>(L.mask) + r * L.mask_stride * L.mask_itemsize;
  switch (L.mask_itemsize) {
    case 1:
      return *reinterpret_cast<const uint8_t*>(p) != 0;
    case 2: {
      const uint16_t v = *reinterpret_cast<const uint16_t*>(p);
      return (L.mask_is_float ? (v & 0x7fffu) : v) != 0;
    }
    case 4: {
      const uint32_t v = *reinterpret_cast<const uint32_t*>(p);
      return (L.mask_is_float ? (v & 0x7fffffffu) : v) != 0;
    }
    default: {
      const uint64_t v = *reinterpret_cast<const uint64_t*>(p);
      return (L.mask_is_float ? (v & 0x7fffffffffffffffull) : v) != 0;
    }
  }
}

// Global -> registers -> shared staging of one kBK × kBM slab of X̂ (rows k0.., columns col0..).
// Each thread owns kChunks runs of kVec consecutive columns (16 bytes), so the shared-memory
// store is always one 16-byte store per run; the global read is one 16-byte load when the layer's
// rows are contiguous and aligned, else element by element (transposed or sliced views).
template <typename T>
struct SlabLoader {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  static constexpr int kRunsPerRow = kBM / kVec;
  static constexpr int kChunks = kBK * kRunsPerRow / kThreads;
  static_assert(kChunks * kThreads == kBK * kRunsPerRow, "slab must split evenly across threads");

  uint4 regs[kChunks];

  __device__ __forceinline__ void load(const CovLayer& L, bool vec_ok, int64_t k0, int64_t col0) {
    const T* x = static_cast<const T*>(L.x);
#pragma unroll
    for (int e = 0; e < kChunks; ++e) {
      const int q = threadIdx.x + kThreads * e;
      const int64_t r = k0 + q / kRunsPerRow;
      const int64_t c0 = col0 + (q % kRunsPerRow) * kVec;
      T* run = reinterpret_cast<T*>(&regs[e]);
      const bool row_ok = r < L.rows && row_kept(L, r);
      if (row_ok && vec_ok && c0 + kVec <= L.d) {
        regs[e] = __ldg(reinterpret_cast<const uint4*>(x + r * L.x_stride_row + c0));
      } else {
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          const int64_t c = c0 + v;
          T value = zero_value<T>();
          if (row_ok && c < L.d) {
            value = x[r * L.x_stride_row + c * L.x_stride_col];
          } else if (row_ok && L.append_ones && c == L.d) {
            value = one_value<T>();
          }
          run[v] = value;
        }
      }
    }
  }

  // smem is [kBK][kPitch<T>]: element (k, m) of the slab at smem[k * kPitch + m].
  __device__ __forceinline__ void store(T* smem) const {
#pragma unroll
    for (int e = 0; e < kChunks; ++e) {
      const int q = threadIdx.x + kThreads * e;
      *reinterpret_cast<uint4*>(smem + (q / kRunsPerRow) * kPitch<T> + (q % kRunsPerRow) * kVec) = regs[e];
    }
  }
};

// cov[gi, gj] += alpha·v for the upper triangle (gi <= gj) of the tile, and cov[gj, gi] += alpha·v
// for its strict upper part, so both triangles receive the same float.
__device__ __forceinline__ void add_upper(const CovLayer& L, int64_t dim, int64_t gi, int64_t gj, float v,
                                          float alpha) {
  if (gi <= gj && gj < dim) L.cov[gi * L.cov_stride_row + gj * L.cov_stride_col] += alpha * v;
}
__device__ __forceinline__ void add_mirror(const CovLayer& L, int64_t dim, int64_t gi, int64_t gj, float v,
                                           float alpha) {
  if (gi < gj && gj < dim) L.cov[gj * L.cov_stride_row + gi * L.cov_stride_col] += alpha * v;
}

using AccFragment = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

// One warp's share of a slab: its 64 × 32 block (4 × 2 fragments at rows wm.., columns wn..) of
// the tile += a_sᵀ b_s over the slab's kBK rows. A = X̂ᵀ (i × k): a_s holds it column-major
// (element (m, k) at k·pitch + m).
template <typename T>
__device__ __forceinline__ void warp_mma_slab(AccFragment (&acc)[4][2], const T* a_s, const T* b_s, int wm, int wn) {
  namespace wmma = nvcuda::wmma;
#pragma unroll
  for (int kk = 0; kk < kBK; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[4];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
    for (int a = 0; a < 4; ++a) wmma::load_matrix_sync(fa[a], a_s + kk * kPitch<T> + wm + 16 * a, kPitch<T>);
#pragma unroll
    for (int b = 0; b < 2; ++b) wmma::load_matrix_sync(fb[b], b_s + kk * kPitch<T> + wn + 16 * b, kPitch<T>);
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < 2; ++b) wmma::mma_sync(acc[a][b], fa[a], fb[b], acc[a][b]);
    }
  }
}

// Epilogue of one warp's 64 × 32 block at (i0, j0) of the cov, through a 16×16 fp32 staging tile
// in shared memory (free once the main loop has ended on a barrier). Pass 1 walks columns fastest
// (coalesced cov[i, j]); pass 2 walks rows fastest (coalesced mirrored cov[j, i]).
template <typename Fragment>  // a template, so architectures without WMMA never compile it
__device__ __forceinline__ void warp_store_tile(const CovLayer& L, int64_t dim, int64_t i0, int64_t j0,
                                                Fragment (&acc)[4][2], float* stage, int lane, float alpha) {
#pragma unroll
  for (int a = 0; a < 4; ++a) {
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      nvcuda::wmma::store_matrix_sync(stage, acc[a][b], 16, nvcuda::wmma::mem_row_major);
      __syncwarp();
      const int64_t fi = i0 + 16 * a, fj = j0 + 16 * b;
      for (int e = lane; e < 256; e += 32) {
        add_upper(L, dim, fi + e / 16, fj + e % 16, stage[e], alpha);
        add_mirror(L, dim, fi + e % 16, fj + e / 16, stage[(e % 16) * 16 + e / 16], alpha);
      }
      __syncwarp();
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    covariance_tiles_kernel(const CovLayer* __restrict__ layers, const CovTile* __restrict__ tiles, float alpha) {
  const CovTile tile = tiles[blockIdx.x];
  const CovLayer L = layers[tile.layer];
  const int64_t dim = L.d + (L.append_ones ? 1 : 0);
  const int64_t i0 = static_cast<int64_t>(tile.ti) * kBM;
  const int64_t j0 = static_cast<int64_t>(tile.tj) * kBM;
  const bool diagonal = tile.ti == tile.tj;  // A and B slabs are the same columns: load once
  constexpr int kVec = SlabLoader<T>::kVec;
  const bool vec_ok = L.x_stride_col == 1 && L.x_stride_row % kVec == 0 &&
                      reinterpret_cast<uintptr_t>(L.x) % 16 == 0;

  __shared__ __align__(128) unsigned char smem_raw[2 * kBK * kPitch<T> * sizeof(T)];
  T* a_s = reinterpret_cast<T*>(smem_raw);  // [kBK][kPitch]: X̂[k0 + k, i0 + m]
  T* b_s = diagonal ? a_s : a_s + kBK * kPitch<T>;  // [kBK][kPitch]: X̂[k0 + k, j0 + n]

  SlabLoader<T> load_a, load_b;
  load_a.load(L, vec_ok, 0, i0);
  if (!diagonal) load_b.load(L, vec_ok, 0, j0);

  if constexpr (std::is_same_v<T, float>) {
    // FFMA path: thread (tx, ty) owns rows ty + 16a and columns tx + 16b of the tile. Strided
    // ownership makes a warp's shared reads 2 broadcasts (a) and 16 consecutive words (b).
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float acc[8][8] = {};
    for (int64_t k0 = 0; k0 < L.rows; k0 += kBK) {
      load_a.store(a_s);
      if (!diagonal) load_b.store(b_s);
      __syncthreads();
      if (k0 + kBK < L.rows) {  // next slab's global loads overlap this slab's math
        load_a.load(L, vec_ok, k0 + kBK, i0);
        if (!diagonal) load_b.load(L, vec_ok, k0 + kBK, j0);
      }
#pragma unroll 4
      for (int k = 0; k < kBK; ++k) {
        float av[8], bv[8];
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          av[t] = a_s[k * kPitch<T> + ty + 16 * t];
          bv[t] = b_s[k * kPitch<T> + tx + 16 * t];
        }
#pragma unroll
        for (int a = 0; a < 8; ++a) {
#pragma unroll
          for (int b = 0; b < 8; ++b) acc[a][b] = fmaf(av[a], bv[b], acc[a][b]);
        }
      }
      __syncthreads();
    }
    // Upper writes are coalesced along tx; the mirrored writes are strided (once per tile).
#pragma unroll
    for (int a = 0; a < 8; ++a) {
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        const int64_t gi = i0 + ty + 16 * a, gj = j0 + tx + 16 * b;
        add_upper(L, dim, gi, gj, acc[a][b], alpha);
        add_mirror(L, dim, gi, gj, acc[a][b], alpha);
      }
    }
  } else if constexpr (!mma_supported<T>()) {
    __trap();  // the host binding refuses these dtypes on such GPUs before launching
  } else {
    namespace wmma = nvcuda::wmma;
    // 8 warps as 2 (along i) × 4 (along j); each warp owns a 64 × 32 block = 4 × 2 fragments.
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = (warp % 2) * 64, wn = (warp / 2) * 32;
    AccFragment acc[4][2];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < 2; ++b) wmma::fill_fragment(acc[a][b], 0.0f);
    }
    for (int64_t k0 = 0; k0 < L.rows; k0 += kBK) {
      load_a.store(a_s);
      if (!diagonal) load_b.store(b_s);
      __syncthreads();
      if (k0 + kBK < L.rows) {
        load_a.load(L, vec_ok, k0 + kBK, i0);
        if (!diagonal) load_b.load(L, vec_ok, k0 + kBK, j0);
      }
      warp_mma_slab<T>(acc, a_s, b_s, wm, wn);
      __syncthreads();
    }
    static_assert(8 * 256 * sizeof(float) <= 2 * kBK * kPitch<T> * sizeof(T), "staging must fit in the slabs");
    warp_store_tile(L, dim, i0 + wm, j0 + wn, acc, reinterpret_cast<float*>(smem_raw) + warp * 256, lane, alpha);
  }
}

// ---------------------------------------------------------------------------------------------
// Pipelined variant for 16-bit inputs (sm_80+), opt-in with SOURCE_FAST_COV_PIPELINE=1 until it
// has been timed against covariance_tiles_kernel on a GPU (the kernel above uses 234 registers, so
// one CTA per SM, and stages every slab through registers with two barriers per slab).
// Here slabs go global -> shared with cp.async (no staging registers), kStages deep, one barrier
// per slab, and __launch_bounds__(256, 2) asks for two CTAs per SM. Dropped rows and rows past the
// end are zero-filled by the copy itself (src-size 0); the ones column is written into shared
// memory after the copy lands. Only layers the binding vetted use it: 16-byte aligned rows with
// unit column stride and d % 8 == 0, so every 16-byte run is entirely inside or entirely past the
// row; other layers go to covariance_tiles_kernel in a second launch.
constexpr int kStages = 4;

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const size_t src = __cvta_generic_to_global(gmem);
  // "memory": no ordinary shared-memory access (the ones column) may move across the copy.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
#else
  __trap();  // the binding never picks this kernel below sm_80
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// One kBK × kBM slab of X̂ (rows k0.., columns col0..) into smem [kBK][kPitch]: each thread copies
// kChunks 16-byte runs. Runs of dropped rows, of rows past the end and of columns >= d read nothing
// (src-size 0) and land as zeros; the source address is then the layer's base, which is valid.
// Runs are those of the general kernel's SlabLoader, so both kernels lay a slab out the same way.
template <typename T>
struct AsyncSlab {
  static constexpr int kVec = SlabLoader<T>::kVec;
  static constexpr int kRunsPerRow = SlabLoader<T>::kRunsPerRow;
  static constexpr int kChunks = SlabLoader<T>::kChunks;

  __device__ __forceinline__ static int row_in_slab(int e) { return (threadIdx.x + kThreads * e) / kRunsPerRow; }
  __device__ __forceinline__ static int col_in_slab(int e) {
    return ((threadIdx.x + kThreads * e) % kRunsPerRow) * kVec;
  }

  __device__ __forceinline__ static void issue(const CovLayer& L, const bool (&kept)[kChunks], int64_t k0,
                                               int64_t col0, T* smem) {
    const T* x = static_cast<const T*>(L.x);
#pragma unroll
    for (int e = 0; e < kChunks; ++e) {
      const int64_t r = k0 + row_in_slab(e), c0 = col0 + col_in_slab(e);
      const bool copy = kept[e] && c0 < L.d;  // d % 8 == 0: a run is all inside or all past the row
      cp_async_16(smem + row_in_slab(e) * kPitch<T> + col_in_slab(e), copy ? x + r * L.x_stride_row + c0 : x,
                  copy ? 16 : 0);
    }
  }

  // The virtual ones column (index d) of kept rows, once the slab's copies have landed.
  __device__ __forceinline__ static void ones(const CovLayer& L, const bool (&kept)[kChunks], int64_t col0, T* smem) {
#pragma unroll
    for (int e = 0; e < kChunks; ++e) {
      if (kept[e] && col0 + col_in_slab(e) == L.d) smem[row_in_slab(e) * kPitch<T> + col_in_slab(e)] = one_value<T>();
    }
  }

  // Which of this thread's runs come from kept rows (the same rows for both slabs of a tile).
  __device__ __forceinline__ static void rows_kept(const CovLayer& L, int64_t k0, bool (&kept)[kChunks]) {
#pragma unroll
    for (int e = 0; e < kChunks; ++e) {
      const int64_t r = k0 + row_in_slab(e);
      kept[e] = r < L.rows && row_kept(L, r);
    }
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    covariance_tiles_pipelined_kernel(const CovLayer* __restrict__ layers, const CovTile* __restrict__ tiles,
                                      float alpha) {
  if constexpr (!mma_supported<T>() || std::is_same_v<T, float>) {
    __trap();  // the binding sends only fp16/bf16 on sm_80+ here
  } else {
    namespace wmma = nvcuda::wmma;
    using Slab = AsyncSlab<T>;
    const CovTile tile = tiles[blockIdx.x];
    const CovLayer& L = layers[tile.layer];  // read through L1 where used: a register copy spills
    const int64_t dim = L.d + (L.append_ones ? 1 : 0);
    const int64_t i0 = static_cast<int64_t>(tile.ti) * kBM;
    const int64_t j0 = static_cast<int64_t>(tile.tj) * kBM;
    const bool diagonal = tile.ti == tile.tj;
    constexpr int kSlabElems = kBK * kPitch<T>;
    extern __shared__ __align__(128) unsigned char smem_dyn[];
    T* slabs = reinterpret_cast<T*>(smem_dyn);  // stage s: a at slabs + 2s·kSlabElems, b right after
    const int64_t num_slabs = (L.rows + kBK - 1) / kBK;

    auto issue = [&](int64_t slab) {
      if (slab < num_slabs) {
        T* a_s = slabs + 2 * (slab % kStages) * kSlabElems;
        bool kept[Slab::kChunks];
        Slab::rows_kept(L, slab * kBK, kept);
        Slab::issue(L, kept, slab * kBK, i0, a_s);
        if (!diagonal) Slab::issue(L, kept, slab * kBK, j0, a_s + kSlabElems);
      }
      cp_async_commit();  // an empty group past the end keeps wait_group's count uniform
    };

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = (warp % 2) * 64, wn = (warp / 2) * 32;
    AccFragment acc[4][2];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < 2; ++b) wmma::fill_fragment(acc[a][b], 0.0f);
    }
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) issue(s);
    // Only the tiles holding column d (the last tile row or column) write ones: the others skip the
    // mask reads that locating them takes.
    const bool ones_in_tile = L.append_ones && ((i0 <= L.d && L.d < i0 + kBM) || (j0 <= L.d && L.d < j0 + kBM));

    for (int64_t slab = 0; slab < num_slabs; ++slab) {
      T* a_s = slabs + 2 * (slab % kStages) * kSlabElems;
      T* b_s = diagonal ? a_s : a_s + kSlabElems;
      cp_async_wait<kStages - 2>();  // this thread's copies of `slab` have landed
      if (ones_in_tile) {
        bool kept[Slab::kChunks];
        Slab::rows_kept(L, slab * kBK, kept);
        Slab::ones(L, kept, i0, a_s);
        if (!diagonal) Slab::ones(L, kept, j0, b_s);
      }
      // Everyone's copies of `slab` are visible, and everyone is done with slab - 1, whose stage
      // the next issue refills.
      __syncthreads();
      issue(slab + kStages - 1);
      warp_mma_slab<T>(acc, a_s, b_s, wm, wn);
    }
    cp_async_wait<0>();
    __syncthreads();  // the stages are free for the epilogue's staging tiles
    warp_store_tile(L, dim, i0 + wm, j0 + wn, acc, reinterpret_cast<float*>(smem_dyn) + warp * 256, lane, alpha);
  }
}

template <typename T>
cudaError_t launch_pipelined(dim3 grid, const CovLayer* layers, const CovTile* tiles, float alpha,
                             cudaStream_t stream) {
  constexpr int bytes = kStages * 2 * kBK * kPitch<T> * static_cast<int>(sizeof(T));
  static_assert(8 * 256 * sizeof(float) <= bytes, "the epilogue's staging must fit in the stages");
  // Above 48 KB of dynamic shared memory needs an opt-in, once per kernel (and device; setting it
  // again is harmless); the largest shared-memory carveout lets two CTAs share an SM.
  cudaError_t err = cudaFuncSetAttribute(covariance_tiles_pipelined_kernel<T>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) {
    err = cudaFuncSetAttribute(covariance_tiles_pipelined_kernel<T>, cudaFuncAttributePreferredSharedMemoryCarveout,
                               cudaSharedmemCarveoutMaxShared);
  }
  if (err != cudaSuccess) return err;
  covariance_tiles_pipelined_kernel<T><<<grid, kThreads, bytes, stream>>>(layers, tiles, alpha);
  return cudaGetLastError();
}

// Variadic: __CUDA_ARCH_LIST__ expands to a comma-separated list.
#define SF_STRINGIFY_(...) #__VA_ARGS__
#define SF_STRINGIFY(...) SF_STRINGIFY_(__VA_ARGS__)

}  // namespace

cudaError_t covariance_accumulate_launch(CovDtype dtype, const CovLayer* layers, const CovTile* tiles,
                                         int64_t num_tiles, float alpha, cudaStream_t stream) {
  if (num_tiles <= 0) return cudaSuccess;
  if (num_tiles > 0x7fffffff) return cudaErrorInvalidValue;  // gridDim.x limit
  const dim3 grid(static_cast<unsigned>(num_tiles));
  switch (dtype) {
    case CovDtype::kFloat32:
      covariance_tiles_kernel<float><<<grid, kThreads, 0, stream>>>(layers, tiles, alpha);
      break;
    case CovDtype::kFloat16:
      covariance_tiles_kernel<__half><<<grid, kThreads, 0, stream>>>(layers, tiles, alpha);
      break;
    case CovDtype::kBFloat16:
      covariance_tiles_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(layers, tiles, alpha);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t covariance_accumulate_pipelined_launch(CovDtype dtype, const CovLayer* layers, const CovTile* tiles,
                                                   int64_t num_tiles, float alpha, cudaStream_t stream) {
  if (num_tiles <= 0) return cudaSuccess;
  if (num_tiles > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(num_tiles));
  switch (dtype) {
    case CovDtype::kFloat16:
      return launch_pipelined<__half>(grid, layers, tiles, alpha, stream);
    case CovDtype::kBFloat16:
      return launch_pipelined<__nv_bfloat16>(grid, layers, tiles, alpha, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

int covariance_kernels_ptx_version() {
  // The architecture the device code was compiled for (80 for sm_80 code, 75 for sm_75 PTX that the
  // driver JIT-compiles): a GPU of compute capability 8.x running code built for less traps on bf16
  // and cp.async, so the binding asks this, not the device.
  cudaFuncAttributes attrs{};
  if (cudaFuncGetAttributes(&attrs, covariance_tiles_kernel<float>) != cudaSuccess) {
    cudaGetLastError();  // consume the error: the next launch's check must not report it
    return 0;
  }
  return attrs.ptxVersion;
}

const char* cuda_build_version() {
  return SF_STRINGIFY(__CUDACC_VER_MAJOR__) "." SF_STRINGIFY(__CUDACC_VER_MINOR__);
}

const char* cuda_build_archs() {
#ifdef __CUDA_ARCH_LIST__
  return SF_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

}  // namespace source_fast
