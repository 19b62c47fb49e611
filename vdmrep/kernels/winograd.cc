// 3x3 convolutions (stride 1, one pixel of zero padding: the score net's) by Winograd's
// minimal filtering F(2x2, 3x3), forward and filter gradient, as XLA FFI custom calls.
// The input gradient is the forward of the output gradient with the filter rotated by
// 180 degrees and its channels swapped (vdmrep.kernels.onednn.conv2d).
//
// Why: oneDNN's direct convolution already runs at the machine's matmul rate
// (benchmarks/README.md), so the only way to make it faster is fewer multiply-adds.
// F(2x2, 3x3) computes a 2x2 output tile from a 4x4 input tile with 16 products per
// (input, output) channel pair where the direct form takes 36: 4/9 of the arithmetic,
// as 16 small matrix products. Winograd's transforms are additions, done here while a
// chunk of tiles is in L1/L2, so the activations cross memory once as in the direct
// form (in XLA the transforms were separate passes and the whole was 4.7x slower).
//
// Mathematics (Lavin & Gray 2016), one tile, per channel, d the 4x4 input tile (zero
// outside the image), g the 3x3 filter, Y the 2x2 output tile:
//   U = G g G^T, V = B^T d B, M[k] = sum_c V[k, c] U[k, c, :] (k = 16 tile positions),
//   Y = A^T M A, with
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  A^T = [1 1 1 0; 0 1 -1 -1],
//   G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1] (U and G^T dU G are computed in JAX).
// This equals the cross-correlation exactly in real arithmetic; in float32 it differs
// by round-off (tests/test_onednn_winograd.py bounds it against a float64 reference).
// Filter gradient: dU[k, c, o] = sum over examples and tiles V[k, c] dM[k, o] with
// dM = A dY A^T, the transpose of the output transform.
//
// Layout: NHWC activations, U and dU as [16, C, O]. Examples are shared out over the
// OpenMP threads; every output element is computed by one thread in a fixed order, and
// the filter gradient sums fixed groups of examples in order, so results do not depend
// on the thread count. C and O are compile-time constants (16, 32, 64, 128) so that the
// products keep their accumulators in AVX-512 registers.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

std::mutex& VdmrepKernelLock();  // onednn_conv.cc

#if defined(__AVX512F__)
extern "C" int VdmrepWinogradAvailable() { return 1; }
#else
extern "C" int VdmrepWinogradAvailable() { return 0; }
#endif

namespace {

#if defined(__AVX512F__)

struct Geometry {
  int64_t b, h, w, tw, tiles;  // batch, height, width, tiles per row, tiles per image
};

// V[k][r][:] (k = 4 a + b) for the input tile at `tile`: rows 2 ti - 1 ... 2 ti + 2.
template <int C>
inline void InputTile(const Geometry& g, const float* __restrict__ xe, int64_t tile, int r,
                      int rows, float* __restrict__ v) {
  const int64_t ti = tile / g.tw, tj = tile % g.tw;
  float d[4][4][C];
  for (int a = 0; a < 4; a++) {
    const int64_t y = 2 * ti - 1 + a;
    for (int b = 0; b < 4; b++) {
      const int64_t x = 2 * tj - 1 + b;
      if (y >= 0 && y < g.h && x >= 0 && x < g.w) {
        std::memcpy(d[a][b], xe + (y * g.w + x) * C, sizeof(d[a][b]));
      } else {
        std::memset(d[a][b], 0, sizeof(d[a][b]));
      }
    }
  }
  float e[4][4][C];  // B^T d
  for (int b = 0; b < 4; b++) {
#pragma omp simd
    for (int c = 0; c < C; c++) {
      e[0][b][c] = d[0][b][c] - d[2][b][c];
      e[1][b][c] = d[1][b][c] + d[2][b][c];
      e[2][b][c] = d[2][b][c] - d[1][b][c];
      e[3][b][c] = d[1][b][c] - d[3][b][c];
    }
  }
  for (int a = 0; a < 4; a++) {  // (B^T d) B
    float* va = v + (static_cast<int64_t>(4 * a) * rows + r) * C;
    const int64_t step = static_cast<int64_t>(rows) * C;
#pragma omp simd
    for (int c = 0; c < C; c++) {
      va[c] = e[a][0][c] - e[a][2][c];
      va[step + c] = e[a][1][c] + e[a][2][c];
      va[2 * step + c] = e[a][2][c] - e[a][1][c];
      va[3 * step + c] = e[a][1][c] - e[a][3][c];
    }
  }
}

// acc[i][:] += a[s * sa + i * si] * b[s * sb + (0 .. 16 kNV)] for s < steps: a block of
// kRows x kNV AVX-512 accumulators updated by one broadcast per row and step (the inner
// loop of both products below).
template <int kRows, int kNV>
inline void RankOneUpdates(__m512 (&acc)[kRows][kNV], const float* __restrict__ a, int sa,
                           int si, const float* __restrict__ b, int sb, int steps) {
#pragma GCC unroll 1
  for (int s = 0; s < steps; s++) {
    __m512 w[kNV];
#pragma GCC unroll 4
    for (int j = 0; j < kNV; j++) w[j] = _mm512_loadu_ps(b + s * sb + 16 * j);
#pragma GCC unroll 32
    for (int i = 0; i < kRows; i++) {
      const __m512 x = _mm512_set1_ps(a[s * sa + i * si]);
#pragma GCC unroll 4
      for (int j = 0; j < kNV; j++) acc[i][j] = _mm512_fmadd_ps(x, w[j], acc[i][j]);
    }
  }
}

// m[kR][O] = v[kR][C] @ u[C][O] for kR rows, output channels in blocks of kOB (16 or 32).
template <int C, int O, int kR, int kOB>
inline void TileProduct(const float* __restrict__ v, const float* __restrict__ u,
                        float* __restrict__ m) {
  constexpr int kNV = kOB / 16;
  for (int o0 = 0; o0 < O; o0 += kOB) {
    __m512 acc[kR][kNV];
    for (auto& row : acc)
      for (auto& x : row) x = _mm512_setzero_ps();
    RankOneUpdates<kR, kNV>(acc, v, 1, C, u + o0, O, C);
    for (int r = 0; r < kR; r++)
      for (int j = 0; j < kNV; j++) _mm512_storeu_ps(m + r * O + o0 + 16 * j, acc[r][j]);
  }
}

// du[C][O] += v[n][C]^T @ dm[n][O] over n rows, in blocks of kCB x kOB.
template <int C, int O, int kCB, int kOB>
inline void TileProductTN(const float* __restrict__ v, const float* __restrict__ dm, int n,
                          float* __restrict__ du) {
  constexpr int kNV = kOB / 16;
  for (int c0 = 0; c0 < C; c0 += kCB) {
    for (int o0 = 0; o0 < O; o0 += kOB) {
      __m512 acc[kCB][kNV];
      for (int i = 0; i < kCB; i++)
        for (int j = 0; j < kNV; j++)
          acc[i][j] = _mm512_loadu_ps(du + (c0 + i) * O + o0 + 16 * j);
      RankOneUpdates<kCB, kNV>(acc, v + c0, C, 1, dm + o0, O, n);
      for (int i = 0; i < kCB; i++)
        for (int j = 0; j < kNV; j++)
          _mm512_storeu_ps(du + (c0 + i) * O + o0 + 16 * j, acc[i][j]);
    }
  }
}

template <int C, int O>
void Forward(const Geometry& g, const float* x, const float* u, float* y) {
  constexpr int kOB = O >= 32 ? 32 : 16;
  constexpr int kR = kOB == 32 ? 12 : 24;  // tiles per chunk: 24 accumulators
#pragma omp parallel
  {
    std::vector<float> vbuf(16 * kR * C), mbuf(16 * kR * O);
    float* v = vbuf.data();
    float* m = mbuf.data();
#pragma omp for schedule(static)
    for (int64_t n = 0; n < g.b; n++) {
      const float* xe = x + n * g.h * g.w * C;
      float* ye = y + n * g.h * g.w * O;
      for (int64_t t0 = 0; t0 < g.tiles; t0 += kR) {
        const int rows = static_cast<int>(std::min<int64_t>(kR, g.tiles - t0));
        if (rows < kR) std::fill(vbuf.begin(), vbuf.end(), 0.f);
        for (int r = 0; r < rows; r++) InputTile<C>(g, xe, t0 + r, r, kR, v);
        for (int k = 0; k < 16; k++)
          TileProduct<C, O, kR, kOB>(v + k * kR * C, u + k * C * O, m + k * kR * O);
        for (int r = 0; r < rows; r++) {  // Y = A^T M A
          const int64_t ti = (t0 + r) / g.tw, tj = (t0 + r) % g.tw;
          auto at = [&](int a, int b) { return m + ((4 * a + b) * kR + r) * O; };
          float s[2][4][O];
          for (int b = 0; b < 4; b++) {
            const float *m0 = at(0, b), *m1 = at(1, b), *m2 = at(2, b), *m3 = at(3, b);
#pragma omp simd
            for (int o = 0; o < O; o++) {
              s[0][b][o] = m0[o] + m1[o] + m2[o];
              s[1][b][o] = m1[o] - m2[o] - m3[o];
            }
          }
          for (int a = 0; a < 2; a++) {
            const int64_t yy = 2 * ti + a;
            if (yy >= g.h) continue;
            float* out = ye + (yy * g.w + 2 * tj) * O;
#pragma omp simd
            for (int o = 0; o < O; o++) out[o] = s[a][0][o] + s[a][1][o] + s[a][2][o];
            if (2 * tj + 1 < g.w) {
#pragma omp simd
              for (int o = 0; o < O; o++) out[O + o] = s[a][1][o] - s[a][2][o] - s[a][3][o];
            }
          }
        }
      }
    }
  }
}

constexpr int64_t kGroup = 8;  // examples per partial filter gradient

template <int C, int O>
void FilterGrad(const Geometry& g, const float* x, const float* dy, float* du) {
  constexpr int kOB = O >= 32 ? 32 : 16;
  constexpr int kCB = kOB == 32 ? 8 : 16;  // 16 accumulators
  constexpr int kR = 56;                   // tiles per chunk
  constexpr int64_t kSize = 16 * C * O;
  const int64_t groups = (g.b + kGroup - 1) / kGroup;
  std::vector<float> partial(groups * kSize, 0.f);
#pragma omp parallel
  {
    std::vector<float> vbuf(16 * kR * C), dmbuf(16 * kR * O);
    float* v = vbuf.data();
    float* dm = dmbuf.data();
#pragma omp for schedule(static)
    for (int64_t grp = 0; grp < groups; grp++) {
      float* acc = partial.data() + grp * kSize;
      for (int64_t n = grp * kGroup; n < std::min(g.b, (grp + 1) * kGroup); n++) {
        const float* xe = x + n * g.h * g.w * C;
        const float* ge = dy + n * g.h * g.w * O;
        for (int64_t t0 = 0; t0 < g.tiles; t0 += kR) {
          const int rows = static_cast<int>(std::min<int64_t>(kR, g.tiles - t0));
          for (int r = 0; r < rows; r++) {
            InputTile<C>(g, xe, t0 + r, r, kR, v);
            const int64_t ti = (t0 + r) / g.tw, tj = (t0 + r) % g.tw;
            float gt[2][2][O];  // the 2x2 output-gradient tile, zero outside the image
            for (int a = 0; a < 2; a++)
              for (int b = 0; b < 2; b++) {
                const int64_t yy = 2 * ti + a, xx = 2 * tj + b;
                if (yy < g.h && xx < g.w) {
                  std::memcpy(gt[a][b], ge + (yy * g.w + xx) * O, sizeof(gt[a][b]));
                } else {
                  std::memset(gt[a][b], 0, sizeof(gt[a][b]));
                }
              }
            // dM = A dY A^T; A dY's rows: dY0, dY0 + dY1, dY0 - dY1, -dY1.
            float h[4][2][O];
            for (int b = 0; b < 2; b++) {
#pragma omp simd
              for (int o = 0; o < O; o++) {
                h[0][b][o] = gt[0][b][o];
                h[1][b][o] = gt[0][b][o] + gt[1][b][o];
                h[2][b][o] = gt[0][b][o] - gt[1][b][o];
                h[3][b][o] = -gt[1][b][o];
              }
            }
            for (int a = 0; a < 4; a++) {
              float* da = dm + (static_cast<int64_t>(4 * a) * kR + r) * O;
              const int64_t step = static_cast<int64_t>(kR) * O;
#pragma omp simd
              for (int o = 0; o < O; o++) {
                da[o] = h[a][0][o];
                da[step + o] = h[a][0][o] + h[a][1][o];
                da[2 * step + o] = h[a][0][o] - h[a][1][o];
                da[3 * step + o] = -h[a][1][o];
              }
            }
          }
          for (int k = 0; k < 16; k++)
            TileProductTN<C, O, kCB, kOB>(v + k * kR * C, dm + k * kR * O, rows,
                                          acc + k * C * O);
        }
      }
    }
    // Groups summed in order: the same result for any thread count.
#pragma omp for schedule(static)
    for (int64_t i = 0; i < kSize; i++) {
      float s = 0.f;
      for (int64_t grp = 0; grp < groups; grp++) s += partial[grp * kSize + i];
      du[i] = s;
    }
  }
}

// Calls F<C, O>::Run(args...) for C, O in {16, 32, 64, 128}; false for other sizes.
template <template <int, int> class F, typename... Args>
bool ByChannels(int64_t c, int64_t o, Args&&... args) {
  auto with_o = [&](auto cc) {
    constexpr int kC = decltype(cc)::value;
    switch (o) {
      case 16: F<kC, 16>::Run(args...); return true;
      case 32: F<kC, 32>::Run(args...); return true;
      case 64: F<kC, 64>::Run(args...); return true;
      case 128: F<kC, 128>::Run(args...); return true;
      default: return false;
    }
  };
  switch (c) {
    case 16: return with_o(std::integral_constant<int, 16>());
    case 32: return with_o(std::integral_constant<int, 32>());
    case 64: return with_o(std::integral_constant<int, 64>());
    case 128: return with_o(std::integral_constant<int, 128>());
    default: return false;
  }
}

template <int C, int O>
struct RunForward {
  static void Run(const Geometry& g, const float* x, const float* u, float* y) {
    Forward<C, O>(g, x, u, y);
  }
};

template <int C, int O>
struct RunFilterGrad {
  static void Run(const Geometry& g, const float* x, const float* dy, float* du) {
    FilterGrad<C, O>(g, x, dy, du);
  }
};

#else
template <int C, int O>
struct RunForward;  // declared only: Dispatch returns an error without AVX-512
template <int C, int O>
struct RunFilterGrad;
#endif  // __AVX512F__

// Equal B, H, W of two rank-4 shapes.
bool SameImage(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  return a.size() == 4 && b.size() == 4 && std::equal(a.begin(), a.begin() + 3, b.begin());
}

// Runs F<C, O> on the image geometry of x [B, H, W, C] under the library's lock (see
// onednn_conv.cc); an error for channel counts not compiled, or without AVX-512.
template <template <int, int> class F, typename... Ptrs>
ffi::Error Dispatch(ffi::Span<const int64_t> xd, int64_t o, Ptrs... ptrs) {
#if defined(__AVX512F__)
  const Geometry g{xd[0], xd[1], xd[2], (xd[2] + 1) / 2, ((xd[1] + 1) / 2) * ((xd[2] + 1) / 2)};
  std::lock_guard<std::mutex> lock(VdmrepKernelLock());
  if (ByChannels<F>(xd[3], o, g, ptrs...)) return ffi::Error::Success();
  return ffi::Error::InvalidArgument("vdmrep winograd: channels must be 16, 32, 64 or 128");
#else
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "vdmrep winograd: built without AVX-512");
#endif
}

// x [B, H, W, C], u [16, C, O] -> y [B, H, W, O].
ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), ud = u.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || ud.size() != 3 || ud[0] != 16 || ud[1] != xd[3] || yd.size() != 4 ||
      !SameImage(xd, yd) || yd[3] != ud[2])
    return ffi::Error::InvalidArgument(
        "vdmrep winograd: expects x [B, H, W, C], u [16, C, O] -> y [B, H, W, O]");
  return Dispatch<RunForward>(xd, ud[2], x.typed_data(), u.typed_data(), y->typed_data());
}

// x [B, H, W, C], dy [B, H, W, O] -> du [16, C, O].
ffi::Error FilterGradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> du) {
  auto xd = x.dimensions(), gd = dy.dimensions(), dd = du->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || !SameImage(xd, gd) || dd.size() != 3 ||
      dd[0] != 16 || dd[1] != xd[3] || dd[2] != gd[3])
    return ffi::Error::InvalidArgument(
        "vdmrep winograd: expects x [B, H, W, C], dy [B, H, W, O] -> du [16, C, O]");
  return Dispatch<RunFilterGrad>(xd, gd[3], x.typed_data(), dy.typed_data(),
                                 du->typed_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VdmrepWinogradForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VdmrepWinogradFilterGrad, FilterGradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
