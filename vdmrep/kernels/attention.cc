// Single-head softmax attention, forward and backward, as two XLA FFI custom calls.
//
// Why: at 28x28 the score net and encoder attend over N = 784 positions with only
// C = 16..32 channels, so XLA's form (even one example at a time, layers.attention)
// spends most of its time writing and re-reading [N, N] logits, weights and their
// gradients (2.4 MB per example: past L2). Here the [N, N] matrices exist only as
// [T, N] row tiles (T = 64 queries, 200 KB) that stay in L2 between the products and
// the softmax; the backward pass recomputes each tile from q, k and the forward's
// log-normaliser instead of storing the weights. The products are oneDNN's sgemm
// (single-threaded inside the OpenMP loop). The forward pass shares (example, row
// tile) pairs out over the threads; the backward pass whole examples, so each
// example's dk / dv accumulators belong to one thread. Either way every output element
// is computed by one thread in a fixed order: results do not depend on thread count.
//
// Mathematics (per example, s = scale * q k^T, scale = C^-1/2, P = softmax_rows(s)):
//   forward:  out = P v,  lse = logsumexp_rows(s)
//   backward: P = exp(s - lse), dv = P^T dout, dP = dout v^T,
//             dS = P * (dP - rowsum(dout * out)), dq = scale dS k, dk = scale dS^T q.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#include "oneapi/dnnl/dnnl.h"
#include "vec_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using vdmrep::ExpNonPositive;

std::mutex& VdmrepKernelLock();  // onednn_conv.cc

namespace {

constexpr int64_t kTile = 64;  // query rows per tile: a [64, 784] f32 tile is 200 KB

// C[m, n] = alpha * op(A) op(B) + beta * C, row-major (oneDNN's sgemm convention);
// a failure is recorded in `failed` (threads cannot return an error from the loop).
inline void Gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc,
                 std::atomic<bool>& failed) {
  if (dnnl_sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) != dnnl_success)
    failed = true;
}

ffi::Error Status(const std::atomic<bool>& failed) {
  return failed ? ffi::Error::Internal("vdmrep attention: oneDNN sgemm failed")
                : ffi::Error::Success();
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
  const int64_t bsz = d[0], n = d[1], c = d[2];
  const float scale = 1.f / std::sqrt(static_cast<float>(c));
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  std::lock_guard<std::mutex> lock(VdmrepKernelLock());  // see onednn_conv.cc
  std::atomic<bool> failed(false);
#pragma omp parallel
  {
    std::vector<float> s(kTile * n), inv(kTile);
    // Row tiles are independent in the forward pass: (example, tile) pairs are shared
    // out, so a batch of one still uses every thread (the sampler's small batches).
    const int64_t tiles = (n + kTile - 1) / kTile;
#pragma omp for schedule(static)
    for (int64_t bt = 0; bt < bsz * tiles; ++bt) {
      const int64_t b = bt / tiles, r0 = (bt % tiles) * kTile;
      const float *qb = qp + b * n * c, *kb = kp + b * n * c, *vb = vp + b * n * c;
      const int64_t t = std::min(kTile, n - r0);
      Gemm('N', 'T', t, n, c, scale, qb + r0 * c, c, kb, c, 0.f, s.data(), n, failed);
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
      Gemm('N', 'N', t, c, n, 1.f, s.data(), n, vb, c, 0.f, ob, c, failed);
      for (int64_t i = 0; i < t; ++i)
        for (int64_t j = 0; j < c; ++j) ob[i * c + j] *= inv[i];
    }
  }
  return Status(failed);
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
  const int64_t bsz = d[0], n = d[1], c = d[2];
  const float scale = 1.f / std::sqrt(static_cast<float>(c));
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *outp = out.typed_data(), *lp = lse.typed_data(), *dop = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  std::lock_guard<std::mutex> lock(VdmrepKernelLock());  // see onednn_conv.cc
  std::atomic<bool> failed(false);
#pragma omp parallel
  {
    std::vector<float> p(kTile * n), dp(kTile * n), rowdot(kTile);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < bsz; ++b) {
      const int64_t o = b * n * c;
      const float *qb = qp + o, *kb = kp + o, *vb = vp + o, *ob = outp + o, *gb = dop + o;
      const float* lb = lp + b * n;
      float *dqb = dqp + o, *dkb = dkp + o, *dvb = dvp + o;
      for (int64_t r0 = 0; r0 < n; r0 += kTile) {
        const int64_t t = std::min(kTile, n - r0);
        const float beta = r0 == 0 ? 0.f : 1.f;  // the first tile initialises dk, dv
        // The forward's weights, recomputed: P = exp(scale q k^T - lse).
        Gemm('N', 'T', t, n, c, scale, qb + r0 * c, c, kb, c, 0.f, p.data(), n, failed);
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
        Gemm('T', 'N', n, c, t, 1.f, p.data(), n, gb + r0 * c, c, beta, dvb, c, failed);
        Gemm('N', 'T', t, n, c, 1.f, gb + r0 * c, c, vb, c, 0.f, dp.data(), n, failed);
        for (int64_t i = 0; i < t; ++i) {
          float *pr = p.data() + i * n, *dr = dp.data() + i * n;
          const float rd = rowdot[i];
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) dr[j] = pr[j] * (dr[j] - rd);
        }
        Gemm('N', 'N', t, c, n, scale, dp.data(), n, kb, c, 0.f, dqb + r0 * c, c, failed);
        Gemm('T', 'N', n, c, t, scale, dp.data(), n, qb + r0 * c, c, beta, dkb, c, failed);
      }
    }
  }
  return Status(failed);
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
