"""The C++ of the native kernel's float32 sqrt (MKL's algorithm, see ``native_sqrt``) and
of its exhaustive check; spliced into ``native_src.SOURCE`` (one library, one build)."""

INTERNAL = r"""
// MKL's float sqrt as its SSE kernel for CPUs other than Intel's computes it (the one that
// runs on the AMD machines we measured): an rsqrtps estimate, then one Newton-Raphson /
// Goldschmidt correction in separate multiplies and adds. Same instructions, same
// roundings, so the same bits on the CPU that runs both, at a fraction of MKL's cost (it
// calls this per 16 elements with spills around it). Lanes MKL sends to its rare path
// (zero, subnormal, negative, inf, NaN, within 2^-12 of FLT_MAX) go to MKL itself. Used only
// after optserve_sqrt_check found it equal to MKL for every normal float on this machine
// (see native_sqrt.py), and only while MXCSR is what MKL sets for its own work.
std::atomic<int> g_fast_sqrt{0};
constexpr unsigned kMklCsr = 0x1f80;  // all exceptions masked, round to nearest, no FTZ/DAZ

#ifdef __AVX2__
constexpr int kFastSqrt = 1;
// The 8 results in place; or, if any lane is one MKL treats as special, nothing and false.
inline bool sqrt8(float* x) {
  const __m256 v = _mm256_loadu_ps(x);
  const __m256i special = _mm256_cmpgt_epi32(
      _mm256_add_epi32(_mm256_castps_si256(v), _mm256_set1_epi32(0x7f800000)),
      _mm256_set1_epi32(static_cast<int>(0xfefff000u)));
  if (_mm256_movemask_epi8(special)) return false;
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256 y = _mm256_rsqrt_ps(v);
  const __m256 s = _mm256_mul_ps(v, y);
  const __m256 h = _mm256_mul_ps(y, half);
  const __m256 e = _mm256_sub_ps(half, _mm256_mul_ps(s, h));
  const __m256 s1 = _mm256_add_ps(_mm256_mul_ps(s, e), s);
  const __m256 h1 = _mm256_add_ps(_mm256_mul_ps(h, e), h);
  const __m256 r = _mm256_sub_ps(v, _mm256_mul_ps(s1, s1));
  _mm256_storeu_ps(x, _mm256_add_ps(_mm256_mul_ps(r, h1), s1));
  return true;
}

void fast_sqrt(float* x, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    if (!sqrt8(x + i)) g_sqrt_s(8, x + i, x + i, kVmlMode);
  }
  if (i < n) g_sqrt_s(n - i, x + i, x + i, kVmlMode);
}
#else
constexpr int kFastSqrt = 0;
void fast_sqrt(float* x, int n) { g_sqrt_s(n, x, x, kVmlMode); }
#endif

inline void vsqrt(float* x, int n) {
  if (g_fast_sqrt.load(std::memory_order_relaxed) && (_mm_getcsr() & 0xffc0u) == kMklCsr) {
    fast_sqrt(x, n);
  } else {
    g_sqrt_s(n, x, x, kVmlMode);
  }
}
inline void vsqrt(double* x, int n) { g_sqrt_d(n, x, x, kVmlMode); }
"""
"""Inside the library's anonymous namespace: ``vsqrt`` for float (fast when proved, else
MKL) and double (MKL)."""

API = r"""
// Whether this build has the fast float sqrt; on > 0 turns it on, 0 off, < 0 only asks.
int optserve_fast_sqrt(int on) {
  if (on >= 0) g_fast_sqrt.store(on > 0 && kFastSqrt);
  return kFastSqrt;
}

// Every float whose bits are in [lo, hi) through fast_sqrt and through MKL in 64 Ki runs
// (ATen's calls are as long or longer) on `threads` threads; the number that differ in
// any bit. For the one-time exhaustive check of fast_sqrt on this machine.
int64_t optserve_sqrt_check(uint64_t lo, uint64_t hi, int threads) {
  if (!g_sqrt_s) return -1;
  constexpr uint64_t kRun = 1 << 16;
  std::atomic<int64_t> bad{0};
  std::atomic<uint64_t> next{lo};
  auto work = [&] {
    const int prev = g_mkl_local ? g_mkl_local(1) : 0;
    std::vector<float> mkl(kRun), ours(kRun);
    for (uint64_t b = next.fetch_add(kRun); b < hi; b = next.fetch_add(kRun)) {
      const uint64_t m = std::min(kRun, hi - b);
      for (uint64_t i = 0; i < m; ++i) {
        const uint32_t bits = static_cast<uint32_t>(b + i);
        std::memcpy(&mkl[i], &bits, 4);
      }
      std::memcpy(ours.data(), mkl.data(), m * 4);
      g_sqrt_s(static_cast<long long>(m), mkl.data(), mkl.data(), kVmlMode);
      fast_sqrt(ours.data(), static_cast<int>(m));
      int64_t differ = 0;
      for (uint64_t i = 0; i < m; ++i) differ += std::memcmp(&mkl[i], &ours[i], 4) != 0;
      bad += differ;
    }
    if (g_mkl_local) g_mkl_local(prev);
  };
  const unsigned csr = _mm_getcsr();
  _mm_setcsr(kMklCsr);
  std::vector<std::thread> pool;
  for (int k = 1; k < threads; ++k) pool.emplace_back([&] { _mm_setcsr(kMklCsr); work(); });
  work();
  for (auto& th : pool) th.join();
  _mm_setcsr(csr);
  return bad.load();
}

"""
"""``extern "C"``: switch the fast sqrt on/off, and compare it with MKL over a range of bits."""
