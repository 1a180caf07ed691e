// Shared by the native kernels (rowwise.cc, adam.cc; see meprop_jax/_src/native/__init__.py):
// the parallel loop over XLA's intra-op thread pool (the one XLA's own CPU kernels use), so
// that on a multi-core CPU the kernels are compared with dense products that use every core;
// and the slots of each selected column, from which the weight gradient's rows are summed.
// Every output element is computed by one thread in the sequential order: results do not
// depend on the number of threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace meprop_native {

namespace ffi = xla::ffi;

// fn(begin, end) over [0, n) in chunks of about `grain` items, on the calling thread and on
// the pool. The caller claims chunks like any worker and then waits only for chunks that a
// worker has claimed and is running: a busy pool delays nothing (the caller does the work
// itself) and cannot deadlock. Workers that start after the last chunk is claimed touch only
// the shared counters, which they co-own.
// MEPROP_JAX_NATIVE_THREADS caps the threads (read at every call: tests and benchmarks switch
// it); unset or 0 means the whole pool.
inline int64_t ThreadCap(int64_t pool_threads) {
  const char* cap = std::getenv("MEPROP_JAX_NATIVE_THREADS");
  const int64_t n = cap ? std::atoll(cap) : 0;
  return n > 0 ? std::min(n, pool_threads) : pool_threads;
}

template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t grain, const F& fn) {
  const int64_t workers = ThreadCap(pool.num_threads());
  const int64_t chunks = std::min<int64_t>(std::max<int64_t>(n / std::max<int64_t>(grain, 1), 1),
                                           std::max<int64_t>(workers, 1) * 4);
  if (chunks <= 1 || workers <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  auto run = [n, chunks](Counters& c, const F& f) {
    for (int64_t i; (i = c.next.fetch_add(1)) < chunks;) {
      f(n * i / chunks, n * (i + 1) / chunks);
      c.done.fetch_add(1, std::memory_order_release);
    }
  };
  const F* f = &fn;
  // The caller is one of the `workers` threads: it works too, so it hands out one task fewer.
  // When XLA runs a program on the caller's own thread (as it did for a training step whose
  // state was donated), a task per pool thread made three busy threads on two cores, and the
  // kernels ran about as slowly as on one.
  for (int64_t w = 0; w < std::min(workers - 1, chunks - 1); ++w)
    pool.Schedule([counters, f, run] { run(*counters, *f); });
  run(*counters, fn);
  while (counters->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// The slots (positions in idx [N*S], row by row) holding each column, in slot order: first[c]
// (-1 for none) and later[q], the next slot after q that holds q's column (-1 for none);
// order lists the columns by their first slot. An index outside [0, out) names no column.
struct ColumnSlots {
  std::vector<int64_t> first, later;
  std::vector<int32_t> order;

  ColumnSlots(const int32_t* idx, int64_t slots, int64_t out) : first(out, -1), later(slots, -1) {
    std::vector<int64_t> last(out, -1);
    for (int64_t q = 0; q < slots; ++q) {
      const int32_t c = idx[q];
      if (c < 0 || c >= out) continue;
      if (last[c] >= 0) {
        later[last[c]] = q;
      } else {
        first[c] = q;
        order.push_back(c);
      }
      last[c] = q;
    }
  }
};

// row [in] = the sum, over slot q and the later slots of its column in slot order, of
// value(q) x[q / s]: a weight-gradient row from the entries that selected its column. The
// first product is assigned and the others added, in that order, wherever a row is summed.
template <typename Value>
inline void SumSlots(const ColumnSlots& slots, int64_t q, const Value& value, const float* x,
                     int64_t s, int64_t in, float* row) {
  const float v = value(q);
  const float* xr = x + (q / s) * in;
  for (int64_t i = 0; i < in; ++i) row[i] = v * xr[i];
  for (q = slots.later[q]; q >= 0; q = slots.later[q]) {
    const float w = value(q);
    const float* xq = x + (q / s) * in;
    for (int64_t i = 0; i < in; ++i) row[i] += w * xq[i];
  }
}

}  // namespace meprop_native
