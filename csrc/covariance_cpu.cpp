// CPU kernel for source_fast::covariance_accumulate_ and the argument checks every backend shares.
//
// Strategy, chosen by measurement on a shared 2-core AVX-512 box (bench/bench_covariance.py):
// MKL's sgemm beats any hand loop, so each layer's work is expressed as GEMMs on column panels of
// the upper triangle ("SYRK via GEMM"): panel [j0, j1) computes rows [0, j1) of those columns,
// about half of XᵀX. Masked rows are gathered and fp16/bf16 rows converted to fp32 once per block
// of rows; fp32 inputs without a mask feed BLAS straight from their storage. The ones column never
// exists: its block of X̂ᵀX̂ is the kept rows' column sums and their count. Threads take whole
// layers (see covariance_accumulate_cpu).
#include "covariance.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <unordered_map>
#include <vector>

namespace source_fast {
namespace {

constexpr const char* kOp = "covariance_accumulate_";

// Panel width: 256 was fastest of 256/384/512/768 for d = 768 and 3072 (narrower panels waste
// less work above the diagonal; wider ones run sgemm more efficiently).
constexpr int64_t kPanel = 256;
// Rows gathered/converted to fp32 at a time: bounds the scratch copy at 16 MB while keeping the
// GEMM's inner dimension in the thousands for d <= 4096.
constexpr int64_t kChunkElems = int64_t{1} << 22;
// Tile edge for the symmetric write-back: a 64×64 fp32 tile of the scratch stays in L1/L2 while
// it is written to both triangles of cov.
constexpr int64_t kTile = 64;

// BLAS takes a matrix without a copy when one of its strides is 1.
bool blas_friendly(const at::Tensor& t) {
  return t.stride(1) == 1 || t.stride(0) == 1;
}

// gram[0:j1, j0:j1] (+)= xbᵀ[0:j1, :] · xb[:, j0:j1] for each column panel: the upper triangle of
// xbᵀxb (and the lower half of each diagonal block, which is never read).
void syrk_panels_(const at::Tensor& gram, const at::Tensor& xb, bool accumulate) {
  const int64_t d = xb.size(1);
  const at::Tensor xt = xb.t();
  for (int64_t j0 = 0; j0 < d; j0 += kPanel) {
    const int64_t j1 = std::min(d, j0 + kPanel);
    at::Tensor out = gram.slice(0, 0, j1).slice(1, j0, j1);  // row stride d: BLAS writes in place
    if (accumulate) {
      out.addmm_(xt.slice(0, 0, j1), xb.slice(1, j0, j1));
    } else {
      at::mm_out(out, xt.slice(0, 0, j1), xb.slice(1, j0, j1));
    }
  }
}

// cov += alpha·Ĝ where Ĝ is the symmetric matrix whose upper triangle is gram's (plus the ones
// row/column from colsum and count). Each value is read once and added to both (i, j) and (j, i),
// so a symmetric cov stays exactly symmetric, and a non-symmetric one still gets the exact update.
void add_symmetric_(const at::Tensor& cov, const at::Tensor& gram, const at::Tensor& colsum, int64_t count,
                    float alpha) {
  const int64_t d = gram.defined() ? gram.size(0) : 0;
  float* c = cov.data_ptr<float>();
  const int64_t cs0 = cov.stride(0), cs1 = cov.stride(1);
  if (d > 0) {
    const float* g = gram.data_ptr<float>();
    const int64_t nt = (d + kTile - 1) / kTile;
    // Flattened upper-tile list: tiles (ti <= tj) write disjoint elements of cov (upper block rows
    // of ti, mirrored block rows of tj), so they split across threads with balanced work.
    std::vector<std::pair<int64_t, int64_t>> tiles;
    tiles.reserve(nt * (nt + 1) / 2);
    for (int64_t ti = 0; ti < nt; ++ti) {
      for (int64_t tj = ti; tj < nt; ++tj) tiles.emplace_back(ti, tj);
    }
    at::parallel_for(0, static_cast<int64_t>(tiles.size()), 8, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t i0 = tiles[t].first * kTile, i1 = std::min(d, i0 + kTile);
        const int64_t j0 = tiles[t].second * kTile, j1 = std::min(d, j0 + kTile);
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = std::max(i, j0); j < j1; ++j) c[i * cs0 + j * cs1] += alpha * g[i * d + j];
        }
        for (int64_t j = j0; j < j1; ++j) {
          for (int64_t i = i0; i < std::min(i1, j); ++i) c[j * cs0 + i * cs1] += alpha * g[i * d + j];
        }
      }
    });
  }
  if (colsum.defined()) {
    const float* s = colsum.data_ptr<float>();
    for (int64_t k = 0; k < d; ++k) {
      c[k * cs0 + d * cs1] += alpha * s[k];
      c[d * cs0 + k * cs1] += alpha * s[k];
    }
    c[d * cs0 + d * cs1] += alpha * static_cast<float>(count);
  }
}

// Float32 scratch reused across the layers of one call. Large buffers come from fresh mmap'd pages
// that fault on first touch (37 MB of Gram per 3072-wide layer); one grown buffer pays that once.
class Scratch {
 public:
  // A (rows, cols) float32 view of this slot's storage, grown when too small; contents undefined.
  at::Tensor get(int64_t rows, int64_t cols) {
    if (buf_.numel() < rows * cols) buf_ = at::empty({rows * cols}, at::TensorOptions().dtype(at::kFloat));
    return buf_.narrow(0, 0, rows * cols).view({rows, cols});
  }

 private:
  at::Tensor buf_ = at::empty({0}, at::TensorOptions().dtype(at::kFloat));
};

struct Workspace {
  Scratch gram;  // (d, d) upper-triangle panels
  Scratch rows;  // (chunk, d) gathered / converted rows
};

// The indices of a layer's kept rows (mask != 0), or an undefined tensor when every row is kept.
// Unsigned masks are read through the signed type of their width (nonzero has no uint16/32/64
// kernel; the bits, hence `!= 0`, are the same).
at::Tensor kept_rows(const at::Tensor& x, const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return at::Tensor();
  at::Tensor m = *mask;
  switch (m.scalar_type()) {
    case at::kUInt16: m = m.view(at::kShort); break;
    case at::kUInt32: m = m.view(at::kInt); break;
    case at::kUInt64: m = m.view(at::kLong); break;
    default: break;
  }
  at::Tensor kept = at::nonzero(m).view(-1);
  return kept.numel() == x.size(0) ? at::Tensor() : kept;
}

void accumulate_layer_(const at::Tensor& cov, const at::Tensor& x, const at::Tensor& kept, bool append_ones,
                       float alpha, Workspace& ws) {
  const int64_t d = x.size(1);
  const int64_t n = kept.defined() ? kept.numel() : x.size(0);
  if (n == 0) return;

  const bool direct = x.scalar_type() == at::kFloat && !kept.defined() && blas_friendly(x);
  const int64_t chunk = direct ? n : std::max<int64_t>(256, kChunkElems / std::max<int64_t>(d, 1));
  const at::Tensor gram = d > 0 ? ws.gram.get(d, d) : at::Tensor();
  const at::Tensor colsum = append_ones ? at::zeros({d}, x.options().dtype(at::kFloat)) : at::Tensor();
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t r1 = std::min(n, r0 + chunk);
    at::Tensor xb = x;
    if (!direct) {
      // Gather and/or convert into the reused fp32 block: copy_ casts in the same pass; a masked
      // fp16/bf16 block is gathered in its own dtype (index_select_out cannot cast), then cast.
      xb = ws.rows.get(r1 - r0, d);
      if (!kept.defined()) {
        xb.copy_(x.slice(0, r0, r1));
      } else if (x.scalar_type() == at::kFloat) {
        at::index_select_out(xb, x, 0, kept.slice(0, r0, r1));
      } else {
        xb.copy_(x.index_select(0, kept.slice(0, r0, r1)));
      }
    }
    if (d > 0) syrk_panels_(gram, xb, /*accumulate=*/r0 > 0);
    if (append_ones) colsum.add_(xb.sum(0));
  }
  add_symmetric_(cov, gram, colsum, n, alpha);
}

}  // namespace

void check_covariance_args(at::TensorList covs, at::TensorList xs, const c10::List<std::optional<at::Tensor>>& masks,
                           const c10::List<bool>& append_ones, double alpha) {
  // A NaN or infinite alpha has no meaning, and the backends would disagree on it (the CPU kernel
  // skips a layer with no kept rows; the CUDA kernel adds alpha·0 = NaN). The kernels scale in float32,
  // so a double beyond float32's range is infinite there.
  TORCH_CHECK(std::isfinite(static_cast<float>(alpha)), kOp, ": alpha must be finite (in float32), got ", alpha);
  TORCH_CHECK(covs.size() == xs.size() && xs.size() == masks.size() && masks.size() == append_ones.size(), kOp,
              ": got ", covs.size(), " covs, ", xs.size(), " xs, ", masks.size(), " masks and ", append_ones.size(),
              " append_ones flags; they must be equal");
  if (xs.empty()) return;
  const at::Device device = xs[0].device();
  for (size_t i = 0; i < xs.size(); ++i) {
    const at::Tensor& x = xs[i];
    const at::Tensor& cov = covs[i];
    const std::optional<at::Tensor> mask = masks.get(i);
    TORCH_CHECK(x.dim() == 2, kOp, ": layer ", i, ": xs must be (rows, d), got shape ", x.sym_sizes());
    const auto dt = x.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, kOp, ": layer ", i,
                ": xs must be float32, float16 or bfloat16, got ", dt);
    TORCH_CHECK(cov.scalar_type() == at::kFloat, kOp, ": layer ", i, ": covs must be float32, got ",
                cov.scalar_type());
    // Sizes are compared as SymInts: under torch.compile(dynamic=True) the Meta kernel runs this on
    // symbolic shapes, and a plain size() would pin every batch's row count (a recompile per shape).
    TORCH_CHECK(cov.dim() == 2, kOp, ": layer ", i, ": cov must be square, got shape ", cov.sym_sizes());
    TORCH_SYM_CHECK(cov.sym_size(0).sym_eq(cov.sym_size(1)), kOp, ": layer ", i, ": cov must be square, got shape ",
                    cov.sym_sizes());
    const bool ones = append_ones.get(i);
    const c10::SymInt dim = x.sym_size(1) + (ones ? 1 : 0);
    TORCH_SYM_CHECK(cov.sym_size(0).sym_eq(dim), kOp, ": layer ", i, ": cov must be (", dim, ", ", dim,
                    ") for xs of shape ", x.sym_sizes(), ones ? " plus a ones column" : "", ", got ", cov.sym_sizes());
    TORCH_CHECK(at::has_internal_overlap(cov) != at::MemOverlap::Yes, kOp, ": layer ", i,
                ": cov has overlapping memory (an expanded tensor?) and cannot be updated in place");
    if (mask.has_value()) {
      TORCH_CHECK(mask->dim() == 1, kOp, ": layer ", i, ": mask must be (", x.sym_size(0), ",) to match xs of shape ",
                  x.sym_sizes(), ", got shape ", mask->sym_sizes());
      TORCH_SYM_CHECK(mask->sym_size(0).sym_eq(x.sym_size(0)), kOp, ": layer ", i, ": mask must be (", x.sym_size(0),
                      ",) to match xs of shape ", x.sym_sizes(), ", got shape ", mask->sym_sizes());
      TORCH_CHECK(!mask->is_complex(), kOp, ": layer ", i, ": mask must be bool, integer or floating, got ",
                  mask->scalar_type());
      // 1-byte floats (float8) would be read as raw bytes: -0.0 and tiny values would not mean `!= 0`.
      TORCH_CHECK(!mask->is_floating_point() || mask->element_size() >= 2, kOp, ": layer ", i,
                  ": a floating mask must be float16 or wider, got ", mask->scalar_type());
    }
    const bool same_device = x.device() == device && cov.device() == device &&
                             (!mask.has_value() || mask->device() == device);
    TORCH_CHECK(same_device, kOp, ": layer ", i, ": all tensors must be on ", device, " (the device of xs[0]), got xs on ",
                x.device(), ", cov on ", cov.device(), mask.has_value() ? ", mask on " : "",
                mask.has_value() ? mask->device().str() : "");
  }
}

void check_distinct_covs(at::TensorList covs, at::TensorList xs) {
  // Layers run concurrently, in cost order: a cov written by one layer must not be memory another
  // layer writes or reads. Compared by [first, last] element in the storage (strides are positive),
  // so interleaved but disjoint views count as sharing too. One sweep per storage over the spans
  // sorted by start, O(n log n): a grouped convolution brings thousands of layers (views of one
  // input), where comparing every pair cost seconds per call.
  struct Span {
    int64_t first, last;
    size_t layer;
    bool cov;
  };
  std::unordered_map<const void*, std::vector<Span>> by_storage;
  auto add = [&](const at::Tensor& t, size_t layer, bool cov) {
    if (t.numel() == 0) return;
    int64_t last = t.storage_offset();
    for (int64_t k = 0; k < t.dim(); ++k) last += (t.size(k) - 1) * t.stride(k);
    by_storage[t.storage().unsafeGetStorageImpl()].push_back({t.storage_offset(), last, layer, cov});
  };
  for (size_t i = 0; i < covs.size(); ++i) add(covs[i], i, true);
  for (size_t j = 0; j < xs.size(); ++j) add(xs[j], j, false);
  for (auto& entry : by_storage) {
    std::vector<Span>& spans = entry.second;
    std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.first < b.first; });
    // The span reaching furthest among those seen, of covs and of xs: a span overlaps an earlier
    // one exactly when that one ends at or after its start.
    const Span* cov_reach = nullptr;
    const Span* x_reach = nullptr;
    for (const Span& s : spans) {
      if (s.cov && cov_reach != nullptr && cov_reach->last >= s.first) {
        TORCH_CHECK(false, kOp, ": layers ", std::min(cov_reach->layer, s.layer), " and ",
                    std::max(cov_reach->layer, s.layer),
                    ": covs share memory (views of one tensor whose spans overlap?); give each layer its own matrix");
      }
      const Span* cov = s.cov ? &s : (cov_reach != nullptr && cov_reach->last >= s.first ? cov_reach : nullptr);
      const Span* x = s.cov ? (x_reach != nullptr && x_reach->last >= s.first ? x_reach : nullptr) : &s;
      if (cov != nullptr && x != nullptr) {
        TORCH_CHECK(false, kOp, ": layer ", x->layer, "'s xs shares memory with layer ", cov->layer,
                    "'s cov, which this call writes; pass a copy");
      }
      const Span*& reach = s.cov ? cov_reach : x_reach;
      if (reach == nullptr || s.last > reach->last) reach = &s;
    }
  }
}

void covariance_accumulate_cpu(at::TensorList covs, at::TensorList xs,
                               const c10::List<std::optional<at::Tensor>>& masks, const c10::List<bool>& append_ones,
                               double alpha) {
  check_covariance_args(covs, xs, masks, append_ones, alpha);
  check_distinct_covs(covs, xs);
  const size_t n = xs.size();
  // Everything that can fail runs before any cov is touched: the kept rows of every layer. Inputs
  // are detached: at::mm_out refuses tensors that require grad, and nothing here is differentiable.
  std::vector<at::Tensor> x(n), kept(n);
  for (size_t i = 0; i < n; ++i) {
    x[i] = xs[i].detach();
    kept[i] = kept_rows(x[i], masks.get(i));
  }
  std::vector<int64_t> cost(n);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    cost[i] = xs[i].size(0) * covs[i].size(0) * covs[i].size(0);
    total += cost[i];
  }
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return cost[a] > cost[b]; });

  // Threads take whole layers, largest first, from a shared counter (each BLAS call then runs
  // single-threaded inside the parallel region). Compared with one multi-threaded GEMM after
  // another, this balances well whenever there are several layers per thread, and needs one
  // parallel region per call instead of one per GEMM: far fewer barriers, which is what costs
  // most on a shared, oversubscribed CPU. A layer larger than a thread's fair share would leave
  // the other threads idle, so such layers run first, one at a time, with all of BLAS's threads.
  const auto threads = static_cast<int64_t>(at::get_num_threads());
  size_t first_shared = 0;
  while (first_shared < n && cost[order[first_shared]] * threads > total) ++first_shared;
  const float a = static_cast<float>(alpha);
  Workspace ws;
  for (size_t k = 0; k < first_shared; ++k) {
    const size_t i = order[k];
    accumulate_layer_(covs[i], x[i], kept[i], append_ones.get(i), a, ws);
  }
  std::atomic<size_t> next{first_shared};
  at::parallel_for(0, threads, 1, [&](int64_t /*begin*/, int64_t /*end*/) {
    Workspace local;
    for (size_t k = next++; k < n; k = next++) {
      const size_t i = order[k];
      accumulate_layer_(covs[i], x[i], kept[i], append_ones.get(i), a, local);
    }
  });
}

TORCH_LIBRARY_IMPL(source_fast, CPU, m) {
  m.impl("covariance_accumulate_", &covariance_accumulate_cpu);
}

}  // namespace source_fast
