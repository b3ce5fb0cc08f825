// Tests of the SIMT simulator itself (barriers, shared memory, shuffles, deadlock detection, shuffled
// order, WMMA subset, launch configurations, device-side asserts, __ldg), plus the merge kernels on a few
// shapes so the ASan/UBSan build covers their memory accesses. Plain C++; exits non-zero on failure.
#include "sim/simt.h"

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "kernels/forward.cuh"
#include "kernels/merge.cuh"

namespace {

int failures = 0;

#define CHECK(cond, ...)                                              \
  do {                                                                \
    if (!(cond)) {                                                    \
      ++failures;                                                     \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);     \
      std::printf(__VA_ARGS__);                                       \
      std::printf("\n");                                              \
    }                                                                 \
  } while (0)

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const sim::Error& e) {
    return e.what();
  }
  return "";
}

// ---- kernels under test ----

__global__ void rotate_kernel(int* out) {
  __shared__ int s[1024];
  const int n = blockDim.x * blockDim.y;
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  s[t] = t + 1000 * (int)blockIdx.x;
  __syncthreads();
  out[blockIdx.x * n + t] = s[(t + 1) % n];
}

__global__ void block_sum_kernel(const int* in, int* out) {
  __shared__ int total;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  for (unsigned i = 0; i < blockDim.x; ++i) {
    if (threadIdx.x == i) total += in[blockIdx.x * blockDim.x + i];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = total;
}

__global__ void shuffle_kernel(int* out) {
  const int t = threadIdx.x, lane = t % 32;
  int v = t;
  for (int m = 16; m; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
  out[t * 6 + 0] = v;                                            // warp sum
  out[t * 6 + 1] = __shfl_sync(0xffffffffu, t * 10, 3);           // broadcast of lane 3
  out[t * 6 + 2] = __shfl_down_sync(0xffffffffu, t, 1);           // next lane (or own)
  out[t * 6 + 3] = __shfl_up_sync(0xffffffffu, t, 2);             // lane - 2 (or own)
  out[t * 6 + 4] = __shfl_sync(0xffffffffu, t, 0, 16);            // first lane of each half-warp
  out[t * 6 + 5] = (int)__ballot_sync(0xffffffffu, lane % 3 == 0);
}

__global__ void early_return_kernel(int* out) {
  if (threadIdx.x >= 40) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void warp_early_return_kernel(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, (int)threadIdx.x, 0);
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 32) {
    out[threadIdx.x] = __shfl_sync(0xffffffffu, (int)threadIdx.x, 0);
  } else {
    __syncthreads();
  }
  __syncthreads();
}

// A write-after-read race: each thread reads its right neighbour's slot, then overwrites its own, with no
// barrier between. In thread order every read comes before the neighbour's write, so the race is hidden.
__global__ void war_race_kernel(int* out) {
  __shared__ int s[256];
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = t;
  __syncthreads();
  const int right = s[(t + 1) % n];
  s[t] = -1;  // missing __syncthreads() before this write
  out[t] = right;
}

__global__ void poison_kernel(unsigned* out) {
  LORA_DYNAMIC_SHARED(unsigned, s);
  out[threadIdx.x] = s[threadIdx.x];
}

__global__ void misaligned_kernel(const float* p, float* out) {
  const float4 v = lora_ext::kernels::load16<float4>(p + 1);
  out[threadIdx.x] = v.x;
}

__global__ void noop_kernel(int* out) {
  if (out) out[0] = 1;
}

// Each thread checks its value, as LORA_KERNEL_ASSERT checks an embedding id.
__global__ void assert_kernel(const long long* v, long long bound, int* out) {
  const int t = threadIdx.x;
  LORA_KERNEL_ASSERT(0 <= v[t] && v[t] < bound, "v[", t, "] = ", v[t], ", bound ", bound);
  out[t] = 1;
}

// A value read at run time through the read-only path.
__global__ void ldg_kernel(const float* p, float* out) {
  out[threadIdx.x] = lora_ext::kernels::load_or(p, -1.f) * (float)threadIdx.x;
}

template <typename T>
__global__ void wmma_kernel(const T* a, const T* b, float* c) {
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) T sa[16 * 16];
  __shared__ __align__(32) T sb[16 * 16];
  __shared__ __align__(32) float sc[16 * 24];
  for (int i = threadIdx.x; i < 256; i += 32) {
    sa[i] = a[i];
    sb[i] = b[i];
  }
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 1.0f);
  wmma::load_matrix_sync(fa, sa, 16);
  wmma::load_matrix_sync(fb, sb, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(sc, fc, 24, wmma::mem_row_major);
  __syncthreads();
  for (int i = threadIdx.x; i < 256; i += 32) c[i] = sc[(i / 16) * 24 + i % 16];
}

__global__ void wmma_divergent_kernel(const __half* a) {
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> fa;
  if (threadIdx.x < 16) nvcuda::wmma::load_matrix_sync(fa, a, 16);
}

// ---- tests ----

void test_barrier_and_shared() {
  std::vector<int> out(3 * 96);
  sim::launch(dim3(3), dim3(32, 3), 0, rotate_kernel, out.data());
  bool ok = true;
  for (int b = 0; b < 3; ++b)
    for (int t = 0; t < 96; ++t) ok &= out[b * 96 + t] == (t + 1) % 96 + 1000 * b;
  CHECK(ok, "barrier/shared rotation wrong");

  std::vector<int> in(5 * 64), sums(5);
  for (size_t i = 0; i < in.size(); ++i) in[i] = (int)(i * 7 % 13);
  sim::launch(dim3(5), dim3(64), 0, block_sum_kernel, in.data(), sums.data());
  for (int b = 0; b < 5; ++b) {
    int want = 0;
    for (int i = 0; i < 64; ++i) want += in[b * 64 + i];
    CHECK(sums[b] == want, "block %d: sum %d, want %d (one shared copy per block)", b, sums[b], want);
  }
}

void test_shuffles() {
  const int n = 48;  // a full warp and a partial one
  std::vector<int> out(n * 6);
  sim::launch(dim3(1), dim3(n), 0, shuffle_kernel, out.data());
  for (int t = 0; t < n; ++t) {
    const int lane = t % 32, base = t - lane, lanes = std::min(32, n - base);
    int sum = 0;
    for (int l = 0; l < lanes; ++l) sum += base + l;
    // xor partners past the partial warp's end read their own value, as the simulator documents
    if (lanes == 32) CHECK(out[t * 6] == sum, "xor reduction t=%d: %d want %d", t, out[t * 6], sum);
    CHECK(out[t * 6 + 1] == (base + 3) * 10, "broadcast t=%d", t);
    CHECK(out[t * 6 + 2] == (lane + 1 < lanes ? t + 1 : t), "shfl_down t=%d", t);
    CHECK(out[t * 6 + 3] == (lane >= 2 ? t - 2 : t), "shfl_up t=%d", t);
    CHECK(out[t * 6 + 4] == base + lane / 16 * 16, "width-16 shfl t=%d", t);
    unsigned want = 0;
    for (int l = 0; l < lanes; ++l) want |= (unsigned)(l % 3 == 0) << l;
    CHECK((unsigned)out[t * 6 + 5] == want, "ballot t=%d", t);
  }
}

void test_deadlocks() {
  std::vector<int> out(64);
  std::string e = error_of([&] { sim::launch(dim3(2), dim3(64), 0, early_return_kernel, out.data()); });
  CHECK(e.find("deadlock") != std::string::npos && e.find("40 of 64") != std::string::npos, "got '%s'", e.c_str());
  e = error_of([&] { sim::launch(dim3(1), dim3(32), 0, warp_early_return_kernel, out.data()); });
  CHECK(e.find("deadlock") != std::string::npos && e.find("lane 5") != std::string::npos, "got '%s'", e.c_str());
  e = error_of([&] { sim::launch(dim3(1), dim3(64), 0, divergent_barrier_kernel, out.data()); });
  CHECK(e.find("deadlock") != std::string::npos, "got '%s'", e.c_str());
  alignas(32) static __half a[256];
  e = error_of([&] { sim::launch(dim3(1), dim3(32), 0, wmma_divergent_kernel, a); });
  CHECK(e.find("deadlock") != std::string::npos, "got '%s'", e.c_str());
  // The simulator recovers: the next launch runs normally.
  test_barrier_and_shared();
}

void test_shuffled_order() {
  const int n = 256;
  auto run = [&](long long seed) {
    sim::options().seed = seed;
    std::vector<int> out(n);
    sim::launch(dim3(1), dim3(n), 0, war_race_kernel, out.data());
    sim::options().seed = -1;
    return out;
  };
  std::vector<int> fixed = run(-1);
  bool hidden = true;
  for (int t = 0; t < n - 1; ++t) hidden &= fixed[t] == t + 1;
  CHECK(hidden, "in thread order the race should be hidden");
  std::vector<int> shuffled = run(7);
  int exposed = 0;
  for (int t = 0; t < n - 1; ++t) exposed += shuffled[t] == -1;
  CHECK(exposed > 0, "a shuffled order should expose the write-after-read race");
  CHECK(run(7) == shuffled, "the same seed should give the same order");
  CHECK(run(8) != shuffled, "another seed should give another order");
}

void test_dynamic_shared_poison_and_alignment() {
  std::vector<unsigned> out(64);
  sim::launch(dim3(1), dim3(64), 256, poison_kernel, out.data());
  bool all = true;
  for (unsigned v : out) all &= v == 0xffffffffu;
  CHECK(all, "dynamic shared memory should start poisoned");
  std::string e = error_of([&] { sim::launch(dim3(1), dim3(1), 64 * 1024, poison_kernel, out.data()); });
  CHECK(e.find("limit") != std::string::npos, "got '%s'", e.c_str());

  alignas(16) float buf[16] = {};
  float o[1];
  e = error_of([&] { sim::launch(dim3(1), dim3(1), 0, misaligned_kernel, buf, o); });
  CHECK(e.find("misaligned") != std::string::npos, "got '%s'", e.c_str());
}

void test_launch_config() {
  int out = 0;
  // CUDA's limits: every dimension >= 1; grid x < 2^31, y and z <= 65535; block <= 1024 threads, z <= 64.
  const dim3 bad_grids[] = {dim3(0), dim3(1, 0), dim3(1, 1, 0), dim3(1, 65536), dim3(1, 1, 65536),
                            dim3(0x80000000u)};
  for (const dim3& g : bad_grids) {
    std::string e = error_of([&] { sim::launch(g, dim3(32), 0, noop_kernel, &out); });
    CHECK(e.find("invalid grid size") != std::string::npos && e.find("invalid configuration") != std::string::npos,
          "grid %ux%ux%u: got '%s'", g.x, g.y, g.z, e.c_str());
  }
  const dim3 bad_blocks[] = {dim3(0), dim3(1025), dim3(32, 33), dim3(1, 1, 65), dim3(1, 0)};
  for (const dim3& b : bad_blocks) {
    std::string e = error_of([&] { sim::launch(dim3(1), b, 0, noop_kernel, &out); });
    CHECK(e.find("invalid block size") != std::string::npos, "block %ux%ux%u: got '%s'", b.x, b.y, b.z, e.c_str());
  }
  // The limits themselves are valid (a null output: nothing is written).
  const dim3 good[][2] = {{dim3(1, 65535), dim3(1)}, {dim3(1, 1, 65535), dim3(1)}, {dim3(1), dim3(1024)},
                          {dim3(1), dim3(1, 1024)}, {dim3(1), dim3(16, 1, 64)}};
  for (const auto& gb : good) {
    std::string e = error_of([&] { sim::launch(gb[0], gb[1], 0, noop_kernel, (int*)nullptr); });
    CHECK(e.empty(), "grid %ux%ux%u, block %ux%ux%u: got '%s'", gb[0].x, gb[0].y, gb[0].z, gb[1].x, gb[1].y, gb[1].z,
          e.c_str());
  }
}

void test_kernel_assert() {
  std::vector<long long> v = {0, 3, 9, 2};
  std::vector<int> out(4);
  CHECK(error_of([&] { sim::launch(dim3(1), dim3(4), 0, assert_kernel, v.data(), 10LL, out.data()); }).empty(),
        "values in range should pass");
  CHECK(out == std::vector<int>(4, 1), "every thread should have run");
  v[2] = 10;
  std::string e = error_of([&] { sim::launch(dim3(1), dim3(4), 0, assert_kernel, v.data(), 10LL, out.data()); });
  CHECK(e.find("device-side assertion") != std::string::npos && e.find("v[2] = 10, bound 10") != std::string::npos,
        "got '%s'", e.c_str());
  v[2] = 2;
  v[0] = -1;
  e = error_of([&] { sim::launch(dim3(1), dim3(4), 0, assert_kernel, v.data(), 10LL, out.data()); });
  CHECK(e.find("v[0] = -1") != std::string::npos, "got '%s'", e.c_str());
}

void test_ldg() {
  float scale = 2.5f;
  std::vector<float> out(8);
  sim::launch(dim3(1), dim3(8), 0, ldg_kernel, (const float*)&scale, out.data());
  CHECK(out[3] == 7.5f, "got %g", out[3]);
  sim::launch(dim3(1), dim3(8), 0, ldg_kernel, (const float*)nullptr, out.data());
  CHECK(out[3] == -3.f, "got %g", out[3]);
}

// cp.async: each thread copies 16 bytes (the last thread 6 of them) into its own shared slot, in two groups;
// it records what the slot holds before the first wait, after waiting for the first group, and after all.
__global__ void async_copy_kernel(const float* src, float* seen) {
  LORA_DYNAMIC_SHARED(float, buf);
  const int t = threadIdx.x;
  using lora_ext::kernels::async_commit;
  using lora_ext::kernels::async_copy16;
  using lora_ext::kernels::async_wait;
  async_copy16(buf + 8 * t, src + 8 * t, t == 7 ? 6 : 16);
  async_commit();
  async_copy16(buf + 8 * t + 4, src + 8 * t + 4, 16);
  async_commit();
  seen[12 * t] = buf[8 * t];  // before any wait: poison
  async_wait<1>();
  for (int i = 0; i < 4; ++i) seen[12 * t + 1 + i] = buf[8 * t + i];  // the first group landed
  seen[12 * t + 5] = buf[8 * t + 4];                                  // the second is still in flight
  async_wait<0>();
  for (int i = 0; i < 4; ++i) seen[12 * t + 6 + i] = buf[8 * t + 4 + i];
}

void test_async_copy() {
  std::vector<float> src(64), seen(96, 0.f);
  for (int i = 0; i < 64; ++i) src[i] = (float)i + 0.5f;
  sim::launch(dim3(1), dim3(8), 8 * 8 * sizeof(float), async_copy_kernel, (const float*)src.data(), seen.data());
  for (int t = 0; t < 8; ++t) {
    CHECK(std::isnan(seen[12 * t]), "thread %d read its slot before the wait and saw %g, not the poison", t,
          seen[12 * t]);
    CHECK(seen[12 * t + 1] == src[8 * t], "thread %d: first group not landed", t);
    CHECK(std::isnan(seen[12 * t + 5]), "thread %d: the second group landed before its wait", t);
    for (int i = 0; i < 4; ++i)
      CHECK(seen[12 * t + 6 + i] == src[8 * t + 4 + i], "thread %d: second group element %d", t, i);
  }
  // the last thread's first copy read 6 bytes: element 0 and half of element 1; the rest of the 16 reads zero
  CHECK(seen[12 * 7 + 3] == 0.f && seen[12 * 7 + 4] == 0.f, "zero fill past the bytes read");
  CHECK(seen[12 * 6 + 4] == src[8 * 6 + 3], "a full copy");
  // the opt-in launch: past 48 KB only through it, and 99 KB at most
  bool refused = false;
  try {
    sim::launch(dim3(1), dim3(8), 64 * 1024, async_copy_kernel, (const float*)src.data(), seen.data());
  } catch (const sim::Error&) {
    refused = true;
  }
  CHECK(refused, "64 KB of dynamic shared memory without opting in");
  sim::launch_opted_in(dim3(1), dim3(8), 64 * 1024, async_copy_kernel, (const float*)src.data(), seen.data());
  refused = false;
  try {
    sim::launch_opted_in(dim3(1), dim3(8), 100 * 1024, async_copy_kernel, (const float*)src.data(), seen.data());
  } catch (const sim::Error&) {
    refused = true;
  }
  CHECK(refused, "100 KB of dynamic shared memory, over the opt-in limit");
}

template <typename T>
void test_wmma(float (*to)(T), T (*from)(float)) {
  std::vector<T> a(256), b(256);
  std::vector<float> c(256);
  for (int i = 0; i < 256; ++i) {
    a[i] = from((float)((i * 37) % 11 - 5) / 4);
    b[i] = from((float)((i * 53) % 13 - 6) / 8);
  }
  sim::launch(dim3(1), dim3(32), 0, wmma_kernel<T>, a.data(), b.data(), c.data());
  double worst = 0;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      double want = 1.0;
      for (int k = 0; k < 16; ++k) want += (double)to(a[i * 16 + k]) * to(b[j * 16 + k]);  // b col-major
      worst = std::max(worst, std::fabs(want - c[i * 16 + j]));
    }
  CHECK(worst < 1e-5, "wmma product error %g", worst);
}

float h2f(__half h) { return __half2float(h); }
__half f2h(float f) { return __float2half_rn(f); }
float b2f(__nv_bfloat16 h) { return __bfloat162float(h); }
__nv_bfloat16 f2b(float f) { return __float2bfloat16_rn(f); }

// Merge (r2 == 0) or swap (a second pair of rank r2) through the kernels directly (the Python tests cover
// the full ops); here for ASan/UBSan coverage.
template <typename T, typename Tab, bool kTC, bool kVec>
void merge_case(int nb, int k, int r, bool transposed, int pad, float (*to)(T), T (*from)(float), int r2 = 0) {
  namespace km = lora_ext::kernels::merge;
  const int G = 3, n = 2, ids[2] = {0, 2};
  const int rows = transposed ? k : G * nb, cols = transposed ? G * nb : k, ldw = cols + pad;
  std::vector<T> w((size_t)rows * ldw);
  std::vector<Tab> a((size_t)n * r * k), b((size_t)n * nb * r), a2((size_t)n * r2 * k), b2((size_t)n * nb * r2);
  unsigned s = 12345;
  auto rnd = [&] { s = s * 1103515245u + 12345u; return (float)((s >> 8) % 2001) / 1000.f - 1.f; };
  for (auto& x : w) x = from(rnd());
  for (auto& x : a) x = Tab(rnd());
  for (auto& x : b) x = Tab(rnd());
  for (auto& x : a2) x = Tab(rnd());
  for (auto& x : b2) x = Tab(rnd());
  std::vector<T> w0 = w;
  km::Args<T, Tab> p;
  p.w = w.data();
  p.ldw = ldw;
  p.a = a.data();
  p.b = b.data();
  p.nb = nb;
  p.k = k;
  p.r = r;
  p.scale = r2 ? -0.75f : 0.5f;  // a swap adds scale * (mult * B @ A + B2 @ A2)
  p.a2 = a2.data();
  p.b2 = b2.data();
  p.r2 = r2;
  p.mult = 0.5f / -0.75f;
  p.transposed = transposed;
  p.map.count = n;
  for (int e = 0; e < G; ++e) p.map.slot[e] = -1;
  for (int j = 0; j < n; ++j) {
    p.map.id[j] = (short)ids[j];
    p.map.slot[ids[j]] = (short)j;
  }
  // persistent blocks (16-byte accesses): two, so that each walks several tiles; otherwise one per tile
  const dim3 grid((unsigned)(kVec ? std::min<long long>(2, km::tile_count(p)) : km::tile_count(p)));
  constexpr size_t smem = km::launch_smem_bytes<T, Tab, kTC, kVec, false>();
  if (r2)
    sim::launch_opted_in(grid, dim3(km::kThreads), smem, km::swap_kernel<T, Tab, kTC, kVec>, p);
  else
    sim::launch_opted_in(grid, dim3(km::kThreads), smem, km::merge_kernel<T, Tab, kTC, kVec>, p);
  double err = 0, ref = 0;
  bool untouched = true;
  for (int i = 0; i < rows; ++i)
    for (int c = 0; c < ldw; ++c) {
      const size_t at = (size_t)i * ldw + c;
      const int blk = transposed ? c / nb : i / nb;
      const int j = blk == 0 ? 0 : blk == 2 ? 1 : -1;
      if (c >= cols || j < 0) {
        untouched &= std::memcmp(&w[at], &w0[at], sizeof(T)) == 0;
        continue;
      }
      const int row = transposed ? c % nb : i % nb, col = transposed ? i : c;
      double d = 0;
      for (int q = 0; q < r; ++q)
        d += (double)(float)b[((size_t)j * nb + row) * r + q] * (double)(float)a[((size_t)j * r + q) * k + col];
      double d2 = 0;
      for (int q = 0; q < r2; ++q)
        d2 += (double)(float)b2[((size_t)j * nb + row) * r2 + q] * (double)(float)a2[((size_t)j * r2 + q) * k + col];
      const double want = to(w0[at]) + 0.5 * d - 0.75 * d2;
      err += (want - to(w[at])) * (want - to(w[at]));
      ref += want * want;
    }
  const double rel = std::sqrt(err / ref);
  CHECK(untouched, "merge wrote outside its blocks (nb=%d k=%d r=%d r2=%d T=%d)", nb, k, r, r2, (int)transposed);
  CHECK(rel < (sizeof(T) == 4 ? 1e-5 : 1e-2), "merge rel error %g (nb=%d k=%d r=%d r2=%d T=%d)", rel, nb, k, r, r2,
        (int)transposed);
}

void test_merge_kernels() {
  float (*fid)(float) = [](float x) { return x; };
  merge_case<float, float, false, true>(37, 53, 8, false, 3, fid, fid);
  merge_case<float, float, false, false>(37, 53, 33, true, 1, fid, fid);
  merge_case<__half, __half, true, true>(70, 140, 40, false, 4, h2f, f2h);
  merge_case<__nv_bfloat16, __nv_bfloat16, true, false>(20, 67, 33, true, 1, b2f, f2b);
  merge_case<__nv_bfloat16, float, false, true>(9, 130, 1, false, 6, b2f, f2b);
  // float32 factors on tensor cores, as bf16 hi/lo pairs
  merge_case<__half, float, true, true>(70, 140, 40, false, 4, h2f, f2h);
  merge_case<__nv_bfloat16, float, true, false>(20, 67, 33, true, 1, b2f, f2b);
  // swaps: the pair boundary inside a staged chunk (20 + 25) and on one (32 + 7)
  merge_case<float, float, false, true>(37, 53, 20, false, 3, fid, fid, 25);
  merge_case<__half, __half, false, false>(70, 140, 32, true, 1, h2f, f2h, 7);
  merge_case<__nv_bfloat16, __nv_bfloat16, true, true>(70, 140, 16, false, 4, b2f, f2b, 16);
  merge_case<__half, __half, true, false>(20, 67, 40, true, 1, h2f, f2h, 33);
  merge_case<__nv_bfloat16, float, false, true>(9, 130, 3, false, 6, b2f, f2b, 2);
  merge_case<__half, float, true, true>(70, 140, 20, false, 4, h2f, f2h, 25);
}

// Shared-memory bank conflicts of the staging walks (the simulator does not model banks, so their index maps are
// checked here): for each warp, 32 consecutive idx, the most distinct 32-bit words that one bank receives (1: no
// conflict). `at(idx)`: the element offset idx is stored at; `elem`: bytes per element.
template <typename At>
int worst_ways(int count, int elem, At at) {
  int worst = 0;
  for (int base = 0; base < count; base += 32) {
    std::vector<std::vector<long long>> words(32);
    for (int lane = 0; lane < 32; ++lane) {
      const long long word = (long long)at(base + lane) * elem / 4;
      auto& w = words[word % 32];
      if (std::find(w.begin(), w.end(), word) == w.end()) w.push_back(word);
    }
    for (const auto& w : words) worst = std::max(worst, (int)w.size());
  }
  return worst;
}

template <int kRun, int kAcross>
bool covers_once() {
  using B = lora_ext::kernels::Block8x4<kRun, kAcross>;
  std::vector<int> seen(kRun * kAcross, 0);
  for (int idx = 0; idx < kRun * kAcross; ++idx) {
    const int a = B::along(idx), c = B::across(idx);
    if (a < 0 || a >= kRun || c < 0 || c >= kAcross) return false;
    ++seen[c * kRun + a];
  }
  return std::all_of(seen.begin(), seen.end(), [](int n) { return n == 1; });
}

void test_staging_banks() {
  namespace km = lora_ext::kernels::merge;
  namespace lk = lora_ext::kernels;
  constexpr int M = km::kTileM, N = km::kTileN, C = km::kChunk;
  using LB = lk::Block8x4<M, C>;
  using RB = lk::Block8x4<C, N>;
  CHECK((covers_once<M, C>() && covers_once<C, N>()), "Block8x4 must visit every element once");
  // merge stage(): rows along the source (not transposed): a warp writes one shared row
  CHECK(worst_ways(M * C, 4, [](int i) { return i / C * km::kLdLf + i % C; }) == 1, "fp32 L, rank-fast");
  CHECK(worst_ways(M * C, 2, [](int i) { return i / C * km::kLdLh + i % C; }) == 1, "16-bit L, rank-fast");
  CHECK(worst_ways(C * N, 4, [](int i) { return i / N * km::kLdRf + i % N; }) == 1, "fp32 R, column-fast");
  CHECK(worst_ways(C * N, 2, [](int i) { return i / N * km::kLdRh + i % N; }) == 1, "16-bit R, column-fast");
  // transposed sources: fp32 L walks its run (odd rows), the others take 8 x 4 blocks
  CHECK(worst_ways(M * C, 4, [](int i) { return i % M * km::kLdLf + i / M; }) == 1, "fp32 L, transposed");
  CHECK(worst_ways(M * C, 2, [](int i) { return LB::along(i) * km::kLdLh + LB::across(i); }) == 1,
        "16-bit L, transposed");
  CHECK(worst_ways(C * N, 4, [](int i) { return RB::along(i) * km::kLdRf + RB::across(i); }) == 1,
        "fp32 R, transposed");
  CHECK(worst_ways(C * N, 2, [](int i) { return RB::along(i) * km::kLdRh + RB::across(i); }) == 1,
        "16-bit R, transposed");
  // what a warp walking one run down a column did before: 4-way (the checks above can fail)
  const int old_ways = worst_ways(C * N, 4, [](int i) { return i % C * km::kLdRf + i / C; });
  CHECK(old_ways == 4, "a 32-rank run down one column: %d-way, expected 4", old_ways);
}

// The forward expand's staging of B_j into bs[rank][column] (kernels/forward.cuh, expand_tile): the block walk
// as the kernel runs it (rank fixed per thread, column stepping by kBStep per kThreads elements) must be the
// Block8x4 walk, cover the chunk once and be conflict-free; the column walk it replaced measures 4-way.
template <typename T>
void expand_staging_case(const char* type) {
  namespace kf = lora_ext::kernels::forward;
  constexpr int R = kf::kRChunk, C = kf::tile_cols<T>(), ld = kf::ld_bs<T>();
  using W = lora_ext::kernels::Block8x4<R, C>;
  constexpr int step = W::across(kf::kThreads);
  std::vector<int> walk(R * C), seen(R * C, 0);  // walk[idx]: offset stored by element idx
  bool same = true;
  for (int t = 0; t < kf::kThreads; ++t) {
    const int bi = W::along(t);
    for (int cc = W::across(t), it = 0; cc < C; cc += step, ++it) {
      const int idx = t + it * kf::kThreads;
      same = same && idx < R * C && W::along(idx) == bi && W::across(idx) == cc;
      if (idx < R * C) {
        walk[idx] = bi * ld + cc;
        ++seen[bi * C + cc];
      }
    }
  }
  CHECK(same, "expand B walk (%s): the hoisted walk is not Block8x4's", type);
  CHECK(std::all_of(seen.begin(), seen.end(), [](int n) { return n == 1; }), "expand B walk (%s): coverage", type);
  const int ways = worst_ways(R * C, 4, [&](int i) { return walk[i]; });
  CHECK(ways == 1, "expand B block walk (%s): %d-way", type, ways);
  const int column = worst_ways(R * C, 4, [&](int i) { return i % R * ld + i / R; });
  CHECK(column == 4, "expand B column walk (%s): %d-way, expected 4", type, column);
}

void test_expand_staging_banks() {
  expand_staging_case<__nv_bfloat16>("bf16");
  expand_staging_case<__half>("fp16");
  expand_staging_case<float>("fp32");
}

}  // namespace

int main() {
  try {
    test_barrier_and_shared();
    test_shuffles();
    test_deadlocks();
    test_shuffled_order();
    test_dynamic_shared_poison_and_alignment();
    test_launch_config();
    test_kernel_assert();
    test_ldg();
    test_async_copy();
    test_wmma<__half>(h2f, f2h);
    test_wmma<__nv_bfloat16>(b2f, f2b);
    test_merge_kernels();
    test_staging_banks();
    test_expand_staging_banks();
  } catch (const std::exception& e) {
    std::printf("FAIL: unexpected exception: %s\n", e.what());
    return 1;
  }
  if (failures) {
    std::printf("simt_test: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("simt_test: all passed\n");
  return 0;
}
