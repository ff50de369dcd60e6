// The only translation unit that includes <torch/extension.h> (it is the slow header: DESIGN V10).
// Holds the op schemas, the shape-only Meta kernel, and the pybind11 module whose one function
// reports how the extension was built. The compute kernels register themselves from their own TUs.
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include "covariance.h"

#if SOURCE_FAST_WITH_CUDA
#include "cuda/covariance_kernels.cuh"
#endif

TORCH_LIBRARY(source_fast, m) {
  // covs is declared mutated (a!); nothing else is written, and nothing is returned, so
  // functionalization (torch.compile) can rewrite the op without a hand-written functional twin.
  m.def(
      "covariance_accumulate_(Tensor(a!)[] covs, Tensor[] xs, Tensor?[] masks, bool[] append_ones, "
      "float alpha=1.0) -> ()");
}

namespace {

// FakeTensor / torch.compile tracing: nothing to compute, but bad arguments fail at trace time
// with the same messages as the real kernels.
void covariance_accumulate_meta(at::TensorList covs, at::TensorList xs,
                                const c10::List<std::optional<at::Tensor>>& masks,
                                const c10::List<bool>& append_ones, double alpha) {
  source_fast::check_covariance_args(covs, xs, masks, append_ones, alpha);
}

}  // namespace

TORCH_LIBRARY_IMPL(source_fast, Meta, m) {
  m.impl("covariance_accumulate_", &covariance_accumulate_meta);
}

namespace {

// What torch's own in-place ops do above the kernels: a cov that requires grad is refused (the op has
// no derivative, so its history would be wrong), and every cov's version counter is bumped, so a
// backward through a cov some other op saved before this one changed it raises instead of using the
// new values. xs are read as data: they may require grad. (Inference mode skips this key, as it skips
// version counters.)
void covariance_accumulate_autograd(c10::DispatchKeySet ks, at::TensorList covs, at::TensorList xs,
                                    const c10::List<std::optional<at::Tensor>>& masks,
                                    const c10::List<bool>& append_ones, double alpha) {
  for (size_t i = 0; i < covs.size(); ++i) {
    TORCH_CHECK(!(at::GradMode::is_enabled() && covs[i].requires_grad()), "covariance_accumulate_: layer ", i,
                ": cov requires grad, and the op is not differentiable; pass a tensor that does not (or run under "
                "torch.no_grad())");
  }
  static const auto op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("source_fast::covariance_accumulate_", "")
                              .typed<void(at::TensorList, at::TensorList, const c10::List<std::optional<at::Tensor>>&,
                                          const c10::List<bool>&, double)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, covs, xs, masks, append_ones, alpha);
  }
  for (const at::Tensor& cov : covs) torch::autograd::impl::bump_version(cov);
}

}  // namespace

TORCH_LIBRARY_IMPL(source_fast, Autograd, m) {
  m.impl("covariance_accumulate_", &covariance_accumulate_autograd);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def(
      "build_info",
      [] {
        pybind11::dict info;
        info["torch_version"] = TORCH_VERSION;
#if SOURCE_FAST_WITH_CUDA
        info["with_cuda"] = true;
        info["cuda_version"] = source_fast::cuda_build_version();
        info["archs"] = source_fast::cuda_build_archs();
#else
        info["with_cuda"] = false;
        info["cuda_version"] = pybind11::none();
        info["archs"] = pybind11::none();
#endif
        return info;
      },
      "How source_fast._C was built: torch_version, with_cuda, cuda_version, archs (compiled sm_XY list).");
}
