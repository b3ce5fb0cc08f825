// SIMT simulator: compiles the CUDA kernels in csrc/kernels/*.cuh with a host C++ compiler and runs them
// on the CPU, one fiber per CUDA thread, so that every kernel can be checked without a GPU.
//
// It models what the kernels' correctness depends on: the thread hierarchy, block-wide and warp-wide
// barriers, shared memory (one copy per block), warp shuffles and ballots, and the WMMA subset the kernels
// use. It says nothing about speed or about the GPU memory model.
//
// Include this header first in a translation unit, before any system or library header: the fiber switch
// uses _setjmp/_longjmp between stacks, which glibc's _FORTIFY_SOURCE variant of longjmp rejects, and that
// choice is made once, when the first system header is read.
#pragma once

#ifdef _FORTIFY_SOURCE
#undef _FORTIFY_SOURCE
#endif

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(__USE_FORTIFY_LEVEL) && __USE_FORTIFY_LEVEL > 0
#error "sim/simt.h must be included before any other header (it needs longjmp without _FORTIFY_SOURCE)"
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define LORA_SIM_ASAN 1
#endif

#define LORA_SIM 1

namespace sim {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr int kWarpSize = 32;
// The default per-block dynamic shared memory limit: more needs cudaFuncSetAttribute on a GPU.
constexpr size_t kMaxDynamicShared = 48 * 1024;
// What a kernel may opt into above that (cudaFuncSetAttribute, which the launch policies call): the smallest
// opt-in limit of the architectures lora_ext builds for (99 KB on sm_86/sm_89; sm_80 163 KB, sm_90 227 KB).
constexpr size_t kMaxOptInShared = 99 * 1024;

struct Options {
  int workers = 0;          // OS threads running blocks; 0: one per core
  long long seed = -1;      // < 0: fibers run in thread order; >= 0: a fresh shuffled order per phase
  size_t stack_bytes = 0;   // per fiber; 0: default
};

inline Options& options() {
  static Options o;
  return o;
}

namespace detail {

enum class State : unsigned char { Runnable, AtBlockBarrier, AtWarpBarrier, Done };

// A warp exchange slot: big enough for a shuffle operand or one lane's WMMA operand fragments.
struct alignas(16) Slot {
  unsigned char bytes[32];
};

struct Fiber {
  jmp_buf ctx;
  void* stack = nullptr;  // mapping including the guard page
  size_t map_bytes = 0;
  char* stack_lo = nullptr;
  size_t stack_size = 0;
  uint3 tid{};
  int linear = 0;
  State state = State::Done;
  int warp_phase = 0;
  // cp.async: the copies of the open group, and the committed groups still in flight (oldest first)
  struct Copy {
    void* dst;
    const void* src;
    int bytes;
  };
  std::vector<Copy> open_group;
  std::vector<std::vector<Copy>> in_flight;
#ifdef LORA_SIM_ASAN
  void* fake_stack = nullptr;
#endif
};

struct Worker;
inline thread_local Worker* tl_worker = nullptr;

[[noreturn]] inline void fiber_entry();

struct Worker {
  jmp_buf sched_ctx;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  Fiber* starting = nullptr;
  bool broken = false;

  uint3 block_idx{};
  dim3 block_dim, grid_dim;
  const std::function<void()>* body = nullptr;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<Slot> slots;  // [warp][phase][lane]
  std::exception_ptr error;
  std::vector<int> order;
  std::mt19937_64 rng;

#ifdef LORA_SIM_ASAN
  void* sched_fake_stack = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
#endif

  ~Worker() {
    release_fibers();
    std::free(smem);
  }

  void release_fibers() {
    for (Fiber& f : fibers)
      if (f.stack) munmap(f.stack, f.map_bytes);
    fibers.clear();
  }

  // Fibers are started once and reused for every block this worker runs; a block that fails leaves its
  // fibers mid-kernel, so they are thrown away and started afresh.
  void prepare_fibers(int n) {
    if (broken || (int)fibers.size() != n) {
      release_fibers();
      broken = false;
      fibers = std::vector<Fiber>(n);
      size_t page = 4096;
      size_t size = options().stack_bytes ? options().stack_bytes : default_stack_bytes();
      size = (size + page - 1) / page * page;
      for (int i = 0; i < n; ++i) {
        Fiber& f = fibers[i];
        f.map_bytes = size + page;
        f.stack = mmap(nullptr, f.map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (f.stack == MAP_FAILED) {
          f.stack = nullptr;
          throw Error("simulator: cannot allocate fiber stacks");
        }
        mprotect(f.stack, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
        f.stack_lo = static_cast<char*>(f.stack) + page;
        f.stack_size = size;
#ifdef LORA_SIM_ASAN
        __asan_unpoison_memory_region(f.stack_lo, f.stack_size);
#endif
        start_fiber(&f);
      }
    }
  }

  static size_t default_stack_bytes() {
#ifdef LORA_SIM_ASAN
    return 512 * 1024;
#else
    return 128 * 1024;
#endif
  }

  void start_fiber(Fiber* f) {
    ucontext_t uc;
    getcontext(&uc);
    uc.uc_stack.ss_sp = f->stack_lo;
    uc.uc_stack.ss_size = f->stack_size;
    uc.uc_link = nullptr;
    makecontext(&uc, reinterpret_cast<void (*)()>(&fiber_entry), 0);
    starting = f;
    if (_setjmp(sched_ctx) == 0) {
      before_enter(f);
      setcontext(&uc);
    }
    after_return();
  }

  // Scheduler -> fiber.
  void enter(Fiber* f) {
    current = f;
    if (_setjmp(sched_ctx) == 0) {
      before_enter(f);
      _longjmp(f->ctx, 1);
    }
    after_return();
  }

  // Fiber -> scheduler.
  void leave() {
    Fiber* f = current;
    if (_setjmp(f->ctx) == 0) {
#ifdef LORA_SIM_ASAN
      __sanitizer_start_switch_fiber(&f->fake_stack, sched_bottom, sched_size);
#endif
      _longjmp(sched_ctx, 1);
    }
#ifdef LORA_SIM_ASAN
    __sanitizer_finish_switch_fiber(f->fake_stack, nullptr, nullptr);
#endif
  }

  void before_enter(Fiber* f) {
#ifdef LORA_SIM_ASAN
    __sanitizer_start_switch_fiber(&sched_fake_stack, f->stack_lo, f->stack_size);
#else
    (void)f;
#endif
  }
  void after_return() {
#ifdef LORA_SIM_ASAN
    __sanitizer_finish_switch_fiber(sched_fake_stack, nullptr, nullptr);
#endif
  }

  [[noreturn]] void fiber_loop() {
    for (;;) {
      try {
        (*body)();
      } catch (...) {
        if (!error) error = std::current_exception();
      }
      current->state = State::Done;
      leave();
    }
  }

  int warps() const { return (int)((fibers.size() + kWarpSize - 1) / kWarpSize); }
  Slot* slot(int warp, int phase, int lane) { return &slots[((size_t)warp * 2 + phase) * kWarpSize + lane]; }

  std::string where() const {
    char buf[96];
    std::snprintf(buf, sizeof buf, "block (%u,%u,%u)", block_idx.x, block_idx.y, block_idx.z);
    return buf;
  }

  [[noreturn]] void fail(const std::string& msg) {
    broken = true;
    throw Error("simulator: " + msg + " in " + where());
  }

  void run_block(uint3 bidx, unsigned long long linear_block) {
    block_idx = bidx;
    const int n = (int)fibers.size();
    for (Fiber& f : fibers) {
      f.state = State::Runnable;
      f.warp_phase = 0;
      f.open_group.clear();
      f.in_flight.clear();
    }
    if (smem_bytes) std::memset(smem, 0xff, smem_bytes);  // poison: shared memory starts undefined on a GPU
    const bool shuffle = options().seed >= 0;
    if (shuffle) rng.seed((unsigned long long)options().seed * 0x9E3779B97F4A7C15ull + linear_block);
    order.resize(n);
    for (int i = 0; i < n; ++i) order[i] = i;
    for (;;) {
      if (shuffle) std::shuffle(order.begin(), order.end(), rng);
      for (int i : order) {
        Fiber& f = fibers[i];
        if (f.state != State::Runnable) continue;
        enter(&f);
        if (error) {
          broken = true;
          std::exception_ptr e = error;
          error = nullptr;
          std::rethrow_exception(e);
        }
      }
      int done = 0, at_block = 0;
      for (const Fiber& f : fibers) {
        done += f.state == State::Done;
        at_block += f.state == State::AtBlockBarrier;
      }
      if (done == n) return;
      if (release_warps()) continue;
      if (at_block + done == n) {
        if (done) {
          fail("deadlock: __syncthreads() reached by " + std::to_string(at_block) + " of " + std::to_string(n) +
               " threads; the others returned before it (e.g. thread " + std::to_string(first(State::Done)) +
               ")");
        }
        for (Fiber& f : fibers) f.state = State::Runnable;
        continue;
      }
      fail("deadlock: thread " + std::to_string(first(State::AtBlockBarrier)) +
           " waits at __syncthreads() while thread " + std::to_string(first(State::AtWarpBarrier)) +
           " waits at a warp-level operation its warp never completes");
    }
  }

  int first(State s) const {
    for (const Fiber& f : fibers)
      if (f.state == s) return f.linear;
    return -1;
  }

  // Releases every warp whose live lanes all wait at a warp-level operation.
  bool release_warps() {
    bool released = false;
    const int n = (int)fibers.size();
    for (int w = 0; w < warps(); ++w) {
      int lo = w * kWarpSize, hi = std::min(n, lo + kWarpSize);
      int waiting = 0, done = 0;
      for (int i = lo; i < hi; ++i) {
        waiting += fibers[i].state == State::AtWarpBarrier;
        done += fibers[i].state == State::Done;
      }
      if (!waiting || waiting + done != hi - lo) continue;
      if (done) {
        int lane = -1;
        for (int i = lo; i < hi && lane < 0; ++i)
          if (fibers[i].state == State::Done) lane = i - lo;
        fail("deadlock: a warp-level operation in warp " + std::to_string(w) + " reached by " +
             std::to_string(waiting) + " of " + std::to_string(hi - lo) + " lanes; lane " + std::to_string(lane) +
             " returned before it");
      }
      for (int i = lo; i < hi; ++i) fibers[i].state = State::Runnable;
      released = true;
    }
    return released;
  }
};

[[noreturn]] inline void fiber_entry() {
  Worker* w = tl_worker;
  Fiber* f = w->starting;
#ifdef LORA_SIM_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &w->sched_bottom, &w->sched_size);
#endif
  if (_setjmp(f->ctx) == 0) {
#ifdef LORA_SIM_ASAN
    __sanitizer_start_switch_fiber(&f->fake_stack, w->sched_bottom, w->sched_size);
#endif
    _longjmp(w->sched_ctx, 1);
  }
#ifdef LORA_SIM_ASAN
  __sanitizer_finish_switch_fiber(f->fake_stack, nullptr, nullptr);
#endif
  tl_worker->fiber_loop();
}

inline Worker& worker() {
  static thread_local Worker w;
  tl_worker = &w;
  return w;
}

inline Worker& active() {
  Worker* w = tl_worker;
  if (!w || !w->current) throw Error("simulator: device code called outside a simulated launch");
  return *w;
}

inline std::string dims(dim3 d) {
  return std::to_string(d.x) + "x" + std::to_string(d.y) + "x" + std::to_string(d.z);
}

// The launch configurations CUDA accepts (compute capability 8.0 and later): every dimension at least 1;
// a block of at most 1024 threads, 1024 in x and y and 64 in z; a grid of at most 2^31 - 1 in x and 65535
// in y and z. Anything else fails the launch with cudaErrorInvalidConfiguration, so it throws here: a
// launcher must not launch an empty grid for an empty output, or one too large in y or z.
inline void check_config(dim3 grid, dim3 block) {
  const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    throw Error("simulator: invalid block size " + dims(block) + " (CUDA: invalid configuration argument)");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    throw Error("simulator: invalid grid size " + dims(grid) + " (CUDA: invalid configuration argument)");
}

inline void run_grid(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body,
                     size_t max_shared = kMaxDynamicShared) {
  check_config(grid, block);
  const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
  if (smem_bytes > max_shared)
    throw Error("simulator: " + std::to_string(smem_bytes) + " bytes of dynamic shared memory exceed the " +
                std::string(max_shared == kMaxDynamicShared ? "default " : "opt-in ") + std::to_string(max_shared) +
                "-byte limit");
  const unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
  int nworkers = options().workers > 0 ? options().workers : (int)std::max(1u, std::thread::hardware_concurrency());
  nworkers = (int)std::min<unsigned long long>(nworkers, blocks);

  std::atomic<unsigned long long> next{0};
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::exception_ptr first_error;

  auto work = [&] {
    try {
      Worker& w = worker();
      w.prepare_fibers((int)threads);
      for (int i = 0; i < (int)threads; ++i) {
        Fiber& f = w.fibers[i];
        f.linear = i;
        f.tid = make_uint3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
      }
      w.block_dim = block;
      w.grid_dim = grid;
      w.body = &body;
      w.slots.assign((size_t)w.warps() * 2 * kWarpSize, Slot{});
      if (w.smem_bytes < smem_bytes || !w.smem) {
        std::free(w.smem);
        w.smem = static_cast<unsigned char*>(std::aligned_alloc(128, (smem_bytes + 127) / 128 * 128 + 128));
      }
      w.smem_bytes = smem_bytes;
      for (;;) {
        if (stop.load()) break;
        unsigned long long b = next.fetch_add(1);
        if (b >= blocks) break;
        uint3 bidx = make_uint3(b % grid.x, (b / grid.x) % grid.y, b / ((unsigned long long)grid.x * grid.y));
        w.run_block(bidx, b);
      }
      w.current = nullptr;
    } catch (...) {
      stop.store(true);
      if (tl_worker) tl_worker->current = nullptr;
      std::lock_guard<std::mutex> lock(mu);
      if (!first_error) first_error = std::current_exception();
    }
  };
  std::vector<std::thread> extra;
  for (int i = 1; i < nworkers; ++i) extra.emplace_back(work);
  work();
  for (auto& t : extra) t.join();
  if (first_error) std::rethrow_exception(first_error);
}

}  // namespace detail

// ---- device-side API ----------------------------------------------------------------------------------

inline const uint3& thread_idx() { return detail::active().current->tid; }
inline const uint3& block_idx() { return detail::active().block_idx; }
inline const dim3& block_dim() { return detail::active().block_dim; }
inline const dim3& grid_dim() { return detail::active().grid_dim; }

inline void syncthreads() {
  detail::Worker& w = detail::active();
  w.current->state = detail::State::AtBlockBarrier;
  w.leave();
}

inline void* dynamic_shared() { return detail::active().smem; }

inline int lane_id() { return detail::active().current->linear % kWarpSize; }

// Waits for every lane of the calling warp.
inline void warp_barrier() {
  detail::Worker& w = detail::active();
  w.current->state = detail::State::AtWarpBarrier;
  w.leave();
}

// Publishes this lane's value and returns the warp's slots after every lane has published. Slots are
// double-buffered, so a lane that runs ahead to the next exchange cannot overwrite what a slower lane
// still has to read.
template <typename V>
inline const detail::Slot* warp_exchange(const V& mine) {
  static_assert(sizeof(V) <= sizeof(detail::Slot), "warp exchange operand too large");
  static_assert(std::is_trivially_copyable<V>::value, "warp exchange operand must be trivially copyable");
  detail::Worker& w = detail::active();
  detail::Fiber* f = w.current;
  const int warp = f->linear / kWarpSize, lane = f->linear % kWarpSize, phase = f->warp_phase;
  std::memcpy(w.slot(warp, phase, lane)->bytes, &mine, sizeof(V));
  f->warp_phase ^= 1;
  warp_barrier();
  return w.slot(warp, phase, 0);
}

inline int warp_lanes() {
  detail::Worker& w = detail::active();
  const int n = (int)w.fibers.size(), lo = w.current->linear / kWarpSize * kWarpSize;
  return std::min(kWarpSize, n - lo);
}

template <typename V>
inline V slot_value(const detail::Slot* s, int lane) {
  V v;
  std::memcpy(&v, s[lane].bytes, sizeof(V));
  return v;
}

template <typename V>
inline V shfl(V v, int src, int width) {
  const detail::Slot* s = warp_exchange(v);
  const int lane = lane_id();
  const int base = lane / width * width;
  int from = base + ((src % width) + width) % width;
  if (from >= warp_lanes()) from = lane;
  return slot_value<V>(s, from);
}

template <typename V>
inline V shfl_xor(V v, int mask, int width) {
  const detail::Slot* s = warp_exchange(v);
  const int lane = lane_id();
  int from = lane ^ mask;
  if (from / width != lane / width || from >= warp_lanes()) from = lane;
  return slot_value<V>(s, from);
}

template <typename V>
inline V shfl_down(V v, unsigned delta, int width) {
  const detail::Slot* s = warp_exchange(v);
  const int lane = lane_id();
  int from = lane + (int)delta;
  if (from / width != lane / width || from >= warp_lanes()) from = lane;
  return slot_value<V>(s, from);
}

template <typename V>
inline V shfl_up(V v, unsigned delta, int width) {
  const detail::Slot* s = warp_exchange(v);
  const int lane = lane_id();
  int from = lane - (int)delta;
  if (from < 0 || from / width != lane / width) from = lane;
  return slot_value<V>(s, from);
}

inline unsigned ballot(bool pred) {
  const detail::Slot* s = warp_exchange(pred);
  unsigned m = 0;
  for (int l = 0; l < warp_lanes(); ++l) m |= (unsigned)slot_value<bool>(s, l) << l;
  return m;
}

// A failed LORA_KERNEL_ASSERT (kernels/common.cuh): where a GPU stops the kernel with a device-side assert,
// the launch throws, saying the condition and what the kernel adds (values, bounds).
template <class... Parts>
[[noreturn]] void device_assert_failed(const char* cond, const Parts&... parts) {
  std::ostringstream msg;
  msg << "device-side assertion `" << cond << "` failed";
  if constexpr (sizeof...(Parts) > 0) {
    msg << ": ";
    (msg << ... << parts);
  }
  throw Error(msg.str());
}

// Checked 16-byte accesses: a misaligned one faults on a GPU, so it throws here.
inline void check_aligned16(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16)
    throw Error("simulator: misaligned 16-byte access at " + std::to_string(reinterpret_cast<uintptr_t>(p)));
}

// cp.async (kernels/common.cuh): the destination is poisoned when the copy starts and written at the wait that
// completes its group, so a thread reading it early, or another thread reading it without a barrier after that
// wait, sees the poison. The source is read at the wait: no kernel may write it in between.
inline void async_copy16(void* dst, const void* src, int bytes) {
  check_aligned16(dst);
  check_aligned16(src);
  if (bytes < 0 || bytes > 16) throw Error("simulator: cp.async of " + std::to_string(bytes) + " bytes (0..16)");
  std::memset(dst, 0xff, 16);
  detail::active().current->open_group.push_back({dst, src, bytes});
}

inline void async_commit() {
  detail::Fiber& f = *detail::active().current;
  f.in_flight.push_back(std::move(f.open_group));
  f.open_group.clear();
}

inline void async_wait(int pending) {
  detail::Fiber& f = *detail::active().current;
  while ((int)f.in_flight.size() > pending) {
    for (const auto& c : f.in_flight.front()) {
      std::memset(c.dst, 0, 16);
      std::memcpy(c.dst, c.src, (size_t)c.bytes);
    }
    f.in_flight.erase(f.in_flight.begin());
  }
}

namespace detail {
template <class... P, class... A>
void launch_within(size_t max_shared, dim3 grid, dim3 block, size_t smem_bytes, void (*kernel)(P...), A&&... args) {
  // Arguments are converted to the parameter types once, as a launch copies them into parameter space.
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  std::function<void()> body = [&] { std::apply(kernel, params); };
  run_grid(grid, block, smem_bytes, body, max_shared);
}
}  // namespace detail

template <class... P, class... A>
void launch(dim3 grid, dim3 block, size_t smem_bytes, void (*kernel)(P...), A&&... args) {
  detail::launch_within(kMaxDynamicShared, grid, block, smem_bytes, kernel, std::forward<A>(args)...);
}

// A launch of a kernel that opted into more than 48 KB of dynamic shared memory (cudaFuncSetAttribute).
template <class... P, class... A>
void launch_opted_in(dim3 grid, dim3 block, size_t smem_bytes, void (*kernel)(P...), A&&... args) {
  detail::launch_within(kMaxOptInShared, grid, block, smem_bytes, kernel, std::forward<A>(args)...);
}

}  // namespace sim

// ---- WMMA subset ----------------------------------------------------------------------------------------
// Fragments use a layout of the simulator's own: element e of the row-major 16x16 tile lives in lane
// e % 32, slot e / 32. Kernels must only move fragments through load/store/fill/mma, as on hardware.
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "simulator implements the m16n16k16 shape only");
  static constexpr int num_elements = 8;
  T x[num_elements];
};

namespace detail {
template <typename Layout>
constexpr bool is_row_major() {
  return std::is_same<Layout, row_major>::value;
}

inline void check_pointer(const void* p, unsigned ldm, size_t elem) {
  if (reinterpret_cast<uintptr_t>(p) % 32)
    throw sim::Error("simulator: WMMA pointer must be 256-bit aligned");
  if ((ldm * elem) % 16)
    throw sim::Error("simulator: WMMA ldm must be a multiple of 16 bytes");
}
}  // namespace detail

template <typename Use, typename T, typename Layout, typename U>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const U& v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = T(v);
}

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads take a layout_t");
  detail::check_pointer(p, ldm, sizeof(T));
  sim::warp_barrier();
  const int lane = sim::lane_id();
  for (int i = 0; i < f.num_elements; ++i) {
    int e = lane + 32 * i, row = e / 16, col = e % 16;
    f.x[i] = detail::is_row_major<Layout>() ? p[(size_t)row * ldm + col] : p[(size_t)col * ldm + row];
  }
}

template <typename T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const T* p, unsigned ldm, layout_t l) {
  detail::check_pointer(p, ldm, sizeof(T));
  sim::warp_barrier();
  const int lane = sim::lane_id();
  for (int i = 0; i < f.num_elements; ++i) {
    int e = lane + 32 * i, row = e / 16, col = e % 16;
    f.x[i] = l == mem_row_major ? p[(size_t)row * ldm + col] : p[(size_t)col * ldm + row];
  }
}

template <typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm, layout_t l) {
  detail::check_pointer(p, ldm, sizeof(T));
  sim::warp_barrier();
  const int lane = sim::lane_id();
  for (int i = 0; i < f.num_elements; ++i) {
    int e = lane + 32 * i, row = e / 16, col = e % 16;
    (l == mem_row_major ? p[(size_t)row * ldm + col] : p[(size_t)col * ldm + row]) = f.x[i];
  }
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  struct Operands {
    T a[8];
    T b[8];
  };
  static_assert(sizeof(Operands) <= sizeof(sim::detail::Slot), "operand fragments too large");
  Operands mine;
  for (int i = 0; i < 8; ++i) {
    mine.a[i] = a.x[i];
    mine.b[i] = b.x[i];
  }
  const sim::detail::Slot* s = sim::warp_exchange(mine);
  auto a_at = [&](int row, int col) {
    int e = row * 16 + col;
    return (float)sim::slot_value<Operands>(s, e % 32).a[e / 32];
  };
  auto b_at = [&](int row, int col) {
    int e = row * 16 + col;
    return (float)sim::slot_value<Operands>(s, e % 32).b[e / 32];
  };
  const int lane = sim::lane_id();
  float out[8];
  for (int i = 0; i < 8; ++i) {
    int e = lane + 32 * i, row = e / 16, col = e % 16;
    float acc = c.x[i];
    for (int k = 0; k < 16; ++k) acc = std::fma(a_at(row, k), b_at(k, col), acc);
    out[i] = acc;
  }
  for (int i = 0; i < 8; ++i) d.x[i] = out[i];
}

}  // namespace wmma
}  // namespace nvcuda

// ---- the CUDA dialect on the host ------------------------------------------------------------------------
// cuda_fp16.h/cuda_bf16.h define these as attributes or as nothing on the host; __shared__ as nothing would
// give every thread its own array. One block runs at a time on each worker thread, so thread_local is one
// copy per block.
#undef __shared__
#define __shared__ static thread_local
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __launch_bounds__
#define __launch_bounds__(...)

#define threadIdx (::sim::thread_idx())
#define blockIdx (::sim::block_idx())
#define blockDim (::sim::block_dim())
#define gridDim (::sim::grid_dim())
#define warpSize (::sim::kWarpSize)

#define __syncthreads() ::sim::syncthreads()
#define __syncwarp(...) ::sim::warp_barrier()
#define __shfl_sync(mask, v, src, ...) ::sim::shfl((v), (src), ::sim::detail_width(__VA_ARGS__ + 0))
#define __shfl_xor_sync(mask, v, m, ...) ::sim::shfl_xor((v), (m), ::sim::detail_width(__VA_ARGS__ + 0))
#define __shfl_down_sync(mask, v, d, ...) ::sim::shfl_down((v), (d), ::sim::detail_width(__VA_ARGS__ + 0))
#define __shfl_up_sync(mask, v, d, ...) ::sim::shfl_up((v), (d), ::sim::detail_width(__VA_ARGS__ + 0))
#define __ballot_sync(mask, pred) ::sim::ballot(pred)

// The read-only data cache load: a plain load here.
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// Atomic add on device memory (the lossless kernels' exception counter): workers run blocks on several OS
// threads, so it is a real atomic here too. Returns the old value.
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

namespace sim {
// The optional width argument of the shuffles: absent means the whole warp.
inline int detail_width(int w) { return w > 0 ? w : kWarpSize; }
}  // namespace sim
