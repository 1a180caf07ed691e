// Per-row meProp backward on the CPU, as XLA FFI handlers (see meprop_jax/_src/native/__init__.py).
//
// meprop_select: each row's k largest scores per group, as lax.top_k gives them (ties to the
//   lower index, -0 below +0; the caller maps NaN to +inf), in its order.
// meprop_products: from those indices, dx (each row's own kernel columns) and the compact
//   weight gradient over the union of the rows' columns: block [N*S, in] and cols [N*S], one
//   slot per selected entry; a slot whose column an earlier slot holds is padding (out + slot,
//   zero block row). Entries of g that are NaN or +-inf but not selected by their row are added
//   to their column's block row when that column is in the union, so that the block rows are
//   non-finite exactly for the columns that hold one (the library's rule). An empty dx [0, in]
//   skips dx (the first layer's input is data, which autodiff does not differentiate).
// meprop_select_factors: per-example selection by |g| with the kept values, for a factored
//   weight gradient (FactoredGrad), in one pass.
// The Adam handlers are in adam.cc; the thread pool's loop and the column chains in shared.h.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "shared.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using meprop_native::ColumnSlots;
using meprop_native::ParallelFor;
using meprop_native::SumSlots;

namespace {

// An unsigned key that orders floats as lax.top_k does (a total order: -0 below +0).
inline uint32_t OrderKey(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Histogram bins of the distance below the row's largest key: 2^kBinShift keys each, 8 per
// power of two of a positive float, so the top k of a row of gradients spread over a few
// bins; the last bin takes every key farther than the others reach.
constexpr int kBins = 256;
constexpr int kBinShift = 20;

// The k best of row[0, width) by (key desc, index asc) into dst, in that order. A histogram of
// each key's distance below the row's largest finds the bin holding the k-th key; entries of
// that bin and nearer are ranked, packed as (key, ~index) so that one integer compare orders
// them. On a CPU this is several times faster than nth_element over the whole row, whose
// compares mispredict on every fresh row.
void SelectRow(const float* row, int64_t width, int64_t k, int32_t* dst,
               std::vector<uint32_t>& keys, std::vector<uint64_t>& cand) {
  uint32_t top = 0;
  for (int64_t j = 0; j < width; ++j) {
    keys[j] = OrderKey(row[j]);
    top = std::max(top, keys[j]);
  }
  auto bin = [top](uint32_t key) {
    return std::min<uint32_t>((top - key) >> kBinShift, kBins - 1);
  };
  uint32_t hist[kBins] = {};
  for (int64_t j = 0; j < width; ++j) ++hist[bin(keys[j])];
  uint32_t t = 0;
  for (int64_t above = 0; above + hist[t] < static_cast<uint64_t>(k);) above += hist[t++];
  int64_t n_cand = 0;
  for (int64_t j = 0; j < width; ++j)
    if (bin(keys[j]) <= t)
      cand[n_cand++] = (static_cast<uint64_t>(keys[j]) << 32) | ~static_cast<uint32_t>(j);
  const auto first = cand.begin(), last = cand.begin() + n_cand;
  std::nth_element(first, first + (k - 1), last, std::greater<uint64_t>());
  std::sort(first, first + k, std::greater<uint64_t>());
  for (int64_t j = 0; j < k; ++j) dst[j] = static_cast<int32_t>(~static_cast<uint32_t>(cand[j]));
}

ffi::Error Select(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scores,
                  ffi::ResultBuffer<ffi::S32> idx, int64_t k, int64_t groups) {
  const auto dims = scores.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("scores must be [N, out]");
  const int64_t n = dims[0], out = dims[1], width = out / groups;
  if (groups < 1 || out % groups || k < 1 || k > width)
    return ffi::Error::InvalidArgument("bad k or groups");
  const float* s = scores.typed_data();
  int32_t* o = idx->typed_data();
  ParallelFor(pool, n * groups, std::max<int64_t>(8192 / width, 1), [&](int64_t a, int64_t b) {
    std::vector<uint32_t> keys(width);
    std::vector<uint64_t> cand(width);
    for (int64_t rg = a; rg < b; ++rg) {
      const int64_t r = rg / groups, grp = rg % groups;
      int32_t* dst = o + r * groups * k + grp * k;
      SelectRow(s + r * out + grp * width, width, k, dst, keys, cand);
      for (int64_t j = 0; j < k; ++j) dst[j] += static_cast<int32_t>(grp * width);
    }
  });
  return ffi::Error::Success();
}

// Per-example selection for a factored weight gradient, in one pass over g [N, out]: each
// row's top k per group by |g| (NaN and +-inf rank first, as +inf), as Select gives them for
// the scores |g|; the kept values g[r, idx]; and uses [] = 1, or NaN when a row holds more
// non-finite entries than it keeps (the factors cannot carry the rest; see FactoredGrad).
ffi::Error SelectFactors(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g,
                         ffi::ResultBuffer<ffi::S32> idx, ffi::ResultBuffer<ffi::F32> values,
                         ffi::ResultBuffer<ffi::F32> uses, int64_t k, int64_t groups) {
  const auto dims = g.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("g must be [N, out]");
  const int64_t n = dims[0], out = dims[1], width = out / groups, s = groups * k;
  if (groups < 1 || out % groups || k < 1 || k > width)
    return ffi::Error::InvalidArgument("bad k or groups");
  const float* gp = g.typed_data();
  int32_t* ip = idx->typed_data();
  float* vp = values->typed_data();
  std::atomic<bool> lost{false};
  // Chunks of ~2k scores: a minibatch of 10 rows of 500 takes both cores (measured faster
  // than one, with dx next on the pool).
  ParallelFor(pool, n, std::max<int64_t>(2048 / std::max<int64_t>(out, 1), 1),
              [&](int64_t a, int64_t b) {
    std::vector<float> scores(width);
    std::vector<uint32_t> keys(width);
    std::vector<uint64_t> cand(width);
    for (int64_t r = a; r < b; ++r) {
      const float* row = gp + r * out;
      int64_t non_finite = 0, kept_non_finite = 0;
      for (int64_t grp = 0; grp < groups; ++grp) {
        const float* part = row + grp * width;
        for (int64_t j = 0; j < width; ++j) {
          const float v = std::fabs(part[j]);
          scores[j] = std::isnan(v) ? INFINITY : v;
          non_finite += !std::isfinite(v);
        }
        int32_t* dst = ip + r * s + grp * k;
        SelectRow(scores.data(), width, k, dst, keys, cand);
        for (int64_t j = 0; j < k; ++j) {
          dst[j] += static_cast<int32_t>(grp * width);
          const float v = row[dst[j]];
          vp[r * s + grp * k + j] = v;
          kept_non_finite += !std::isfinite(v);
        }
      }
      if (non_finite > kept_non_finite) lost.store(true, std::memory_order_relaxed);
    }
  });
  uses->typed_data()[0] = lost.load() ? NAN : 1.0f;
  return ffi::Error::Success();
}

// Adds g[r, c] x[r] to dest(c) for every non-finite g[r, c] that row r did not select, where
// dest(c) is not null (the weight-gradient row of column c): the masked gradient keeps those
// entries, so a product over it has them too (the library's rule). Rows without a non-finite
// entry cost one scan.
template <typename Dest>
void AddUnselectedNonFinite(const float* gp, const int32_t* ip, const float* xp, int64_t n,
                            int64_t out, int64_t s, int64_t in, const Dest& dest) {
  std::vector<char> chosen(out, 0);
  for (int64_t r = 0; r < n; ++r) {
    const float* grow = gp + r * out;
    bool any = false;
    for (int64_t c = 0; c < out; ++c) any |= !std::isfinite(grow[c]);
    if (!any) continue;
    for (int64_t j = 0; j < s; ++j) chosen[ip[r * s + j]] = 1;
    const float* xr = xp + r * in;
    for (int64_t c = 0; c < out; ++c) {
      if (std::isfinite(grow[c]) || chosen[c]) continue;
      float* row = dest(c);
      if (row == nullptr) continue;
      for (int64_t i = 0; i < in; ++i) row[i] += grow[c] * xr[i];
    }
    for (int64_t j = 0; j < s; ++j) chosen[ip[r * s + j]] = 0;
  }
}

// The weight gradient of an [out, in] kernel as a dense [out, in] array, for rows that cover
// the layer: row c is the sum over the rows r that selected c, in row order, of g[r, c] x[r],
// plus g[r, c] x[r] for every non-finite g[r, c] that row r did not select (the masked
// gradient keeps those, so the full product x^T g_masked has them too). N * S * in
// multiply-adds where that product takes N * out * in; a row no one selected is zero.
ffi::Error DenseRows(ffi::ThreadPool& pool, const float* gp, const int32_t* ip, const float* xp,
                     int64_t n, int64_t out, int64_t s, int64_t in, float* dw) {
  const ColumnSlots chains(ip, n * s, out);
  ParallelFor(pool, out, std::max<int64_t>(16384 / std::max<int64_t>(s * in, 1), 1),
              [&](int64_t a, int64_t b) {
    for (int64_t c = a; c < b; ++c) {
      float* row = dw + c * in;
      std::fill(row, row + in, 0.0f);
      for (int64_t q = chains.first[c]; q >= 0; q = chains.later[q]) {
        const float v = gp[(q / s) * out + c];
        const float* xr = xp + (q / s) * in;
        for (int64_t i = 0; i < in; ++i) row[i] += v * xr[i];
      }
    }
  });
  AddUnselectedNonFinite(gp, ip, xp, n, out, s, in, [&](int64_t c) { return dw + c * in; });
  return ffi::Error::Success();
}

// kernel: [out, in] (transposed != 0) or [in, out]. block [N*S, in] and cols [N*S], or both
// empty for dx alone.
ffi::Error Products(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::S32> idx,
                    ffi::Buffer<ffi::F32> x,
                    ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> dx,
                    ffi::ResultBuffer<ffi::F32> block, ffi::ResultBuffer<ffi::S32> cols,
                    int64_t transposed, int64_t dense_rows) {
  const auto gd = g.dimensions(), id = idx.dimensions(), xd = x.dimensions();
  if (gd.size() != 2 || id.size() != 2 || xd.size() != 2 || id[0] != gd[0] || xd[0] != gd[0])
    return ffi::Error::InvalidArgument("g [N, out], idx [N, S], x [N, in] expected");
  const int64_t n = gd[0], out = gd[1], s = id[1], in = xd[1], slots = n * s;
  const float* gp = g.typed_data();
  const int32_t* ip = idx.typed_data();
  const float* xp = x.typed_data();
  const float* wp = kernel.typed_data();
  float* dxp = dx->typed_data();
  float* bp = block->typed_data();
  int32_t* cp = cols->typed_data();

  // dx of row r: the sum of its own entries' kernel rows (columns of an [in, out] kernel).
  auto input_grad = [&](int64_t r) {
    float* d = dxp + r * in;
    std::fill(d, d + in, 0.0f);
    for (int64_t j = 0; j < s; ++j) {
      const int32_t c = ip[r * s + j];
      const float v = gp[r * out + c];
      if (transposed) {
        const float* w = wp + static_cast<int64_t>(c) * in;
        for (int64_t i = 0; i < in; ++i) d[i] += v * w[i];
      } else {
        for (int64_t i = 0; i < in; ++i) d[i] += v * wp[i * out + c];
      }
    }
  };
  const int64_t row_grain = std::max<int64_t>(16384 / std::max<int64_t>(s * in, 1), 1);
  // An empty dx asks for the weight gradient alone (an input autodiff does not differentiate);
  // an empty block asks for dx alone (the caller forms the weight gradient).
  const bool with_dx = dx->dimensions()[0] != 0, with_block = block->dimensions()[0] != 0;

  if (!with_block || dense_rows) {
    // dx alone is light (N * S * in multiply-adds): chunks of at least ~64k of them, as a
    // hand-off to the pool costs more than a few rows (10 rows at k = 20 make two chunks).
    const int64_t grain = dense_rows ? row_grain
                                     : std::max<int64_t>(65536 / std::max<int64_t>(s * in, 1), 1);
    if (with_dx)
      ParallelFor(pool, n, grain, [&](int64_t a, int64_t b) {
        for (int64_t r = a; r < b; ++r) input_grad(r);
      });
    return with_block ? DenseRows(pool, gp, ip, xp, n, out, s, in, bp) : ffi::Error::Success();
  }

  // The union: the first slot to hold a column owns its block row.
  const ColumnSlots chains(ip, slots, out);
  for (int64_t p = 0; p < slots; ++p)
    cp[p] = chains.first[ip[p]] == p ? ip[p] : static_cast<int32_t>(out + p);
  const auto entry = [&](int64_t q) { return gp[(q / s) * out + ip[q]]; };
  // Row r's task: its dx row and the block rows of its S slots. An owner's block row is its
  // own entry's product, then those of the later slots of its column, added in slot order; a
  // padding slot's row is zero. One pass over the pool for both, as each task writes only
  // its own rows: half the hand-offs of two passes, which cost more than the work at batch 10.
  ParallelFor(pool, n, std::max<int64_t>(row_grain / 2, 1), [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      if (with_dx) input_grad(r);
      for (int64_t p = r * s; p < (r + 1) * s; ++p) {
        float* row = bp + p * in;
        if (cp[p] != ip[p]) std::fill(row, row + in, 0.0f);
        else SumSlots(chains, p, entry, xp, s, in, row);
      }
    }
  });
  // Non-finite entries past their row's selection, in a column of the union.
  AddUnselectedNonFinite(gp, ip, xp, n, out, s, in, [&](int64_t c) -> float* {
    return chains.first[c] >= 0 ? bp + chains.first[c] * in : nullptr;
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MepropSelect, Select,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("groups"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MepropProducts, Products,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("transposed")
                                  .Attr<int64_t>("dense_rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MepropSelectFactors, SelectFactors,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("groups"));
