// Adam on the CPU, in place on a kernel stored [out, in] and its two moments, as XLA FFI
// handlers (see meprop_jax/_src/native/__init__.py and meprop_jax/_src/fused.py):
// meprop_adam_rows: from the compact gradient of some rows, lazy (those rows move) or not
//   (every row moves, the others with a zero gradient: the authors' rule).
// meprop_adam_factored: the same from a gradient kept as factors (each slot's value and
//   column, each row's input), whose rows it sums as it updates them.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "shared.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using meprop_native::ColumnSlots;
using meprop_native::ParallelFor;
using meprop_native::SumSlots;

namespace {

// The result buffer of an in-place update, holding the input's values: XLA aliases the
// results to the inputs (input_output_aliases); should it not, this starts from a copy.
inline float* InPlace(ffi::Buffer<ffi::F32>& in, ffi::ResultBuffer<ffi::F32>& out) {
  float* data = out->typed_data();
  if (data != in.typed_data())
    std::memcpy(data, in.typed_data(), sizeof(float) * in.element_count());
  return data;
}

// How a moment is divided by its bias correction c = 1 - b^t. kOne: c has rounded to 1 and the
// division is skipped. kReciprocal: c in [2^-20, 1]; a / c is computed from y = 1 / c as
// q = a y, then q + (a - q c) y with two FMAs, which is a / c correctly rounded (Markstein's
// theorem: y correctly rounded, q within an ulp, no underflow or overflow in a - q c), checked
// bitwise for every c of the first 20,000 steps and every |a| in [2^-80, 2^100] (the range
// ExactByReciprocal admits; there a - q c flushed to zero, as XLA's threads flush subnormals,
// would move q by under a quarter ulp). In the 784->500 kernel's non-lazy pass the division by
// 1 - b2^t took about 20 us of 95, the FMAs about 7. kDivide: any other c (never for b in
// [0, 1 - 2^-20]).
enum class Correction { kOne, kReciprocal, kDivide };

template <Correction kC>
inline float Corrected(float a, float c, float y) {
  if constexpr (kC == Correction::kOne) return a;
  if constexpr (kC == Correction::kDivide) return a / c;
  const float q = a * y;
  return std::fma(std::fma(-q, c, a), y, q);
}

// Whether Corrected<kC>(a) is a / c exactly: always for kOne and kDivide; for kReciprocal when
// a is +0 or |a| lies in [2^-80, 2^100]. For other moments (-0, tiny, huge, inf, NaN) the row
// loop divides.
template <Correction kC>
inline bool ExactByReciprocal(float a) {
  if constexpr (kC != Correction::kReciprocal) return true;
  uint32_t bits;
  std::memcpy(&bits, &a, sizeof bits);
  constexpr uint32_t kLow = 47u << 23, kHigh = 227u << 23;  // 2^-80, 2^100
  return (bits == 0u) | ((bits & 0x7fffffffu) - kLow <= kHigh - kLow);
}

inline Correction CorrectionFor(float c) {
  if (c == 1.0f) return Correction::kOne;
  return c >= 0x1p-20f && c < 1.0f ? Correction::kReciprocal : Correction::kDivide;
}

// One row of Adam in place, by optax's arithmetic: scale_by_adam, then scale_by_learning_rate.
// hyper = [b1, b2, 1 - b1^t, 1 - b2^t, learning rate, eps], t the step counted from 1. Without
// a gradient row (gr == nullptr) the gradient is zero, still written into the arithmetic so
// that every weight takes exactly the steps it would take on a zero entry of a dense gradient.
// kC1, kC2: how each moment is divided by its bias correction (Correction); y1, y2 the
// reciprocals of the corrections. Weights whose moments fall outside the reciprocal's range
// keep their value in the vector loop and are stepped after it, dividing.
// The four rows never overlap (__restrict__: no overlap checks before the vector loop).
template <bool kZeroGradient, Correction kC1, Correction kC2>
inline void AdamRowOf(float* __restrict__ pr, float* __restrict__ mr, float* __restrict__ vr,
                      const float* __restrict__ gr, int64_t in, const float* hyper, float y1,
                      float y2) {
  const float b1 = hyper[0], b2 = hyper[1], c1 = hyper[2], c2 = hyper[3], lr = hyper[4],
              eps = hyper[5];
  const float zero = 0.0f;
  int32_t divided = 0;
  for (int64_t i = 0; i < in; ++i) {
    const float gi = kZeroGradient ? zero : gr[i];
    const float m = (1.0f - b1) * gi + b1 * mr[i];
    const float v = (1.0f - b2) * (gi * gi) + b2 * vr[i];
    mr[i] = m;
    vr[i] = v;
    const float m_hat = Corrected<kC1>(m, c1, y1);
    const float v_hat = Corrected<kC2>(v, c2, y2);
    const float stepped = pr[i] + (-lr) * (m_hat / (std::sqrt(v_hat) + eps));
    const bool exact = ExactByReciprocal<kC1>(m) & ExactByReciprocal<kC2>(v);
    pr[i] = exact ? stepped : pr[i];
    divided += !exact;
  }
  if (divided == 0) return;
  constexpr Correction kD1 = kC1 == Correction::kOne ? kC1 : Correction::kDivide;
  constexpr Correction kD2 = kC2 == Correction::kOne ? kC2 : Correction::kDivide;
  for (int64_t i = 0; i < in; ++i) {
    const float m = mr[i], v = vr[i];
    if (ExactByReciprocal<kC1>(m) & ExactByReciprocal<kC2>(v)) continue;
    const float m_hat = Corrected<kD1>(m, c1, y1);
    const float v_hat = Corrected<kD2>(v, c2, y2);
    pr[i] = pr[i] + (-lr) * (m_hat / (std::sqrt(v_hat) + eps));
  }
}

// The row update for one pair of bias corrections (known when compiled).
template <Correction kC1, Correction kC2>
struct Adam {
  float y1, y2;  // 1 / (1 - b1^t), 1 / (1 - b2^t)
  template <bool kZeroGradient>
  void Row(float* pr, float* mr, float* vr, const float* gr, int64_t in,
           const float* hyper) const {
    AdamRowOf<kZeroGradient, kC1, kC2>(pr, mr, vr, gr, in, hyper, y1, y2);
  }
};

// body(Adam<...>{...}) for hyper's bias corrections: each whole update is compiled for each
// pair, so that choosing one costs nothing per row. A correction of 1 beside one that is not
// is taken by reciprocal (exact for c = 1 too); kDivide for either divides both.
template <typename Body>
ffi::Error WithBiasCorrections(const float* hyper, Body&& body) {
  using C = Correction;
  const C first = CorrectionFor(hyper[2]), second = CorrectionFor(hyper[3]);
  const float y1 = 1.0f / hyper[2], y2 = 1.0f / hyper[3];
  if (first == C::kDivide || second == C::kDivide)
    return body(Adam<C::kDivide, C::kDivide>{y1, y2});
  if (first == C::kOne && second == C::kOne) return body(Adam<C::kOne, C::kOne>{y1, y2});
  if (first == C::kOne) return body(Adam<C::kOne, C::kReciprocal>{y1, y2});
  return body(Adam<C::kReciprocal, C::kReciprocal>{y1, y2});
}

// Adam on a kernel stored [out, in] and on its two moments, in place (the results alias p, mu,
// nu), from the compact gradient g [K, in] of the rows `cols`; padding (cols >= out) is
// skipped. hyper as for AdamRowOf. lazy: only the rows `cols` move. Not lazy: every row moves,
// the gradient being zero outside `cols` (which must then be distinct), i.e. optax.adam on the
// masked dense gradient (the authors' rule) without building that gradient.
ffi::Error AdamRows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> mu, ffi::Buffer<ffi::F32> nu,
                    ffi::Buffer<ffi::S32> cols, ffi::Buffer<ffi::F32> g,
                    ffi::Buffer<ffi::F32> hyper, ffi::ResultBuffer<ffi::F32> p_out,
                    ffi::ResultBuffer<ffi::F32> mu_out, ffi::ResultBuffer<ffi::F32> nu_out,
                    int64_t lazy) {
  const auto pd = p.dimensions(), gd = g.dimensions();
  if (pd.size() != 2 || gd.size() != 2 || gd[1] != pd[1] || cols.dimensions()[0] != gd[0] ||
      hyper.element_count() != 6)
    return ffi::Error::InvalidArgument("p [out, in], cols [K], g [K, in], hyper [6] expected");
  const int64_t out = pd[0], in = pd[1], k = gd[0];
  float* P = InPlace(p, p_out);
  float* M = InPlace(mu, mu_out);
  float* V = InPlace(nu, nu_out);
  const int32_t* c = cols.typed_data();
  const float* G = g.typed_data();
  const float* h = hyper.typed_data();
  const int64_t grain = std::max<int64_t>(16384 / std::max<int64_t>(in, 1), 1);
  return WithBiasCorrections(h, [&](auto adam) {
    if (lazy) {
      // Rows in parallel only when distinct (as the union gives them); else in order.
      std::vector<char> seen(out, 0);
      bool distinct = true;
      for (int64_t j = 0; j < k && distinct; ++j)
        if (c[j] >= 0 && c[j] < out) distinct = !seen[c[j]]++;
      auto rows = [&](int64_t a, int64_t b) {
        for (int64_t j = a; j < b; ++j) {
          const int64_t r = c[j];
          if (r >= 0 && r < out)
            adam.template Row<false>(P + r * in, M + r * in, V + r * in, G + j * in, in, h);
        }
      };
      if (distinct) ParallelFor(pool, k, grain, rows);
      else rows(0, k);
      return ffi::Error::Success();
    }
    std::vector<int64_t> slot(out, -1);
    for (int64_t j = 0; j < k; ++j)
      if (c[j] >= 0 && c[j] < out) slot[c[j]] = j;
    ParallelFor(pool, out, grain, [&](int64_t a, int64_t b) {
      for (int64_t r = a; r < b; ++r) {
        if (slot[r] >= 0)
          adam.template Row<false>(P + r * in, M + r * in, V + r * in, G + slot[r] * in, in, h);
        else
          adam.template Row<true>(P + r * in, M + r * in, V + r * in, nullptr, in, h);
      }
    });
    return ffi::Error::Success();
  });
}

// Adam on a kernel stored [out, in], in place, from its gradient kept as factors: row c of the
// gradient is the sum over the slots q (in slot order) with idx[q] == c of values[q] x[q / S],
// so no [N*S, in] block is written and read back. hyper as for AdamRowOf, then clip (+inf for
// none): each gradient entry is clipped to [-clip, clip] once summed, as optax.clip does.
// lazy: only the rows some slot selected move; otherwise every row moves (the authors' rule).
ffi::Error AdamFactored(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> mu,
                        ffi::Buffer<ffi::F32> nu, ffi::Buffer<ffi::F32> values,
                        ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> hyper, ffi::ResultBuffer<ffi::F32> p_out,
                        ffi::ResultBuffer<ffi::F32> mu_out, ffi::ResultBuffer<ffi::F32> nu_out,
                        int64_t lazy) {
  const auto pd = p.dimensions(), vd = values.dimensions(), id = idx.dimensions(),
             xd = x.dimensions();
  if (pd.size() != 2 || vd.size() != 2 || id.size() != 2 || xd.size() != 2 || id[0] != vd[0] ||
      id[1] != vd[1] || xd[0] != vd[0] || xd[1] != pd[1] || hyper.element_count() != 7)
    return ffi::Error::InvalidArgument(
        "p [out, in], values and idx [N, S], x [N, in], hyper [7] expected");
  const int64_t out = pd[0], in = pd[1], s = vd[1];
  float* P = InPlace(p, p_out);
  float* M = InPlace(mu, mu_out);
  float* V = InPlace(nu, nu_out);
  const float* vp = values.typed_data();
  const int32_t* ip = idx.typed_data();
  const float* xp = x.typed_data();
  const float* h = hyper.typed_data();
  const float clip = h[6];
  // The slots of each column, in slot order; indices out of range name no column.
  const ColumnSlots chains(ip, vd[0] * vd[1], out);
  const auto value = [vp](int64_t q) { return vp[q]; };
  auto gradient_row = [&](int64_t c, float* row) {
    SumSlots(chains, chains.first[c], value, xp, s, in, row);
    if (std::isfinite(clip))
      for (int64_t i = 0; i < in; ++i)
        if (!std::isnan(row[i])) row[i] = std::min(std::max(row[i], -clip), clip);
  };
  const int64_t grain = std::max<int64_t>(16384 / std::max<int64_t>(in, 1), 1);
  return WithBiasCorrections(h, [&](auto adam) {
    if (lazy) {
      const auto& touched = chains.order;
      ParallelFor(pool, static_cast<int64_t>(touched.size()), grain, [&](int64_t a, int64_t b) {
        std::vector<float> row(in);
        for (int64_t j = a; j < b; ++j) {
          const int64_t c = touched[j];
          gradient_row(c, row.data());
          adam.template Row<false>(P + c * in, M + c * in, V + c * in, row.data(), in, h);
        }
      });
      return ffi::Error::Success();
    }
    ParallelFor(pool, out, grain, [&](int64_t a, int64_t b) {
      std::vector<float> row(in);
      for (int64_t c = a; c < b; ++c) {
        if (chains.first[c] >= 0) {
          gradient_row(c, row.data());
          adam.template Row<false>(P + c * in, M + c * in, V + c * in, row.data(), in, h);
        } else {
          adam.template Row<true>(P + c * in, M + c * in, V + c * in, nullptr, in, h);
        }
      }
    });
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MepropAdamRows, AdamRows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("lazy"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MepropAdamFactored, AdamFactored,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("lazy"));

