// Threads for the CPU loops (lossless_cpu.cpp, batched_cpu.cpp). at::parallel_for is inline, and it runs
// serially in a translation unit built without -fopenmp (as setup.py builds lora_ext._cpu) when torch's
// backend is OpenMP: its `#pragma omp parallel` is ignored there. So where torch's backend is OpenMP the team
// comes from the libgomp that torch itself loaded (GOMP_parallel is the entry point the pragma lowers to), and
// the loops share torch's threads (and their spin-waits) rather than starting a second runtime. Elsewhere
// at::parallel_for does the work. Without libgomp in the process the loops run serially.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>

#if AT_PARALLEL_OPENMP && !defined(_OPENMP) && defined(__linux__)
#include <dlfcn.h>
#define LORA_GOMP 1
#endif

namespace lora_cpu {

#ifdef LORA_GOMP
struct Gomp {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;
  int (*thread_num)() = nullptr;
  int (*num_threads)() = nullptr;
  Gomp() {
    void* h = dlopen("libgomp.so.1", RTLD_LAZY | RTLD_NOLOAD);
    if (!h) return;
    parallel = reinterpret_cast<decltype(parallel)>(dlsym(h, "GOMP_parallel"));
    thread_num = reinterpret_cast<decltype(thread_num)>(dlsym(h, "omp_get_thread_num"));
    num_threads = reinterpret_cast<decltype(num_threads)>(dlsym(h, "omp_get_num_threads"));
    if (!parallel || !thread_num || !num_threads) parallel = nullptr;
  }
};

inline const Gomp& gomp() {
  static const Gomp g;
  return g;
}
#endif

// How many threads the last parallel_parts call ran fn on (tests read it: lora_ext._cpu.last_parallel_parts()).
inline std::atomic<int>& last_parts() {
  static std::atomic<int> n{0};
  return n;
}

// fn(p, parts) for p in [0, parts), one part per thread of torch's intra-op team (parts = 1: serially). An
// exception thrown by fn on any thread is rethrown here, after the team has finished.
template <typename Fn>
void parallel_parts(bool parallel, const Fn& body) {
  const auto fn = [&body](int p, int parts) {
    if (p == 0) last_parts().store(parts, std::memory_order_relaxed);
    body(p, parts);
  };
  using Counted = decltype(fn);
  if (parallel && at::get_num_threads() > 1 && !at::in_parallel_region()) {
#ifdef LORA_GOMP
    const Gomp& g = gomp();
    if (g.parallel) {
      struct Ctx {
        const Counted* fn;
        const Gomp* g;
        std::atomic_flag failed = ATOMIC_FLAG_INIT;
        std::exception_ptr error;
      } ctx{&fn, &g};
      g.parallel(
          [](void* data) {
            Ctx& c = *static_cast<Ctx*>(data);
            try {
              (*c.fn)(c.g->thread_num(), c.g->num_threads());
            } catch (...) {  // no exception may leave a thread of the team
              if (!c.failed.test_and_set()) c.error = std::current_exception();
            }
          },
          &ctx, 0, 0);  // 0: the team torch sized (at::set_num_threads)
      if (ctx.error) std::rethrow_exception(ctx.error);
      return;
    }
#else
    const int parts = at::get_num_threads();
    at::parallel_for(0, parts, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) fn(static_cast<int>(p), parts);
    });
    return;
#endif
  }
  fn(0, 1);
}

// fn(b0, b1) over [begin, end) in contiguous ranges of at least `grain` elements, one per thread of the team:
// at::parallel_for's contract, with the team above.
template <typename Fn>
void parallel_range(int64_t begin, int64_t end, int64_t grain, const Fn& fn) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  parallel_parts(n >= 2 * std::max<int64_t>(grain, 1), [&](int p, int parts) {
    const int64_t lo = begin + n * p / parts, hi = begin + n * (p + 1) / parts;
    if (lo < hi) fn(lo, hi);
  });
}

}  // namespace lora_cpu
