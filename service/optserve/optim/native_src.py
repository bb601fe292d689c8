"""The native exact kernel's C++ source (compiled by :mod:`optserve.optim.native`).

A Python string rather than a ``.cpp`` file so that it ships in every install of the
package (wheels carry Python modules only unless told otherwise) and the build hashes and
compiles exactly this text.
"""

from .native_sqrt_src import API, INTERNAL

_TEMPLATE = r"""
// One-pass RMSprop / Adagrad update that rounds exactly as torch's CPU single-tensor path.
//
// Why: torch runs 5-9 ATen ops per tensor, each a pass over memory with its own overhead.
// Here every element of a small chunk goes through the whole update while the chunk is in
// cache, with the same IEEE operations, in the same order, as the ATen kernels:
//   * ATen's kernels are compiled with contraction on, so `self + s*t1*t2` (addcmul) is
//     fma(s*t1, t2, self), `add(x, alpha=a)` is fma(x, a, self), lerp is fma(w, end-self,
//     self) (w < 0.5) or fma(w-1, end-self, end); written out below with explicit std::fma
//     and this file is compiled with -ffp-contract=off, so nothing else is contracted.
//   * `self + s*t1/t2` (addcdiv) is ((s*t1)/t2) + self, three roundings.
//   * sqrt is MKL's vector sqrt, called the way ATen calls it (VML_HA), through a pointer
//     the loader takes from torch's own library: it is not IEEE sqrt, so it is not rewritten.
// Plain +, -, *, /, fma and the scalar casts are correctly rounded in every code path
// (vector or scalar), so auto-vectorization cannot change a bit. The loader checks the
// results against torch's ops before using this, and falls back if they ever differ.
// No torch headers: a plain C ABI loaded with ctypes, so it compiles in about a second.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>
#include <cstring>
#include <immintrin.h>

namespace {

// n is passed as a 64-bit integer: an LP64 MKL reads its low 32 bits (n < 2^31 here), an
// ILP64 one all of it, so the call is right whichever MKL_INT torch was built with.
using vml_s = void (*)(long long, const float*, float*, long long);
using vml_d = void (*)(long long, const double*, double*, long long);
constexpr long long kVmlMode = 0x2 | 0x140000 | 0x100;  // VML_HA|VML_FTZDAZ_OFF|ERRMODE_IGNORE
constexpr int64_t kChunk = 8192;                         // elements per in-cache chunk

// MKL_Set_Num_Threads_Local: MKL threads its vector math itself when the calling thread is
// not inside an OpenMP region (ATen's calls are; ours are not), which fought our own
// threads for the cores and doubled the step's time. Each of our threads sets 1 for itself.
using mkl_local = int (*)(int);
mkl_local g_mkl_local = nullptr;
vml_s g_sqrt_s = nullptr;
vml_d g_sqrt_d = nullptr;

// @fast-sqrt@ (native_sqrt_src.INTERNAL: vsqrt for float and double)

// Python's scalars as ATen casts them to the tensor's dtype (once, in double on the caller).
struct Scalars {
  double neg_lr, alpha, one_minus_alpha, eps, wd, momentum;
};

enum Flags { kMaximize = 1, kWeightDecay = 2, kCentered = 4, kMomentum = 8 };

// What the service reports and checks after a step, summed in double while each chunk is
// still in cache (otherwise three more passes over memory): the gradient's sum of squares,
// the update's (new - old, rounded in T, as torch.sub gives it), and the accumulator's sum
// (>= 0, so finite iff every element is).
struct Totals {
  double grad_sq, update_sq, acc_sum;
};

template <typename T>
double sum_sq(const T* x, int64_t m) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < m; ++j) acc += static_cast<double>(x[j]) * static_cast<double>(x[j]);
  return acc;
}

template <typename T>
double sum_of(const T* x, int64_t m) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < m; ++j) acc += static_cast<double>(x[j]);
  return acc;
}

// One thread's share of a call's Totals (nothing when the caller asked for none): the
// gradient and accumulator of a chunk after its first pass, the update's differences
// (left in the chunk's scratch) after its second; added to the call's once, at the end.
struct Partial {
  Totals* out;
  double grad_sq = 0.0, update_sq = 0.0, acc_sum = 0.0;

  template <typename T>
  void inputs(const T* grad, const T* acc, int64_t m) {
    if (out) {
      grad_sq += sum_sq(grad, m);
      acc_sum += sum_of(acc, m);
    }
  }
  template <typename T>
  void update(const T* diff, int64_t m) {
    if (out) update_sq += sum_sq(diff, m);
  }
  ~Partial() {
    if (!out) return;
#pragma omp critical(optserve_totals)
    {
      out->grad_sq += grad_sq;
      out->update_sq += update_sq;
      out->acc_sum += acc_sum;
    }
  }
};

template <typename T>
inline T grad_at(const T* g, const T* p, int64_t i, int flags, T wd) {
  T x = (flags & kMaximize) ? -g[i] : g[i];
  if (flags & kWeightDecay) x = std::fma(p[i], wd, x);  // grad.add(param, alpha=wd)
  return x;
}

template <typename T>
void rmsprop_range(T* p, const T* g, T* sa, T* ga, T* buf, int64_t begin, int64_t end,
                   const Scalars& s, int flags, Totals* out) {
  const T neg_lr = T(s.neg_lr), alpha = T(s.alpha), oma = T(s.one_minus_alpha);
  const T eps = T(s.eps), wd = T(s.wd), mom = T(s.momentum);
  const bool small_w = std::abs(oma) < T(0.5);
  const T lerp_coeff = small_w ? oma : oma - T(1);
  alignas(64) T tmp[kChunk];
  Partial sums{out};
  for (int64_t c = begin; c < end; c += kChunk) {
    const int64_t m = std::min(kChunk, end - c);
    for (int64_t j = 0; j < m; ++j) {
      const int64_t i = c + j;
      const T x = grad_at(g, p, i, flags, wd);
      T v = std::fma(oma * x, x, sa[i] * alpha);  // mul_(alpha).addcmul_(g, g, value=1-a)
      sa[i] = v;
      if (flags & kCentered) {
        const T a = ga[i];
        const T d = x - a;
        const T l = std::fma(lerp_coeff, d, small_w ? a : x);  // lerp_(g, 1-alpha)
        ga[i] = l;
        v = std::fma(T(-1) * l, l, v);  // addcmul(ga, ga, value=-1)
      }
      tmp[j] = v;
    }
    vsqrt(tmp, static_cast<int>(m));
    sums.inputs(g + c, sa + c, m);
    for (int64_t j = 0; j < m; ++j) {
      const int64_t i = c + j;
      const T x = grad_at(g, p, i, flags, wd);
      const T avg = tmp[j] + eps;  // add_(eps)
      const T old = p[i];
      T now;
      if (flags & kMomentum) {
        const T b = buf[i] * mom + x / avg;  // mul_(momentum).addcdiv_(g, avg)
        buf[i] = b;
        now = std::fma(b, neg_lr, old);  // add_(buf, alpha=-lr)
      } else {
        now = old + (neg_lr * x) / avg;  // addcdiv_(g, avg, value=-lr)
      }
      p[i] = now;
      tmp[j] = now - old;
    }
    sums.update(tmp, m);
  }
}

template <typename T>
void adagrad_range(T* p, const T* g, T* sum, int64_t begin, int64_t end, const Scalars& s,
                   int flags, Totals* out) {
  const T neg_clr = T(s.neg_lr), eps = T(s.eps), wd = T(s.wd);
  alignas(64) T tmp[kChunk];
  Partial sums{out};
  for (int64_t c = begin; c < end; c += kChunk) {
    const int64_t m = std::min(kChunk, end - c);
    for (int64_t j = 0; j < m; ++j) {
      const int64_t i = c + j;
      const T x = grad_at(g, p, i, flags, wd);
      const T v = std::fma(T(1) * x, x, sum[i]);  // addcmul_(g, g, value=1)
      sum[i] = v;
      tmp[j] = v;
    }
    vsqrt(tmp, static_cast<int>(m));
    sums.inputs(g + c, sum + c, m);
    for (int64_t j = 0; j < m; ++j) {
      const int64_t i = c + j;
      const T x = grad_at(g, p, i, flags, wd);
      const T std_ = tmp[j] + eps;                  // sqrt().add_(eps)
      const T old = p[i];
      const T now = old + (neg_clr * x) / std_;     // addcdiv_(g, std, value=-clr)
      p[i] = now;
      tmp[j] = now - old;
    }
    sums.update(tmp, m);
  }
}

// Runs fn over [0, n) in kChunk pieces on up to `threads` threads of the OpenMP runtime
// torch itself runs on (libgomp.so.1, already loaded by torch, so its pool is shared): a
// thread started per call took 1.5-4.5 ms to get going on a small VM, longer than the
// whole update of 1e7 elements on it, while OpenMP's threads are already running. Chunks
// are handed out one at a time, so a thread the OS holds back only delays the chunk it has.
// The caller's FP control word (MXCSR: flush-to-zero, rounding) is set on the helpers for
// the call and restored after.
template <typename F>
void parallel(int64_t n, int threads, int64_t grain, F fn) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int t = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n / grain)));
  std::atomic<int64_t> next{0};
  auto work = [&] {
    const int prev = g_mkl_local ? g_mkl_local(1) : 0;
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
      fn(c * kChunk, std::min(n, (c + 1) * kChunk));
    }
    if (g_mkl_local) g_mkl_local(prev);  // the caller's own setting back (0: MKL's global)
  };
  if (t == 1) {
    work();
    return;
  }
  const unsigned csr = _mm_getcsr();
#pragma omp parallel num_threads(t)
  {
    const unsigned own = _mm_getcsr();
    _mm_setcsr(csr);
    work();
    _mm_setcsr(own);
  }
}

}  // namespace

extern "C" {

void optserve_set_sqrt(void* vms, void* vmd, void* mkl_local_threads) {
  g_mkl_local = reinterpret_cast<mkl_local>(mkl_local_threads);
  g_sqrt_s = reinterpret_cast<vml_s>(vms);
  g_sqrt_d = reinterpret_cast<vml_d>(vmd);
}

// @fast-sqrt-api@ (native_sqrt_src.API)

// dtype: 0 float32, 1 float64. Returns 0 on success.
int optserve_rmsprop(int dtype, void* p, const void* g, void* sa, void* ga, void* buf,
                     int64_t n, double neg_lr, double alpha, double one_minus_alpha, double eps,
                     double wd, double momentum, int flags, int threads, int64_t grain,
                     double* totals) {
  if (!g_sqrt_s || !g_sqrt_d) return 1;
  const Scalars s{neg_lr, alpha, one_minus_alpha, eps, wd, momentum};
  Totals* out = reinterpret_cast<Totals*>(totals);
  if (out) *out = Totals{0.0, 0.0, 0.0};
  if (dtype == 0) {
    parallel(n, threads, grain, [&](int64_t b, int64_t e) {
      rmsprop_range<float>(static_cast<float*>(p), static_cast<const float*>(g),
                           static_cast<float*>(sa), static_cast<float*>(ga),
                           static_cast<float*>(buf), b, e, s, flags, out);
    });
  } else if (dtype == 1) {
    parallel(n, threads, grain, [&](int64_t b, int64_t e) {
      rmsprop_range<double>(static_cast<double*>(p), static_cast<const double*>(g),
                            static_cast<double*>(sa), static_cast<double*>(ga),
                            static_cast<double*>(buf), b, e, s, flags, out);
    });
  } else {
    return 2;
  }
  return 0;
}

int optserve_adagrad(int dtype, void* p, const void* g, void* sum, int64_t n, double neg_clr,
                     double eps, double wd, int flags, int threads, int64_t grain,
                     double* totals) {
  if (!g_sqrt_s || !g_sqrt_d) return 1;
  const Scalars s{neg_clr, 0.0, 0.0, eps, wd, 0.0};
  Totals* out = reinterpret_cast<Totals*>(totals);
  if (out) *out = Totals{0.0, 0.0, 0.0};
  if (dtype == 0) {
    parallel(n, threads, grain, [&](int64_t b, int64_t e) {
      adagrad_range<float>(static_cast<float*>(p), static_cast<const float*>(g),
                           static_cast<float*>(sum), b, e, s, flags, out);
    });
  } else if (dtype == 1) {
    parallel(n, threads, grain, [&](int64_t b, int64_t e) {
      adagrad_range<double>(static_cast<double*>(p), static_cast<const double*>(g),
                            static_cast<double*>(sum), b, e, s, flags, out);
    });
  } else {
    return 2;
  }
  return 0;
}

}  // extern "C"
"""

SOURCE = (_TEMPLATE
          .replace("// @fast-sqrt@ (native_sqrt_src.INTERNAL: vsqrt for float and double)\n",
                   INTERNAL)
          .replace("// @fast-sqrt-api@ (native_sqrt_src.API)\n", API))
"""The whole library's text: the kernels here, the sqrt from ``native_sqrt_src``."""
