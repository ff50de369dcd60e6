// Shared declarations for source_fast::covariance_accumulate_ (CPU, CUDA and Meta kernels).
//
// Op contract (schema in bindings.cpp), for every layer i in one call:
//   covs[i] (D_i, D_i) float32  +=  alpha · X̂ᵢᵀ X̂ᵢ   over the rows r of xs[i] with masks[i][r] != 0,
//   X̂ᵢ = [xs[i], 1] (ones column last, D_i = d_i + 1) when append_ones[i], else X̂ᵢ = xs[i] (D_i = d_i).
// xs[i] is (rows_i, d_i) float32/float16/bfloat16 with any strides; masks[i] is (rows_i,) of any
// dtype or None (all rows). Products accumulate in float32.
#pragma once

#include <ATen/ATen.h>

namespace source_fast {

// Validates one call and throws c10::Error naming the offending layer index. Every backend
// (CPU, CUDA, Meta) runs the same checks so errors do not depend on where the tensors live.
void check_covariance_args(
    at::TensorList covs,
    at::TensorList xs,
    const c10::List<std::optional<at::Tensor>>& masks,
    const c10::List<bool>& append_ones,
    double alpha);

// Layers are accumulated concurrently (threads, CTAs), so no cov may share memory with another cov or
// with any layer's xs. Checked by the CPU and CUDA kernels only: it needs real storage, which
// FakeTensors tracing the op lack.
void check_distinct_covs(at::TensorList covs, at::TensorList xs);

void covariance_accumulate_cpu(
    at::TensorList covs,
    at::TensorList xs,
    const c10::List<std::optional<at::Tensor>>& masks,
    const c10::List<bool>& append_ones,
    double alpha);

}  // namespace source_fast
