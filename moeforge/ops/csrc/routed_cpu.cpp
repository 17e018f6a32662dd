// The MoE block's routed experts, forward and backward, for fp32 CPU tensors: the per-expert loop of
// moeforge/ops/routed.py (_RoutedSwiGLU) with each segment's gather, SwiGLU, gate weighting and
// scatter-add written as one pass over rows that are still in cache, and no Python or dispatcher work
// between the products (ATen's mm: MKL on x86). Built on first use by moeforge/ops/native.py, which
// documents shapes and semantics.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GLIBC__)
// glibc's vector expf (libmvec): lets the `omp simd` loops below vectorise exp without -ffast-math
extern "C" float expf(float) noexcept __attribute__((simd("notinbranch")));
#endif

namespace {

constexpr int64_t GRAIN = 16;  // rows per parallel task

inline float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }
// DeepSeek-V4's swiglu_limit (0: no clamp): gate <= limit, -limit <= up <= limit
inline float clamp_gate(float g, float limit) { return limit > 0 ? std::min(g, limit) : g; }
inline float clamp_up(float u, float limit) { return limit > 0 ? std::min(std::max(u, -limit), limit) : u; }

void check(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == dim,
              "moeforge native experts: ", name, " must be a contiguous fp32 CPU tensor of ", dim, " dimensions");
}

// rows[r] = src[idx[r]] for r < n, rows of width d
void gather(const float* src, const int64_t* idx, int64_t n, int64_t d, float* rows) {
  at::parallel_for(0, n, GRAIN, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) std::memcpy(rows + r * d, src + idx[r] * d, d * sizeof(float));
  });
}

// dst[idx[r]] += rows[r]; one expert's idx are distinct (a token picks an expert once), so rows split freely
void scatter_add(const float* rows, const int64_t* idx, int64_t n, int64_t d, float* dst) {
  at::parallel_for(0, n, GRAIN, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float* o = dst + idx[r] * d;
      const float* y = rows + r * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) o[j] += y[j];
    }
  });
}

// Work buffers for segments of up to `rows` rows of experts of width I.
struct Buffers {
  at::Tensor x, h, y, a, aw, sg, gh, grad;
  Buffers(int64_t rows, int64_t D, int64_t I, const at::TensorOptions& o, bool backward) {
    x = at::empty({rows, D}, o), y = at::empty({rows, D}, o);
    if (backward) {
      a = at::empty({rows, I}, o), aw = at::empty({rows, I}, o), sg = at::empty({rows, I}, o);
      gh = at::empty({rows, I}, o), grad = at::empty({rows, 2 * I}, o);
    } else {
      h = at::empty({rows, I}, o);
    }
  }
};

// One expert on n rows: rows = x[idx], gu (n, 2I) <- rows w1e^T (saved for the backward pass),
// h = silu(g) * u * w, then h w2e^T scatter-added into out at idx.
void forward_segment(const at::Tensor& x, const int64_t* idx, int64_t n, const at::Tensor& w1e, const at::Tensor& w2e,
                     const float* w, float limit, at::Tensor gu, at::Tensor& out, Buffers& buf) {
  const int64_t D = x.size(1), I = w1e.size(0) / 2;
  auto rows = buf.x.narrow(0, 0, n);
  gather(x.data_ptr<float>(), idx, n, D, rows.data_ptr<float>());
  at::mm_out(gu, rows, w1e.t());
  auto h = buf.h.narrow(0, 0, n);
  const float* gup = gu.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  at::parallel_for(0, n, GRAIN, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* g = gup + r * 2 * I;
      const float* u = g + I;
      float* o = hp + r * I;
      const float wr = w[r];
#pragma omp simd
      for (int64_t j = 0; j < I; ++j) {
        const float gg = clamp_gate(g[j], limit);
        o[j] = gg * sigmoid(gg) * clamp_up(u[j], limit) * wr;
      }
    }
  });
  auto y = buf.y.narrow(0, 0, n);
  at::mm_out(y, h, w2e.t());
  scatter_add(y.data_ptr<float>(), idx, n, D, out.data_ptr<float>());
}

// Gradients of forward_segment given gout (N, D): gw1e, gw2e (undefined: not wanted), gw (n,) of the gate weights
// (null: not wanted), and the input gradient scatter-added into gx at idx (gx undefined: not wanted).
void backward_segment(const at::Tensor& gout, const at::Tensor& x, const int64_t* idx, int64_t n,
                      const at::Tensor& w1e, const at::Tensor& w2e, const float* w, const float* gup, float limit,
                      at::Tensor gw1e, at::Tensor gw2e, float* gw, at::Tensor& gx, Buffers& buf) {
  const int64_t D = x.size(1), I = w1e.size(0) / 2, I2 = 2 * I;
  auto gy = buf.y.narrow(0, 0, n);
  gather(gout.data_ptr<float>(), idx, n, D, gy.data_ptr<float>());
  auto a = buf.a.narrow(0, 0, n), aw = buf.aw.narrow(0, 0, n), sg = buf.sg.narrow(0, 0, n);
  float *ap = a.data_ptr<float>(), *awp = aw.data_ptr<float>(), *sgp = sg.data_ptr<float>();
  // a = silu(g) * u (unweighted), aw = a * w, sg = sigmoid(g)
  at::parallel_for(0, n, GRAIN, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* g = gup + r * I2;
      const float* u = g + I;
      const float wr = w[r];
      float *ar = ap + r * I, *awr = awp + r * I, *sgr = sgp + r * I;
#pragma omp simd
      for (int64_t j = 0; j < I; ++j) {
        const float gg = clamp_gate(g[j], limit);
        const float s = sigmoid(gg);
        const float v = gg * s * clamp_up(u[j], limit);
        sgr[j] = s;
        ar[j] = v;
        awr[j] = v * wr;
      }
    }
  });
  if (gw2e.defined()) at::mm_out(gw2e, gy.t(), aw);
  if (!(gx.defined() || gw1e.defined() || gw)) return;
  auto gh = buf.gh.narrow(0, 0, n), grad = buf.grad.narrow(0, 0, n);
  at::mm_out(gh, gy, w2e);  // gradient of the weighted activation (n, I)
  const float* ghp = gh.data_ptr<float>();
  float* gp = grad.data_ptr<float>();
  at::parallel_for(0, n, GRAIN, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* g = gup + r * I2;
      const float* u = g + I;
      const float *ghr = ghp + r * I, *sgr = sgp + r * I;
      float* dg_out = gp + r * I2;
      float* du_out = dg_out + I;
      const float wr = w[r];
      if (gw) {
        const float* ar = ap + r * I;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < I; ++j) dot += ghr[j] * ar[j];
        gw[r] = dot;
      }
#pragma omp simd
      for (int64_t j = 0; j < I; ++j) {
        const float graw = g[j], uraw = u[j];
        const float gg = clamp_gate(graw, limit), uu = clamp_up(uraw, limit), s = sgr[j];
        const float d = ghr[j] * wr;
        float dg = d * uu * s * (1.0f + gg * (1.0f - s));
        float du = d * gg * s;
        if (limit > 0) {  // clamp passes the gradient only where the input was inside the bounds
          dg = graw <= limit ? dg : 0.0f;
          du = (uraw >= -limit && uraw <= limit) ? du : 0.0f;
        }
        dg_out[j] = dg;
        du_out[j] = du;
      }
    }
  });
  if (gw1e.defined()) {
    auto rows = buf.x.narrow(0, 0, n);
    gather(x.data_ptr<float>(), idx, n, D, rows.data_ptr<float>());
    at::mm_out(gw1e, grad.t(), rows);
  }
  if (gx.defined()) {
    auto gxr = buf.y.narrow(0, 0, n);  // the gathered output gradient is no longer needed
    at::mm_out(gxr, grad, w1e);
    scatter_add(gxr.data_ptr<float>(), idx, n, D, gx.data_ptr<float>());
  }
}

struct Shapes {
  int64_t N, D, E, I, M, big;
};

Shapes check_all(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& tok,
                 const at::Tensor& counts, const at::Tensor& w) {
  check(x, "x", 2);
  check(w1, "w1", 3);
  check(w2, "w2", 3);
  check(w, "w", 1);
  TORCH_CHECK(tok.scalar_type() == at::kLong && counts.scalar_type() == at::kLong && tok.is_contiguous() &&
                  counts.is_contiguous() && tok.device().is_cpu() && counts.device().is_cpu(),
              "moeforge native experts: tok and counts must be contiguous int64 CPU tensors");
  Shapes s{x.size(0), x.size(1), w1.size(0), w1.size(1) / 2, tok.size(0), 0};
  TORCH_CHECK(w1.size(1) % 2 == 0 && w1.size(2) == s.D && w2.size(0) == s.E && w2.size(1) == s.D &&
                  w2.size(2) == s.I && w.size(0) == s.M && counts.size(0) == s.E,
              "moeforge native experts: mismatched shapes");
  const auto* cnt = counts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t e = 0; e < s.E; ++e) {
    TORCH_CHECK(cnt[e] >= 0, "moeforge native experts: negative count");
    s.big = std::max(s.big, cnt[e]);
    total += cnt[e];
  }
  TORCH_CHECK(total == s.M, "moeforge native experts: counts must sum to the number of pairs");
  const auto* t = tok.data_ptr<int64_t>();
  for (int64_t j = 0; j < s.M; ++j) TORCH_CHECK(t[j] >= 0 && t[j] < s.N, "moeforge native experts: token out of range");
  return s;
}

}  // namespace

// See moeforge/ops/native.py. Returns [out (N, D), gu (M, 2I)].
std::vector<at::Tensor> experts_fwd(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                                    const at::Tensor& tok, const at::Tensor& counts, const at::Tensor& w,
                                    double limit) {
  const Shapes s = check_all(x, w1, w2, tok, counts, w);
  const auto o = x.options();
  auto out = at::zeros({s.N, s.D}, o), gu = at::empty({s.M, 2 * s.I}, o);
  Buffers buf(s.big, s.D, s.I, o, false);
  const auto* cnt = counts.data_ptr<int64_t>();
  const auto* t = tok.data_ptr<int64_t>();
  const float* wp = w.data_ptr<float>();
  for (int64_t e = 0, start = 0; e < s.E; start += cnt[e], ++e) {
    if (cnt[e] == 0) continue;
    forward_segment(x, t + start, cnt[e], w1[e], w2[e], wp + start, static_cast<float>(limit),
                    gu.narrow(0, start, cnt[e]), out, buf);
  }
  return {out, gu};
}

// Gradients of experts_fwd's out given gout: [gx, gw1, gw2, gw (M,)]; one not asked for (need_* false) comes back
// as a tensor of no elements.
std::vector<at::Tensor> experts_bwd(const at::Tensor& gout, const at::Tensor& x, const at::Tensor& w1,
                                    const at::Tensor& w2, const at::Tensor& tok, const at::Tensor& counts,
                                    const at::Tensor& w, const at::Tensor& gu, double limit, bool need_x, bool need_w1,
                                    bool need_w2, bool need_w) {
  const Shapes s = check_all(x, w1, w2, tok, counts, w);
  check(gout, "gout", 2);
  check(gu, "gu", 2);
  TORCH_CHECK(gout.size(0) == s.N && gout.size(1) == s.D && gu.size(0) == s.M && gu.size(1) == 2 * s.I,
              "moeforge native experts: mismatched gradient or saved shapes");
  const auto o = x.options();
  at::Tensor gx = need_x ? at::zeros({s.N, s.D}, o) : at::Tensor();
  at::Tensor gw1 = need_w1 ? at::empty_like(w1) : at::Tensor(), gw2 = need_w2 ? at::empty_like(w2) : at::Tensor();
  at::Tensor gw = need_w ? at::empty({s.M}, o) : at::Tensor();
  if (need_x || need_w1 || need_w2 || need_w) {
    Buffers buf(s.big, s.D, s.I, o, true);
    const auto* cnt = counts.data_ptr<int64_t>();
    const auto* t = tok.data_ptr<int64_t>();
    const float* wp = w.data_ptr<float>();
    const float* gup = gu.data_ptr<float>();
    for (int64_t e = 0, start = 0; e < s.E; start += cnt[e], ++e) {
      if (cnt[e] == 0) {  // an expert that saw no token gets a zero gradient
        if (need_w1) gw1[e].zero_();
        if (need_w2) gw2[e].zero_();
        continue;
      }
      backward_segment(gout, x, t + start, cnt[e], w1[e], w2[e], wp + start, gup + start * 2 * s.I,
                       static_cast<float>(limit), need_w1 ? gw1[e] : at::Tensor(), need_w2 ? gw2[e] : at::Tensor(),
                       need_w ? gw.data_ptr<float>() + start : nullptr, gx, buf);
    }
  }
  const auto none = at::empty({0}, o);
  auto or_none = [&](const at::Tensor& v) { return v.defined() ? v : none; };
  return {or_none(gx), or_none(gw1), or_none(gw2), or_none(gw)};
}

TORCH_LIBRARY(moeforge_native, m) {
  m.def("experts_fwd(Tensor x, Tensor w1, Tensor w2, Tensor tok, Tensor counts, Tensor w, float limit) -> Tensor[]",
        &experts_fwd);
  m.def(
      "experts_bwd(Tensor gout, Tensor x, Tensor w1, Tensor w2, Tensor tok, Tensor counts, Tensor w, Tensor gu, "
      "float limit, bool need_x, bool need_w1, bool need_w2, bool need_w) -> Tensor[]",
      &experts_bwd);
}
