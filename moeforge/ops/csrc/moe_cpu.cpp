// The MoE block on CPU: the router's expert selection, the sort of token-expert pairs, and the routed
// experts' forward and backward for fp32 and bf16 tensors.
//
// Experts: the per-expert loop of moeforge/ops/routed.py (_RoutedSwiGLU) with each segment's gather,
// SwiGLU, gate weighting and scatter-add written as one pass over rows that are still in cache (every
// elementwise step in fp32), no Python or dispatcher work between the products (ATen's mm: MKL for fp32,
// oneDNN for bf16 on bucket-padded segments), and the experts run side by side on the threads ("lanes")
// where that fits. Built on first use by moeforge/ops/native.py, which documents shapes and semantics.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <dlfcn.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__x86_64__) && defined(__GLIBC__)
// glibc's vector expf (libmvec): lets the `omp simd` loops below vectorise exp without -ffast-math
extern "C" float expf(float) noexcept __attribute__((simd("notinbranch")));
#endif

namespace {

constexpr int64_t GRAIN = 16;  // rows per parallel task
constexpr int64_t AHEAD = 8;   // rows fetched ahead of use in the row passes below

// Ask the cache for `bytes` bytes at p before they are needed. The row passes touch rows the hardware prefetcher
// does not foresee (tokens' rows in expert order) or foresees too late (the backward's saved gate|up rows, cold by
// then): fetching AHEAD rows ahead took the routed experts' forward + backward 144 -> 140 ms in
// benchmarks/moe_layer.py's setting (gathers, scatter-adds and backward passes ~4 ms less per lane).
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

inline float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

void check(const at::Tensor& t, const char* name, int64_t dim, at::ScalarType dtype = at::kFloat) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous() && t.dim() == dim,
              "moeforge native experts: ", name, " must be a contiguous ", c10::toString(dtype), " CPU tensor of ",
              dim, " dimensions");
}

// Values in the products' dtype T (float or bfloat16) are read as float and written back rounded: every
// elementwise step runs in fp32.
inline float f32(float v) { return v; }
inline float f32(at::BFloat16 v) { return static_cast<float>(v); }
template <typename T>
inline T as(float v) {
  return static_cast<T>(v);
}

// rows[r] = src[idx[r]] for r < n (converted to T), rows n..p-1 zero (the padding rows of a bucketed product)
template <typename S, typename T>
void gather(const S* src, const int64_t* idx, int64_t n, int64_t p, int64_t d, T* rows) {
  at::parallel_for(0, p, GRAIN, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      T* o = rows + r * d;
      if (r + AHEAD < n) prefetch(src + idx[r + AHEAD] * d, d * sizeof(S));
      if (r >= n) {
        std::fill(o, o + d, as<T>(0.f));
      } else if constexpr (std::is_same_v<S, T>) {
        std::memcpy(o, src + idx[r] * d, d * sizeof(T));
      } else {
        const S* in = src + idx[r] * d;
        for (int64_t j = 0; j < d; ++j) o[j] = as<T>(f32(in[j]));
      }
    }
  });
}

// An (N, D) fp32 sum that starts empty: a row's first contribution is copied, later ones added, so nothing is
// zero-filled first (x + 0 == x: the sums are the same as from zeros). touched[t]: row t holds a value.
struct Acc {
  at::Tensor t;
  std::vector<uint8_t> touched;
  Acc(int64_t n, int64_t d, const at::TensorOptions& o) : t(at::empty({n, d}, o)), touched(n, 0) {}
};

// acc[idx[r]] += rows[r] (in fp32); one expert's idx are distinct (a token picks an expert once), so rows split
// freely
template <typename T>
void scatter_add(const T* rows, const int64_t* idx, int64_t n, int64_t d, Acc& acc) {
  float* dst = acc.t.data_ptr<float>();
  uint8_t* touched = acc.touched.data();
  at::parallel_for(0, n, GRAIN, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float* o = dst + idx[r] * d;
      const T* y = rows + r * d;
      if (r + AHEAD < e) prefetch(dst + idx[r + AHEAD] * d, d * sizeof(float));
      if (!touched[idx[r]]) {
        touched[idx[r]] = 1;
        if constexpr (std::is_same_v<T, float>) {
          std::memcpy(o, y, d * sizeof(float));
        } else {
          for (int64_t j = 0; j < d; ++j) o[j] = f32(y[j]);
        }
        continue;
      }
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) o[j] += f32(y[j]);
    }
  });
}

// The Fortran BLAS sgemm that PyTorch's CPU library exports (MKL's, in builds with MKL: x86-64), found at load
// time; null without MKL (then at::mm_out). at::mm_out reaches the same routine through the dispatcher
// after a few tensor views per product (~3,000 ATen calls per forward + backward of benchmarks/moe_layer.py's
// block); calling it directly gives the same numbers (tested bit for bit), the routed experts 1.5 ms sooner.
using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                          const int*, const float*, const int*, const float*, float*, const int*);
// Only MKL's, looked up in PyTorch's own library (another BLAS in the process may export the same name, and not
// every BLAS may be called from several threads at once); MOEFORGE_NATIVE_BLAS=0 takes at::mm_out anyway
// (tests compare the two).
const sgemm_fn blas_sgemm = []() -> sgemm_fn {
  const char* off = std::getenv("MOEFORGE_NATIVE_BLAS");
  if ((off && std::strcmp(off, "0") == 0) || !at::hasMKL()) return nullptr;
  void* torch_cpu = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  return torch_cpu ? reinterpret_cast<sgemm_fn>(dlsym(torch_cpu, "sgemm_")) : nullptr;
}();

// C (m x n, row stride ldc) = op(A) op(B), row-major, A (m x k) and B (k x n) after op; ta / tb: the operand is
// stored transposed (k x m / n x k, row stride lda / ldb).
template <typename T>
void product(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
             T* C, int64_t ldc, const at::TensorOptions& o) {
  if constexpr (std::is_same_v<T, float>) {
    if (blas_sgemm && std::max({m, n, k, lda, ldb, ldc}) < (int64_t{1} << 31)) {
      // column-major BLAS: C^T (n x m) = op(B)^T op(A)^T, and a row-major matrix is its transpose column-major
      const char opb = tb ? 'T' : 'N', opa = ta ? 'T' : 'N';
      const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
      const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
      const float one = 1.f, zero = 0.f;
      blas_sgemm(&opb, &opa, &M, &N, &K, &one, B, &la, A, &lb, &zero, C, &lc);
      return;
    }
  }
  auto view = [&](const T* ptr, int64_t rows, int64_t cols, int64_t ld, bool t) {
    auto v = at::from_blob(const_cast<T*>(ptr), {t ? cols : rows, t ? rows : cols}, {ld, 1}, o);
    return t ? v.t() : v;
  };
  auto c = at::from_blob(C, {m, n}, {ldc, 1}, o);
  at::mm_out(c, view(A, m, k, lda, ta), view(B, k, n, ldb, tb));
}

// One expert's work: its rows, weights and gate weights.
struct Expert {
  const int64_t* idx;   // token of each row
  int64_t n, p;         // rows, and rows as multiplied (n rounded up to the row bucket; the rest zero)
  at::Tensor w1, w2;    // (2I, D) gate|up, (D, I) down, in the products' dtype
  const float* w;       // gate weight of each row
  void* gup;            // (p, 2I) gate|up pre-activations in the products' dtype, written forward, read backward
  at::Tensor gw1, gw2;  // their gradients (backward; undefined: not wanted)
  float* gw;            // gate weights' gradient (backward; null: not wanted)
};

// Work buffers for up to `rows` rows of an expert of width I: products' dtype, fp32 for the kept sigmoid.
struct Buffers {
  at::Tensor x, h, y, aw, sg, gh, grad;
  Buffers(int64_t rows, int64_t D, int64_t I, const at::TensorOptions& o, bool backward) {
    x = at::empty({rows, D}, o), y = at::empty({rows, D}, o);
    if (backward) {
      aw = at::empty({rows, I}, o), sg = at::empty({rows, I}, o.dtype(at::kFloat));
      gh = at::empty({rows, I}, o), grad = at::empty({rows, 2 * I}, o);
    } else {
      h = at::empty({rows, I}, o);
    }
  }
};

// One row of the weighted SwiGLU: out = silu(g) * u * wr, and with KEEP_SG sg = sigmoid(g) (the backward's).
// CLAMP: DeepSeek-V4's swiglu_limit (gate <= limit, -limit <= up <= limit). See swiglu_grad_row for why these
// are functions of their own.
template <bool CLAMP, bool KEEP_SG, typename T>
inline void swiglu_row(const T* __restrict g, const T* __restrict u, float wr, float limit, T* __restrict out,
                       float* __restrict sg, int64_t I) {
#pragma omp simd
  for (int64_t j = 0; j < I; ++j) {
    const float gg = CLAMP ? std::min(f32(g[j]), limit) : f32(g[j]);
    const float uu = CLAMP ? std::min(std::max(f32(u[j]), -limit), limit) : f32(u[j]);
    const float s = sigmoid(gg);
    if (KEEP_SG) sg[j] = s;
    out[j] = as<T>(gg * s * uu * wr);
  }
}

// One row of the SwiGLU backward: dg|du (into out, 2I wide) of the weighted activation's gradient gh, and the
// return value, the gate weight's gradient gh . (silu(g) * u). CLAMP: DeepSeek-V4's swiglu_limit, where the
// clamp passes the gradient only inside the bounds. Its own function with restrict pointers and the clamp
// decided outside the loop: written inline in the caller, GCC vectorised the loop with gathered loads (this pass
// took 2.7 ms per lane in benchmarks/moe_layer.py's setting, 1.05 ms now).
template <bool CLAMP, typename T>
inline float swiglu_grad_row(const T* __restrict g, const T* __restrict u, const T* __restrict gh,
                             const float* __restrict sg, float wr, float limit, T* __restrict out, int64_t I) {
  T* __restrict dg_out = out;
  T* __restrict du_out = out + I;
  float dot = 0.f;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < I; ++j) {
    const float graw = f32(g[j]), uraw = f32(u[j]), ghj = f32(gh[j]), s = sg[j];
    const float gg = CLAMP ? std::min(graw, limit) : graw;
    const float uu = CLAMP ? std::min(std::max(uraw, -limit), limit) : uraw;
    dot += ghj * (gg * s * uu);
    const float d = ghj * wr;
    float dg = d * uu * s * (1.0f + gg * (1.0f - s));
    float du = d * gg * s;
    if (CLAMP) {
      dg = graw <= limit ? dg : 0.0f;
      du = (uraw >= -limit && uraw <= limit) ? du : 0.0f;
    }
    dg_out[j] = as<T>(dg);
    du_out[j] = as<T>(du);
  }
  return dot;
}

// out += w * down(silu(gate) * up) of the expert's rows, summed into their tokens' rows; the gate|up
// pre-activations are kept in ex.gup for the backward pass.
template <typename T>
void forward_expert(const at::Tensor& x, const Expert& ex, float limit, Acc& out, Buffers& buf) {
  const int64_t n = ex.n, p = ex.p, D = x.size(1), I = ex.w1.size(0) / 2;
  const auto o = x.options();
  T* rows = buf.x.data_ptr<T>();
  gather(x.data_ptr<T>(), ex.idx, n, p, D, rows);
  T* gup = static_cast<T*>(ex.gup);
  product(false, true, p, 2 * I, D, rows, D, ex.w1.data_ptr<T>(), D, gup, 2 * I, o);
  T* hp = buf.h.data_ptr<T>();
  at::parallel_for(0, p, GRAIN, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* g = gup + r * 2 * I;
      const T* u = g + I;
      const float wr = r < n ? ex.w[r] : 0.f;
      if (limit > 0) swiglu_row<true, false>(g, u, wr, limit, hp + r * I, nullptr, I);
      else swiglu_row<false, false>(g, u, wr, limit, hp + r * I, nullptr, I);
    }
  });
  T* y = buf.y.data_ptr<T>();
  product(false, true, p, D, I, hp, I, ex.w2.data_ptr<T>(), I, y, D, o);
  scatter_add(y, ex.idx, n, D, out);
}

// The expert's gradients given gout (N, D) fp32: ex.gw1, ex.gw2, ex.gw where wanted, and its input gradient
// summed into gx (null: not wanted).
template <typename T>
void backward_expert(const at::Tensor& gout, const at::Tensor& x, const Expert& ex, float limit, Acc* gx,
                     Buffers& buf) {
  const int64_t n = ex.n, p = ex.p, D = x.size(1), I = ex.w1.size(0) / 2, I2 = 2 * I;
  const T* gup = static_cast<const T*>(ex.gup);
  const auto o = x.options();
  T* gy = buf.y.data_ptr<T>();
  gather(gout.data_ptr<float>(), ex.idx, n, p, D, gy);
  T* awp = buf.aw.data_ptr<T>();
  float* sgp = buf.sg.data_ptr<float>();
  // aw = silu(g) * u * w (the weighted activation), sg = sigmoid(g)
  at::parallel_for(0, p, GRAIN, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* g = gup + r * I2;
      const T* u = g + I;
      if (r + AHEAD < e) prefetch(g + AHEAD * I2, I2 * sizeof(T));
      const float wr = r < n ? ex.w[r] : 0.f;
      if (limit > 0) swiglu_row<true, true>(g, u, wr, limit, awp + r * I, sgp + r * I, I);
      else swiglu_row<false, true>(g, u, wr, limit, awp + r * I, sgp + r * I, I);
    }
  });
  if (ex.gw2.defined()) product(true, false, D, I, p, gy, D, awp, I, ex.gw2.data_ptr<T>(), I, o);
  if (!(gx || ex.gw1.defined() || ex.gw)) return;
  // the weighted activation's gradient (p, I); zero on the padding rows
  T* ghp = buf.gh.data_ptr<T>();
  product(false, false, p, I, D, gy, D, ex.w2.data_ptr<T>(), I, ghp, I, o);
  T* gp = buf.grad.data_ptr<T>();
  at::parallel_for(0, p, GRAIN, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* g = gup + r * I2;
      const T* u = g + I;
      const T* ghr = ghp + r * I;
      const float* sgr = sgp + r * I;
      if (r + AHEAD < e) {
        prefetch(g + AHEAD * I2, I2 * sizeof(T));
        prefetch(ghr + AHEAD * I, I * sizeof(T));
        prefetch(sgr + AHEAD * I, I * sizeof(float));
      }
      const float wr = r < n ? ex.w[r] : 0.f;
      const float dot = limit > 0 ? swiglu_grad_row<true>(g, u, ghr, sgr, wr, limit, gp + r * I2, I)
                                  : swiglu_grad_row<false>(g, u, ghr, sgr, wr, limit, gp + r * I2, I);
      if (ex.gw && r < n) ex.gw[r] = dot;
    }
  });
  if (ex.gw1.defined()) {
    T* rows = buf.x.data_ptr<T>();
    gather(x.data_ptr<T>(), ex.idx, n, p, D, rows);
    product(true, false, I2, D, p, gp, I2, rows, D, ex.gw1.data_ptr<T>(), D, o);
  }
  if (gx) {
    T* gxr = gy;  // the gathered output gradient is no longer needed
    product(false, false, p, D, I2, gp, I2, ex.w1.data_ptr<T>(), D, gxr, D, o);
    scatter_add(gxr, ex.idx, n, D, *gx);
  }
}

// Lanes: with L > 1 threads, experts run side by side, one per thread at a time (its products single-threaded,
// no fork/join per product or pass), lane l summing into its own accumulator, the accumulators summed at the end.
// The largest expert goes first, each to the lane with the least work so far (ties: the lower lane): the plan
// depends only on the row counts and L, so results repeat exactly from run to run (for the same thread count).
std::vector<std::vector<int64_t>> plan_lanes(const std::vector<Expert>& ex, int64_t lanes) {
  std::vector<int64_t> order(ex.size()), load(lanes, 0);
  std::iota(order.begin(), order.end(), 0);
  auto work = [&](int64_t i) { return ex[i].p * ex[i].w1.size(0); };
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return work(a) > work(b); });
  std::vector<std::vector<int64_t>> plan(lanes);
  for (int64_t i : order) {
    const int64_t l = std::min_element(load.begin(), load.end()) - load.begin();
    plan[l].push_back(i);
    load[l] += work(i);
  }
  return plan;
}

// Threads to run the experts on side by side: all of them, when there are at least two experts per thread and
// the extra fp32 accumulators (lanes - 1 of (N, D)) take no more memory than the gate|up activations kept anyway.
int64_t lane_count(const std::vector<Expert>& ex, int64_t N, int64_t D, int64_t gu_bytes) {
  const int64_t threads = at::get_num_threads();
  if (threads < 2 || static_cast<int64_t>(ex.size()) < 2 * threads) return 1;
  return (threads - 1) * N * D * 4 <= gu_bytes ? threads : 1;
}

// body(expert, buffers, lane) for every expert: in order on one lane (each product and pass on all threads), or
// along plan_lanes with each thread its own buffers.
template <class MakeBuffers, class Body>
void run_experts(const std::vector<Expert>& ex, int64_t lanes, MakeBuffers make, Body body) {
  if (lanes <= 1) {
    auto buf = make();
    for (const auto& e : ex) body(e, buf, 0);
    return;
  }
  const auto plan = plan_lanes(ex, lanes);
  const at::ThreadLocalState state;  // grad mode and the rest, as at::parallel_for hands them to its threads
  std::exception_ptr err;
#pragma omp parallel num_threads(lanes)
  {
    try {
      const at::ThreadLocalStateGuard guard(state);
      auto buf = make();
      // a smaller team than asked for still runs every lane, each into its own accumulator
      for (int64_t l = omp_get_thread_num(); l < lanes; l += omp_get_num_threads())
        for (int64_t i : plan[l]) body(ex[i], buf, l);
    } catch (...) {
#pragma omp critical
      err = std::current_exception();
    }
  }
  if (err) std::rethrow_exception(err);
}

// acc[0] + acc[1] + ... + acc[L-1], row by row in that order, into acc[0]'s tensor; rows no lane holds are 0
at::Tensor sum_lanes(std::vector<Acc>& acc) {
  Acc& out = acc[0];
  const int64_t n = out.t.size(0), d = out.t.size(1);
  float* dst = out.t.data_ptr<float>();
  at::parallel_for(0, n, GRAIN, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float* o = dst + r * d;
      bool have = out.touched[r];
      for (size_t l = 1; l < acc.size(); ++l) {
        if (!acc[l].touched[r]) continue;
        const float* src = acc[l].t.data_ptr<float>() + r * d;
        if (have) {
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) o[j] += src[j];
        } else {
          std::memcpy(o, src, d * sizeof(float));
          have = true;
        }
      }
      if (!have) std::memset(o, 0, d * sizeof(float));
    }
  });
  return out.t;
}

inline int64_t padded(int64_t n, int64_t step) { return (n + step - 1) / step * step; }

struct Shapes {
  int64_t N, D, E, I, M, big, Mp;  // Mp: rows of the saved gate|up activations, each segment padded to the bucket
};

Shapes check_all(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& tok,
                 const at::Tensor& counts, const at::Tensor& w, int64_t step) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "moeforge native experts: x must be fp32 or bf16");
  TORCH_CHECK(step >= 1, "moeforge native experts: the row bucket must be >= 1");
  check(x, "x", 2, dt);
  check(w1, "w1", 3, dt);
  check(w2, "w2", 3, dt);
  check(w, "w", 1);
  TORCH_CHECK(tok.scalar_type() == at::kLong && counts.scalar_type() == at::kLong && tok.is_contiguous() &&
                  counts.is_contiguous() && tok.device().is_cpu() && counts.device().is_cpu(),
              "moeforge native experts: tok and counts must be contiguous int64 CPU tensors");
  Shapes s{x.size(0), x.size(1), w1.size(0), w1.size(1) / 2, tok.size(0), 0, 0};
  TORCH_CHECK(w1.size(1) % 2 == 0 && w1.size(2) == s.D && w2.size(0) == s.E && w2.size(1) == s.D &&
                  w2.size(2) == s.I && w.size(0) == s.M && counts.size(0) == s.E,
              "moeforge native experts: mismatched shapes");
  const auto* cnt = counts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t e = 0; e < s.E; ++e) {
    TORCH_CHECK(cnt[e] >= 0, "moeforge native experts: negative count");
    s.big = std::max(s.big, padded(cnt[e], step));
    s.Mp += padded(cnt[e], step);
    total += cnt[e];
  }
  TORCH_CHECK(total == s.M, "moeforge native experts: counts must sum to the number of pairs");
  const auto* t = tok.data_ptr<int64_t>();
  for (int64_t j = 0; j < s.M; ++j) TORCH_CHECK(t[j] >= 0 && t[j] < s.N, "moeforge native experts: token out of range");
  return s;
}

// The work list: every expert with rows. Gradient fields stay unset.
std::vector<Expert> experts_of(const Shapes& s, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& tok,
                               const at::Tensor& counts, const at::Tensor& w, const at::Tensor& gu, int64_t step) {
  std::vector<Expert> ex;
  const auto* cnt = counts.data_ptr<int64_t>();
  char* gup = static_cast<char*>(gu.data_ptr());
  const int64_t row_bytes = 2 * s.I * gu.element_size();
  for (int64_t e = 0, start = 0, pstart = 0; e < s.E; start += cnt[e], pstart += padded(cnt[e], step), ++e) {
    if (cnt[e] == 0) continue;
    ex.push_back({tok.data_ptr<int64_t>() + start, cnt[e], padded(cnt[e], step), w1[e], w2[e],
                  w.data_ptr<float>() + start, gup + pstart * row_bytes, {}, {}, nullptr});
  }
  return ex;
}

static int64_t g_lanes = 0;  // <= 0: lane_count decides; set_lanes(n) forces n (benchmarks, tests)

int64_t lanes_for(const std::vector<Expert>& ex, const Shapes& s, const at::Tensor& gu) {
  return g_lanes > 0 ? g_lanes : lane_count(ex, s.N, s.D, gu.numel() * gu.element_size());
}

}  // namespace

// See moeforge/ops/native.py. Returns [out (N, D) fp32, gu (Mp, 2I) in x's dtype].
std::vector<at::Tensor> experts_fwd(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                                    const at::Tensor& tok, const at::Tensor& counts, const at::Tensor& w,
                                    double limit, int64_t step) {
  const Shapes s = check_all(x, w1, w2, tok, counts, w, step);
  const auto o = x.options();
  auto gu = at::empty({s.Mp, 2 * s.I}, o);
  const auto ex = experts_of(s, w1, w2, tok, counts, w, gu, step);
  const int64_t lanes = lanes_for(ex, s, gu);
  std::vector<Acc> acc;
  for (int64_t l = 0; l < lanes; ++l) acc.emplace_back(s.N, s.D, o.dtype(at::kFloat));
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  run_experts(ex, lanes, [&] { return Buffers(s.big, s.D, s.I, o, false); },
              [&](const Expert& e, Buffers& buf, int64_t l) {
                if (bf16) return forward_expert<at::BFloat16>(x, e, static_cast<float>(limit), acc[l], buf);
                forward_expert<float>(x, e, static_cast<float>(limit), acc[l], buf);
              });
  return {sum_lanes(acc), gu};
}

// Gradients of experts_fwd's out given gout (fp32): [gx (x's dtype), gw1, gw2, gw (M,) fp32]; one not asked for
// (need_* false) comes back as a tensor of no elements.
std::vector<at::Tensor> experts_bwd(const at::Tensor& gout, const at::Tensor& x, const at::Tensor& w1,
                                    const at::Tensor& w2, const at::Tensor& tok, const at::Tensor& counts,
                                    const at::Tensor& w, const at::Tensor& gu, double limit, int64_t step, bool need_x,
                                    bool need_w1, bool need_w2, bool need_w) {
  const Shapes s = check_all(x, w1, w2, tok, counts, w, step);
  check(gout, "gout", 2);
  check(gu, "gu", 2, x.scalar_type());
  TORCH_CHECK(gout.size(0) == s.N && gout.size(1) == s.D && gu.size(0) == s.Mp && gu.size(1) == 2 * s.I,
              "moeforge native experts: mismatched gradient or saved shapes");
  const auto o = x.options();
  const auto none = at::empty({0}, o);
  at::Tensor gw1 = need_w1 ? at::empty_like(w1) : at::Tensor(), gw2 = need_w2 ? at::empty_like(w2) : at::Tensor();
  at::Tensor gw = need_w ? at::empty({s.M}, o.dtype(at::kFloat)) : at::Tensor();
  if (!(need_x || need_w1 || need_w2 || need_w)) return {none, none, none, none};
  auto ex = experts_of(s, w1, w2, tok, counts, w, gu, step);
  const auto* cnt = counts.data_ptr<int64_t>();
  for (int64_t e = 0, start = 0, k = 0; e < s.E; start += cnt[e], ++e) {
    if (cnt[e] == 0) {  // an expert that saw no token gets a zero gradient
      if (need_w1) gw1[e].zero_();
      if (need_w2) gw2[e].zero_();
      continue;
    }
    if (need_w1) ex[k].gw1 = gw1[e];
    if (need_w2) ex[k].gw2 = gw2[e];
    if (need_w) ex[k].gw = gw.data_ptr<float>() + start;
    ++k;
  }
  const int64_t lanes = lanes_for(ex, s, gu);
  std::vector<Acc> acc;
  for (int64_t l = 0; need_x && l < lanes; ++l) acc.emplace_back(s.N, s.D, o.dtype(at::kFloat));
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  run_experts(ex, lanes, [&] { return Buffers(s.big, s.D, s.I, o, true); },
              [&](const Expert& e, Buffers& buf, int64_t l) {
                Acc* gx = need_x ? &acc[l] : nullptr;
                if (bf16) return backward_expert<at::BFloat16>(gout, x, e, static_cast<float>(limit), gx, buf);
                backward_expert<float>(gout, x, e, static_cast<float>(limit), gx, buf);
              });
  auto or_none = [&](const at::Tensor& v) { return v.defined() ? v : none; };
  return {need_x ? sum_lanes(acc).to(x.scalar_type()) : none, or_none(gw1), or_none(gw2), or_none(gw)};
}

// Router selection: the top-k experts of each row of choice (N, E) fp32 (scores plus the selection bias), as
// moeforge.model.moe.Router computes it with torch ops: with n_group > 1, each group of E / n_group experts is
// scored by the sum of its top-2 (sum_top2, DeepSeek-V3's noaux_tc) or by its maximum (V2), the best topk_group
// groups are kept and every other expert's value becomes `fill` (-inf for V3, 0 for V2); then the k largest
// values. Indices come out by descending value, ties to the lower expert; NaN counts as -inf (torch.topk ranks
// it highest: only a diverged run sees the difference). -> (N, k) int64.
//
// Branch-free, so random scores cost no mispredictions: each (value, expert) becomes one unsigned 64-bit key,
// the value's bits in an order-preserving form above the expert's index complemented, so the largest key is the
// largest value and among equal values the lowest expert; pass t takes the largest key below pass t-1's (a
// vectorised max). benchmarks/moe_layer.py's router (4096 rows, 64 experts in 8 groups, top-6, 2 threads):
// 1.10 -> 0.42 ms against an insertion into a sorted list, whose branches random scores mispredict.
namespace {
inline float not_nan(float v) { return v == v ? v + 0.0f : -INFINITY; }  // NaN -> -inf; -0 -> +0 (ties with +0)
inline uint64_t key_of(float v, int64_t j) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // unsigned order = float order (no NaN here)
  return (static_cast<uint64_t>(u) << 32) | (0xffffffffu - static_cast<uint32_t>(j));
}

// max{keys[j] : keys[j] < below} (0 if none)
inline uint64_t max_below(const uint64_t* keys, int64_t n, uint64_t below) {
  int64_t j = 0;
  uint64_t best = 0;
#ifdef __AVX512F__
  const __m512i lim = _mm512_set1_epi64(static_cast<long long>(below));
  __m512i b0 = _mm512_setzero_si512(), b1 = _mm512_setzero_si512();
  for (; j + 16 <= n; j += 16) {
    const __m512i v0 = _mm512_loadu_si512(keys + j), v1 = _mm512_loadu_si512(keys + j + 8);
    b0 = _mm512_mask_max_epu64(b0, _mm512_cmplt_epu64_mask(v0, lim), b0, v0);
    b1 = _mm512_mask_max_epu64(b1, _mm512_cmplt_epu64_mask(v1, lim), b1, v1);
  }
  best = _mm512_reduce_max_epu64(_mm512_max_epu64(b0, b1));
#endif
  for (; j < n; ++j) best = std::max(best, keys[j] < below ? keys[j] : 0);
  return best;
}
}  // namespace

at::Tensor select_experts(const at::Tensor& choice, int64_t n_group, int64_t topk_group, int64_t k, bool sum_top2,
                          double fill_d) {
  check(choice, "choice", 2);
  const int64_t N = choice.size(0), E = choice.size(1);
  TORCH_CHECK(n_group >= 1 && E % n_group == 0 && topk_group >= 1 && topk_group <= n_group && k >= 1 && k <= E &&
                  E < (int64_t{1} << 32),
              "moeforge native router: bad group or top-k sizes");
  const int64_t per = E / n_group;
  TORCH_CHECK(!sum_top2 || n_group == 1 || per >= 2, "moeforge native router: sum_top2 needs groups of >= 2 experts");
  auto out = at::empty({N, k}, choice.options().dtype(at::kLong));
  const float* src = choice.data_ptr<float>();
  int64_t* dst = out.data_ptr<int64_t>();
  const float fill = not_nan(static_cast<float>(fill_d));
  const bool grouped = n_group > 1 && topk_group < n_group;
  at::parallel_for(0, N, 64, [&](int64_t b, int64_t e) {
    std::vector<uint64_t> keys(E), gkeys(n_group);
    std::vector<uint8_t> kept(n_group, 1);
    for (int64_t r = b; r < e; ++r) {
      const float* row = src + r * E;
      if (grouped) {
        for (int64_t g = 0; g < n_group; ++g) {
          float m1 = -INFINITY, m2 = -INFINITY;  // the group's two largest
          for (int64_t j = g * per; j < (g + 1) * per; ++j) {
            const float v = not_nan(row[j]);
            m2 = std::max(m2, std::min(m1, v));
            m1 = std::max(m1, v);
          }
          gkeys[g] = key_of(sum_top2 ? m1 + m2 : m1, g);
        }
        std::fill(kept.begin(), kept.end(), 0);
        for (int64_t t = 0; t < topk_group; ++t) {
          const int64_t g = 0xffffffffu - static_cast<uint32_t>(*std::max_element(gkeys.begin(), gkeys.end()));
          kept[g] = 1;
          gkeys[g] = 0;
        }
      }
      for (int64_t g = 0; g < n_group; ++g) {
        const int64_t j0 = g * per;
        if (kept[g]) {
#pragma omp simd
          for (int64_t j = j0; j < j0 + per; ++j) keys[j] = key_of(not_nan(row[j]), j);
        } else {
#pragma omp simd
          for (int64_t j = j0; j < j0 + per; ++j) keys[j] = key_of(fill, j);
        }
      }
      // pass t: the largest key below pass t-1's (keys are distinct: each holds its expert)
      uint64_t prev = ~uint64_t{0};
      for (int64_t t = 0; t < k; ++t) {
        prev = max_below(keys.data(), E, prev);
        dst[r * k + t] = 0xffffffffu - static_cast<uint32_t>(prev);
      }
    }
  });
  return out;
}

// The token-expert pairs of indices (N, K) int64 sorted by expert, stably (a counting sort):
// [order (M,): pair index p = token * K + slot of each sorted position, counts (E,)]; tok = order / K.
std::vector<at::Tensor> sort_pairs(const at::Tensor& indices, int64_t E) {
  TORCH_CHECK(indices.device().is_cpu() && indices.scalar_type() == at::kLong && indices.is_contiguous() &&
                  indices.dim() == 2 && E >= 1,
              "moeforge native router: indices must be a contiguous (N, K) int64 CPU tensor");
  const int64_t M = indices.numel();
  const int64_t* ix = indices.data_ptr<int64_t>();
  auto counts = at::zeros({E}, indices.options());
  auto order = at::empty({M}, indices.options());
  int64_t* cnt = counts.data_ptr<int64_t>();
  for (int64_t p = 0; p < M; ++p) {
    TORCH_CHECK(ix[p] >= 0 && ix[p] < E, "moeforge native router: expert index out of range");
    ++cnt[ix[p]];
  }
  std::vector<int64_t> next(E, 0);
  for (int64_t e = 1; e < E; ++e) next[e] = next[e - 1] + cnt[e - 1];
  int64_t* o = order.data_ptr<int64_t>();
  for (int64_t p = 0; p < M; ++p) o[next[ix[p]]++] = p;
  return {order, counts};
}

void set_lanes(int64_t n) { g_lanes = n; }

// Whether the fp32 products call MKL's sgemm directly (else at::mm_out).
bool direct_blas() { return blas_sgemm != nullptr; }

TORCH_LIBRARY(moeforge_native, m) {
  m.def("experts_fwd(Tensor x, Tensor w1, Tensor w2, Tensor tok, Tensor counts, Tensor w, float limit, int step) -> "
        "Tensor[]");
  m.def(
      "experts_bwd(Tensor gout, Tensor x, Tensor w1, Tensor w2, Tensor tok, Tensor counts, Tensor w, Tensor gu, "
      "float limit, int step, bool need_x, bool need_w1, bool need_w2, bool need_w) -> Tensor[]");
  m.def("set_lanes(int n) -> ()", &set_lanes);
  m.def("direct_blas() -> bool", &direct_blas);
  m.def("sort_pairs(Tensor indices, int E) -> Tensor[]", &sort_pairs);
  m.def("select_experts(Tensor choice, int n_group, int topk_group, int k, bool sum_top2, float fill) -> Tensor",
        &select_experts);
}

// CPU kernels, not composite ones: a dispatch mode (torch.utils.flop_counter) meets the expert ops whole, and
// counts their products with the formulas moeforge/ops/native.py registers.
TORCH_LIBRARY_IMPL(moeforge_native, CPU, m) {
  m.impl("experts_fwd", &experts_fwd);
  m.impl("experts_bwd", &experts_bwd);
}
