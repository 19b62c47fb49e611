// Single-head softmax attention, forward and backward, as two XLA FFI custom calls.
//
// Why: at 28x28 the score net and encoder attend over N = 784 positions with only
// C = 16..32 channels, so XLA's form (even one example at a time, reference.attention)
// spends most of its time writing and re-reading [N, N] logits, weights and their
// gradients (2.4 MB per example: past L2). Here the [N, N] matrices exist only as
// [T, N] row tiles (T = 64 queries, 200 KB) that stay in L2 between the products and
// the softmax; the backward pass recomputes each tile from q, k and the forward's
// log-normaliser instead of storing the weights. The products are register-blocked
// loops (`Product`, single-threaded inside the OpenMP loop); oneDNN's sgemm, which
// packs its operands on every call, was slower at C = 16 and no faster at C = 32
// (the backend's README.md, "Attention alone"). The forward pass shares (example, row
// tile) pairs out over the threads; the backward pass whole examples, so each
// example's dk / dv accumulators belong to one thread. Either way every output element
// is computed by one thread in a fixed order: results do not depend on thread count.
//
// Mathematics (per example, s = scale * q k^T, scale = C^-1/2, P = softmax_rows(s)):
//   forward:  out = P v,  lse = logsumexp_rows(s)
//   backward: P = exp(s - lse), dv = P^T dout, dP = dout v^T,
//             dS = P * (dP - rowsum(dout * out)), dq = scale dS k, dk = scale dS^T q.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <vector>

#include "vec_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using vdmrep::ExpNonPositive;

std::mutex& VdmrepKernelLock();  // onednn_conv.cc

namespace {

constexpr int64_t kTile = 64;  // query rows per tile: a [64, 784] f32 tile is 200 KB

// 16 floats as one value (GCC's vector extension): one AVX-512 register where the
// kernels are compiled for it (-march=native), two AVX2 registers elsewhere.
typedef float V16 __attribute__((vector_size(64)));
typedef float V16u __attribute__((vector_size(64), aligned(4)));
inline V16 Load(const float* p) { return *reinterpret_cast<const V16u*>(p); }
inline void Store(float* p, V16 v) { *reinterpret_cast<V16u*>(p) = v; }

#if defined(__AVX512F__)
constexpr int kRows = 12;  // 24 accumulators of the 32 registers
#else
constexpr int kRows = 4;
#endif

// The left operand of `Product`: a(i, s) = p[i * row + s * step] (a^T costs nothing).
struct Strided {
  const float* p;
  int64_t row, step;
};

// c[i, j] (= or +=) alpha sum_s a(i, s) b[s, j] for R rows and 16 NV columns (NV = 0:
// one column, scalar): R x NV accumulators, one broadcast of a(i, s) per row and step,
// the k steps in order.
template <int R, int NV>
inline void Block(int64_t k, float alpha, Strided a, const float* __restrict__ b, int64_t ldb,
                  bool accumulate, float* __restrict__ c, int64_t ldc) {
  if constexpr (NV == 0) {
    for (int i = 0; i < R; i++) {
      float acc = 0.f;
      for (int64_t s = 0; s < k; s++) acc += a.p[i * a.row + s * a.step] * b[s * ldb];
      c[i * ldc] = accumulate ? c[i * ldc] + alpha * acc : alpha * acc;
    }
  } else {
    V16 acc[R][NV];
    for (int i = 0; i < R; i++)
      for (int j = 0; j < NV; j++) acc[i][j] = V16{};
#pragma GCC unroll 1
    for (int64_t s = 0; s < k; s++) {
      V16 w[NV];
      for (int j = 0; j < NV; j++) w[j] = Load(b + s * ldb + 16 * j);
#pragma GCC unroll 12
      for (int i = 0; i < R; i++) {
        const float x = a.p[i * a.row + s * a.step];
        for (int j = 0; j < NV; j++) acc[i][j] += x * w[j];
      }
    }
    for (int i = 0; i < R; i++)
      for (int j = 0; j < NV; j++) {
        float* p = c + i * ldc + 16 * j;
        Store(p, accumulate ? Load(p) + alpha * acc[i][j] : alpha * acc[i][j]);
      }
  }
}

// c [m, n] (= or +=) alpha a b, b [k, n] with rows ldb apart, c with rows ldc apart.
// Single-threaded (called inside the OpenMP loops): every c element is one thread's sum
// over s in order, whatever the thread count.
inline void Product(int64_t m, int64_t n, int64_t k, float alpha, Strided a, const float* b,
                    int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  int64_t i = 0;
  auto rows = [&](auto r) {
    constexpr int kR = decltype(r)::value;
    for (; i + kR <= m; i += kR) {
      const Strided ai{a.p + i * a.row, a.row, a.step};
      float* ci = c + i * ldc;
      int64_t j = 0;
      for (; j + 32 <= n; j += 32) Block<kR, 2>(k, alpha, ai, b + j, ldb, accumulate, ci + j, ldc);
      for (; j + 16 <= n; j += 16) Block<kR, 1>(k, alpha, ai, b + j, ldb, accumulate, ci + j, ldc);
      for (; j < n; j++) Block<kR, 0>(k, alpha, ai, b + j, ldb, accumulate, ci + j, ldc);
    }
  };
  rows(std::integral_constant<int, kRows>());
  rows(std::integral_constant<int, 4>());
  rows(std::integral_constant<int, 1>());
}

// at [c, n] = a [n, c]^T: each channel's n entries contiguous (the right operand of the
// [T, N] products).
inline void Transpose(const float* a, int64_t n, int64_t c, float* at) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < c; ++j) at[j * n + i] = a[i * c + j];
}

// q, k, v: [B, N, C] -> out [B, N, C], lse [B, N].
void Forward(const float* qp, const float* kp, const float* vp, float* op, float* lp,
             int64_t bsz, int64_t n, int64_t c) {
  const float scale = 1.f / std::sqrt(static_cast<float>(c));
#pragma omp parallel
  {
    std::vector<float> s(kTile * n), inv(kTile), kt(c * n);
    int64_t transposed = -1;  // the example whose k^T is in kt
    // Row tiles are independent in the forward pass: (example, tile) pairs are shared
    // out, so a batch of one still uses every thread (the sampler's small batches).
    const int64_t tiles = (n + kTile - 1) / kTile;
#pragma omp for schedule(static)
    for (int64_t bt = 0; bt < bsz * tiles; ++bt) {
      const int64_t b = bt / tiles, r0 = (bt % tiles) * kTile;
      const float *qb = qp + b * n * c, *kb = kp + b * n * c, *vb = vp + b * n * c;
      if (b != transposed) Transpose(kb, n, c, kt.data()), transposed = b;
      const int64_t t = std::min(kTile, n - r0);
      Product(t, n, c, scale, {qb + r0 * c, c, 1}, kt.data(), n, false, s.data(), n);
      for (int64_t i = 0; i < t; ++i) {
        float* row = s.data() + i * n;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < n; ++j) m = m > row[j] ? m : row[j];
        float l = 0.f;
#pragma omp simd reduction(+ : l)
        for (int64_t j = 0; j < n; ++j) {
          row[j] = ExpNonPositive(row[j] - m);
          l += row[j];
        }
        lp[b * n + r0 + i] = m + std::log(l);
        inv[i] = 1.f / l;
      }
      // Unnormalised weights times v, then each [C] output row divided by its sum
      // (one multiply per channel rather than per position).
      float* ob = op + (b * n + r0) * c;
      Product(t, c, n, 1.f, {s.data(), n, 1}, vb, c, false, ob, c);
      for (int64_t i = 0; i < t; ++i)
        for (int64_t j = 0; j < c; ++j) ob[i * c + j] *= inv[i];
    }
  }
}

// q, k, v, out: [B, N, C], lse: [B, N], dout: [B, N, C] -> dq, dk, dv [B, N, C].
void Backward(const float* qp, const float* kp, const float* vp, const float* outp,
              const float* lp, const float* dop, float* dqp, float* dkp, float* dvp,
              int64_t bsz, int64_t n, int64_t c) {
  const float scale = 1.f / std::sqrt(static_cast<float>(c));
#pragma omp parallel
  {
    std::vector<float> p(kTile * n), dp(kTile * n), rowdot(kTile), kt(c * n), vt(c * n);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < bsz; ++b) {
      const int64_t o = b * n * c;
      const float *qb = qp + o, *kb = kp + o, *vb = vp + o, *ob = outp + o, *gb = dop + o;
      const float* lb = lp + b * n;
      float *dqb = dqp + o, *dkb = dkp + o, *dvb = dvp + o;
      Transpose(kb, n, c, kt.data());
      Transpose(vb, n, c, vt.data());
      for (int64_t r0 = 0; r0 < n; r0 += kTile) {
        const int64_t t = std::min(kTile, n - r0);
        const bool more = r0 > 0;  // the first tile initialises dk, dv; the others add
        // The forward's weights, recomputed: P = exp(scale q k^T - lse).
        Product(t, n, c, scale, {qb + r0 * c, c, 1}, kt.data(), n, false, p.data(), n);
        for (int64_t i = 0; i < t; ++i) {
          float* row = p.data() + i * n;
          const float shift = lb[r0 + i];
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) row[j] = ExpNonPositive(row[j] - shift);
          // sum_j P_ij dP_ij = <dout_i, out_i>: the softmax backward's row term.
          float acc = 0.f;
          const float *gi = gb + (r0 + i) * c, *oi = ob + (r0 + i) * c;
#pragma omp simd reduction(+ : acc)
          for (int64_t j = 0; j < c; ++j) acc += gi[j] * oi[j];
          rowdot[i] = acc;
        }
        Product(n, c, t, 1.f, {p.data(), 1, n}, gb + r0 * c, c, more, dvb, c);  // P^T dout
        Product(t, n, c, 1.f, {gb + r0 * c, c, 1}, vt.data(), n, false, dp.data(), n);
        for (int64_t i = 0; i < t; ++i) {
          float *pr = p.data() + i * n, *dr = dp.data() + i * n;
          const float rd = rowdot[i];
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) dr[j] = pr[j] * (dr[j] - rd);
        }
        Product(t, c, n, scale, {dp.data(), n, 1}, kb, c, false, dqb + r0 * c, c);  // dS k
        Product(n, c, t, scale, {dp.data(), 1, n}, qb + r0 * c, c, more, dkb, c);  // dS^T q
      }
    }
  }
}

bool Same(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// q, k, v: [B, N, C] -> out [B, N, C], lse [B, N].
ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                       ffi::ResultBuffer<ffi::F32> lse) {
  auto d = q.dimensions();
  if (d.size() != 3 || !Same(k.dimensions(), d) || !Same(v.dimensions(), d))
    return ffi::Error::InvalidArgument("vdmrep attention: q, k, v must be equal [B, N, C]");
  std::lock_guard<std::mutex> lock(VdmrepKernelLock());  // see onednn_conv.cc
  Forward(q.typed_data(), k.typed_data(), v.typed_data(), out->typed_data(), lse->typed_data(),
          d[0], d[1], d[2]);
  return ffi::Error::Success();
}

// q, k, v, out: [B, N, C], lse: [B, N], dout: [B, N, C] -> dq, dk, dv [B, N, C].
ffi::Error BackwardImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out,
                        ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                        ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                        ffi::ResultBuffer<ffi::F32> dv) {
  auto d = q.dimensions();
  auto ld = lse.dimensions();
  if (d.size() != 3 || !Same(k.dimensions(), d) || !Same(v.dimensions(), d) ||
      !Same(out.dimensions(), d) || !Same(dout.dimensions(), d) || ld.size() != 2 ||
      ld[0] != d[0] || ld[1] != d[1])
    return ffi::Error::InvalidArgument(
        "vdmrep attention backward: q, k, v, out, dout [B, N, C] and lse [B, N] expected");
  std::lock_guard<std::mutex> lock(VdmrepKernelLock());  // see onednn_conv.cc
  Backward(q.typed_data(), k.typed_data(), v.typed_data(), out.typed_data(), lse.typed_data(),
           dout.typed_data(), dq->typed_data(), dk->typed_data(), dv->typed_data(), d[0], d[1],
           d[2]);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VdmrepAttentionForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VdmrepAttentionBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
