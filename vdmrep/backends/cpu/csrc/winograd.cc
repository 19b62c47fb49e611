// 3x3 convolutions (stride 1, one pixel of zero padding: the score net's) by Winograd's
// minimal filtering F(M x M, 3x3), M = 4 or 2, forward and filter gradient, as XLA FFI
// custom calls. The input gradient is the forward of the output gradient with the
// filter rotated by 180 degrees and its channels swapped (kernels.conv2d).
//
// Why: oneDNN's direct convolution already runs near the machine's matmul rate
// (the backend's README.md), so the only way to make it faster is fewer multiply-adds.
// F(M x M, 3x3) computes an M x M output tile from a kA x kA input tile (kA = M + 2)
// with kA^2 products per (input, output) channel pair where the direct form takes 9 M^2:
// 4/9 of the arithmetic for M = 2, 1/4 for M = 4, as kA^2 small matrix products.
// Winograd's transforms are additions (and, for M = 4, multiplications by 2, 4, 5, 8),
// done here while a chunk of tiles is in L1/L2, so the activations cross memory once
// as in the direct form (in XLA the transforms were separate passes over memory and the
// whole was slower than the direct form). M = 4 is the faster in a train step (the
// backend's README.md) and the default; M = 2 has about a tenth of its round-off.
//
// Mathematics (Lavin & Gray 2016), one tile, per channel, d the kA x kA input tile
// (zero outside the image), g the 3x3 filter, Y the M x M output tile:
//   U = G g G^T, V = B^T d B, M[k] = sum_c V[k, c] U[k, c, :] (k = kA^2 tile positions),
//   Y = A^T M A, with B^T, A^T in `Tile<M>` below and G in kernels.py (U and G^T dU G are
//   computed in JAX). This equals the cross-correlation exactly in real arithmetic; in
//   float32 it differs by round-off (tests/test_winograd.py bounds it against a
//   float64 reference).
// Filter gradient: dU[k, c, o] = sum over examples and tiles V[k, c] dM[k, o] with
// dM = A dY A^T, the transpose of the output transform. The forward pass also adds a
// bias and a residual as it stores each tile, and the filter gradient returns the bias
// gradient: a ResNet block's bias, shortcut add and bias-gradient sum then cost no
// passes over memory of their own (nor does an up block's two-part shortcut sum: two
// residuals).
//
// Layout: NHWC activations, U and dU as [kA^2, C, O] (16 or 36 points: the handlers
// read M from it). Examples are shared out over the OpenMP threads; every output
// element is computed by one thread in a fixed order, and the filter gradient sums
// fixed groups of examples in order, so results do not depend on the thread count. C
// and O are compile-time constants (16, 32, 64, 128) so that the products keep their
// accumulators in AVX-512 registers.

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <type_traits>
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

inline __m512 Mul(float a, __m512 x) { return _mm512_mul_ps(_mm512_set1_ps(a), x); }
inline __m512 Fma(float a, __m512 x, __m512 y) {  // a x + y
  return _mm512_fmadd_ps(_mm512_set1_ps(a), x, y);
}
inline __m512 Fnma(float a, __m512 x, __m512 y) {  // y - a x
  return _mm512_fnmadd_ps(_mm512_set1_ps(a), x, y);
}
inline __m512 Neg(__m512 x) {  // exact, as -x in C
  return _mm512_castsi512_ps(
      _mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN)));
}

// The transforms along one axis of F(M x M, 3x3), kA = M + 2 points: the input
// transform e = B^T d, the output transform y = A^T m, and its transpose h = A g (the
// filter gradient's dM = A dY A^T), each applied to kA (or M) vectors of 16 channels.
// The 2D transforms apply them down the columns, then along the rows.
template <int M>
struct Tile;

template <>
struct Tile<2> {  // B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  A^T = [1 1 1 0; 0 1 -1 -1]
  static constexpr int kA = 4;
  static inline void In(const __m512 (&d)[4], __m512 (&e)[4]) {
    e[0] = _mm512_sub_ps(d[0], d[2]);
    e[1] = _mm512_add_ps(d[1], d[2]);
    e[2] = _mm512_sub_ps(d[2], d[1]);
    e[3] = _mm512_sub_ps(d[1], d[3]);
  }
  static inline void Out(const __m512 (&m)[4], __m512 (&y)[2]) {
    y[0] = _mm512_add_ps(_mm512_add_ps(m[0], m[1]), m[2]);
    y[1] = _mm512_sub_ps(_mm512_sub_ps(m[1], m[2]), m[3]);
  }
  static inline void OutT(const __m512 (&g)[2], __m512 (&h)[4]) {
    h[0] = g[0];
    h[1] = _mm512_add_ps(g[0], g[1]);
    h[2] = _mm512_sub_ps(g[0], g[1]);
    h[3] = Neg(g[1]);
  }
};

template <>
struct Tile<4> {
  // B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0;
  //        0 4 0 -5 0 1] (points 0, +-1, +-2, infinity; Lavin & Gray 2016).
  static constexpr int kA = 6;
  static inline void In(const __m512 (&d)[6], __m512 (&e)[6]) {
    const __m512 s12 = _mm512_add_ps(d[1], d[2]), d12 = _mm512_sub_ps(d[1], d[2]);
    const __m512 d42 = _mm512_sub_ps(d[4], d[2]), d31 = _mm512_sub_ps(d[3], d[1]);
    e[0] = Fma(4.f, d[0], Fnma(5.f, d[2], d[4]));
    e[1] = Fnma(4.f, s12, _mm512_add_ps(d[3], d[4]));
    e[2] = Fma(4.f, d12, _mm512_sub_ps(d[4], d[3]));
    e[3] = Fma(2.f, d31, d42);
    e[4] = Fnma(2.f, d31, d42);
    e[5] = Fma(4.f, d[1], Fnma(5.f, d[3], d[5]));
  }
  // A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]
  static inline void Out(const __m512 (&m)[6], __m512 (&y)[4]) {
    const __m512 p = _mm512_add_ps(m[1], m[2]), q = _mm512_sub_ps(m[1], m[2]);
    const __m512 r = _mm512_add_ps(m[3], m[4]), s = _mm512_sub_ps(m[3], m[4]);
    y[0] = _mm512_add_ps(_mm512_add_ps(m[0], p), r);
    y[1] = Fma(2.f, s, q);
    y[2] = Fma(4.f, r, p);
    y[3] = _mm512_add_ps(Fma(8.f, s, q), m[5]);
  }
  static inline void OutT(const __m512 (&g)[4], __m512 (&h)[6]) {
    const __m512 a = _mm512_add_ps(g[0], g[2]), b = _mm512_add_ps(g[1], g[3]);
    const __m512 c = Fma(4.f, g[2], g[0]), d = Mul(2.f, Fma(4.f, g[3], g[1]));
    h[0] = g[0];
    h[1] = _mm512_add_ps(a, b);
    h[2] = _mm512_sub_ps(a, b);
    h[3] = _mm512_add_ps(c, d);
    h[4] = _mm512_sub_ps(c, d);
    h[5] = g[3];
  }
};

// The kA x kA pixels (16 channels from `c` on) of the block whose corner is (y0, x0),
// of an image with `ch` channels; zeros outside the image. Two paths: a block inside the
// image loads at fixed offsets; one on the border (half the tiles of a 28x28 image)
// loads with a zero mask where a pixel is outside, from clamped coordinates (always a
// valid address), so neither tests each pixel (measured no slower than a test per pixel).
template <int kA>
inline void LoadBlock(const Geometry& g, const float* __restrict__ e, int64_t ch, int64_t y0,
                      int64_t x0, int c, __m512 (&d)[kA][kA]) {
  if (y0 >= 0 && x0 >= 0 && y0 + kA <= g.h && x0 + kA <= g.w) {
    const float* p = e + (y0 * g.w + x0) * ch + c;
    const int64_t row = g.w * ch;
#pragma GCC unroll 6
    for (int a = 0; a < kA; a++)
#pragma GCC unroll 6
      for (int b = 0; b < kA; b++) d[a][b] = _mm512_loadu_ps(p + a * row + b * ch);
    return;
  }
  int64_t xs[kA];
  __mmask16 xm[kA];
  for (int b = 0; b < kA; b++) {
    const int64_t x = x0 + b;
    xm[b] = x >= 0 && x < g.w ? 0xFFFF : 0;
    xs[b] = std::min<int64_t>(std::max<int64_t>(x, 0), g.w - 1) * ch + c;
  }
#pragma GCC unroll 6
  for (int a = 0; a < kA; a++) {
    const int64_t y = y0 + a;
    const __mmask16 ym = y >= 0 && y < g.h ? 0xFFFF : 0;
    const float* p = e + std::min<int64_t>(std::max<int64_t>(y, 0), g.h - 1) * g.w * ch;
#pragma GCC unroll 6
    for (int b = 0; b < kA; b++) d[a][b] = _mm512_maskz_loadu_ps(ym & xm[b], p + xs[b]);
  }
}

// T d T^T for the kIn x kIn block at (y0, x0) of an image with `ch` channels (zero
// outside it), 16 channels from `c` on, in registers: T down each column, then along
// each row; result (a, b) stored at dst[(kOut a + b) step]. Each pixel is loaded once
// and each value stored once (through stack copies this took as long as the products).
template <int kIn, int kOut, void (*T)(const __m512 (&)[kIn], __m512 (&)[kOut])>
inline void TransformBlock(const Geometry& g, const float* __restrict__ e, int64_t ch,
                           int64_t y0, int64_t x0, int c, float* __restrict__ dst,
                           int64_t step) {
  __m512 d[kIn][kIn];
  LoadBlock<kIn>(g, e, ch, y0, x0, c, d);
  __m512 t[kOut][kIn];  // T d: down each column
#pragma GCC unroll 6
  for (int b = 0; b < kIn; b++) {
    __m512 col[kIn], out[kOut];
    for (int a = 0; a < kIn; a++) col[a] = d[a][b];
    T(col, out);
    for (int a = 0; a < kOut; a++) t[a][b] = out[a];
  }
#pragma GCC unroll 6
  for (int a = 0; a < kOut; a++) {  // (T d) T^T: along each row
    __m512 out[kOut];
    T(t[a], out);
    for (int b = 0; b < kOut; b++) _mm512_storeu_ps(dst + (kOut * a + b) * step, out[b]);
  }
}

// V[k][r][:] = (B^T d B)[k] (k = kA a + b) for the input tile at `tile` (input rows
// M ti - 1 ...).
template <int M, int C>
inline void InputTile(const Geometry& g, const float* __restrict__ xe, int64_t tile, int r,
                      int rows, float* __restrict__ v) {
  constexpr int kA = Tile<M>::kA;
  const int64_t y0 = M * (tile / g.tw) - 1, x0 = M * (tile % g.tw) - 1;
#pragma GCC unroll 8
  for (int c = 0; c < C; c += 16)
    TransformBlock<kA, kA, Tile<M>::In>(g, xe, C, y0, x0, c, v + static_cast<int64_t>(r) * C + c,
                                        static_cast<int64_t>(rows) * C);
}

// Y = A^T M A (+ bias[o], + the residuals r0, r1 at the same pixel, each where not null)
// for the chunk's row r, written to the output tile at `tile` (clipped to the image).
template <int M, int O>
inline void OutputTile(const Geometry& g, const float* __restrict__ m, int64_t tile, int r,
                       int rows, const float* __restrict__ bias, const float* __restrict__ r0,
                       const float* __restrict__ r1, float* __restrict__ ye) {
  constexpr int kA = Tile<M>::kA;
  const int64_t y0 = M * (tile / g.tw), x0 = M * (tile % g.tw);
  const int64_t step = static_cast<int64_t>(rows) * O;
  const float* mr = m + static_cast<int64_t>(r) * O;
#pragma GCC unroll 8
  for (int o = 0; o < O; o += 16) {
    __m512 s[M][kA];  // A^T M: down each column
#pragma GCC unroll 6
    for (int b = 0; b < kA; b++) {
      __m512 col[kA], out[M];
      for (int a = 0; a < kA; a++) col[a] = _mm512_loadu_ps(mr + (kA * a + b) * step + o);
      Tile<M>::Out(col, out);
      for (int a = 0; a < M; a++) s[a][b] = out[a];
    }
#pragma GCC unroll 4
    for (int a = 0; a < M; a++) {  // (A^T M) A: along each row
      if (y0 + a >= g.h) break;
      __m512 out[M];
      Tile<M>::Out(s[a], out);
      const int64_t at = ((y0 + a) * g.w + x0) * O + o;
      for (int b = 0; b < M; b++) {
        if (x0 + b >= g.w) break;
        if (bias) out[b] = _mm512_add_ps(out[b], _mm512_loadu_ps(bias + o));
        if (r0) out[b] = _mm512_add_ps(out[b], _mm512_loadu_ps(r0 + at + b * O));
        if (r1) out[b] = _mm512_add_ps(out[b], _mm512_loadu_ps(r1 + at + b * O));
        _mm512_storeu_ps(ye + at + b * O, out[b]);
      }
    }
  }
}

// dM[k][r][:] = (A dY A^T)[k] for the output-gradient tile at `tile`.
template <int M, int O>
inline void GradTile(const Geometry& g, const float* __restrict__ ge, int64_t tile, int r,
                     int rows, float* __restrict__ dm) {
  constexpr int kA = Tile<M>::kA;
  const int64_t y0 = M * (tile / g.tw), x0 = M * (tile % g.tw);
#pragma GCC unroll 8
  for (int o = 0; o < O; o += 16)
    TransformBlock<M, kA, Tile<M>::OutT>(g, ge, O, y0, x0, o,
                                         dm + static_cast<int64_t>(r) * O + o,
                                         static_cast<int64_t>(rows) * O);
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

// TileProduct for `rows` <= kR rows (a chunk's last, partial one costs only its rows).
template <int C, int O, int kR, int kOB>
inline void TileProductRows(int rows, const float* __restrict__ v, const float* __restrict__ u,
                            float* __restrict__ m) {
  if constexpr (kR > 1) {
    if (rows < kR) return TileProductRows<C, O, kR - 1, kOB>(rows, v, u, m);
  }
  TileProduct<C, O, kR, kOB>(v, u, m);
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

// Cache lines of up to four contiguous ranges, fetched into L2 a few at a time (`Issue`)
// while the products, which touch no memory outside the chunk buffers, run: the next
// chunk's pixels and this chunk's residuals and output arrive from DRAM in the shadow of
// the arithmetic rather than stalling the transforms. Same bits as without; figures with
// operands cold, as in a train step, in the backend's README.md.
struct Lines {
  const char* start[4];
  int64_t lines[4];
  int n = 0;
  int64_t total = 0, done = 0;
  void Add(const float* p, int64_t floats) {
    if (!p || floats <= 0) return;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
    const uintptr_t e = reinterpret_cast<uintptr_t>(p + floats);
    start[n] = reinterpret_cast<const char*>(a);
    lines[n] = static_cast<int64_t>((e - a + 63) / 64);
    total += lines[n++];
  }
  // Fetches the next ceil(total / parts) lines (line `done` is `done - before` into range r).
  void Issue(int parts) {
    const int64_t end = std::min(total, done + (total + parts - 1) / parts);
    for (int64_t r = 0, before = 0; r < n && done < end; before += lines[r++])
      for (; done < end && done - before < lines[r]; done++)
        _mm_prefetch(start[r] + 64 * (done - before), _MM_HINT_T1);
  }
};

// The rows of an image (`ch` channels) a chunk of tiles [t, t + count) reads (kA x kA
// blocks from M ti - 1) or writes (M x M from M ti), as a contiguous range.
template <int M>
inline void AddRows(Lines& l, const Geometry& g, const float* image, int64_t ch, int64_t t,
                    int64_t count, bool input) {
  if (t >= g.tiles) return;
  const int64_t last = std::min(g.tiles, t + count) - 1;
  int64_t y0 = M * (t / g.tw), y1 = M * (last / g.tw) + M;  // output rows [y0, y1)
  if (input) y0 -= 1, y1 += 1;
  y0 = std::max<int64_t>(y0, 0), y1 = std::min(y1, g.h);
  l.Add(image + y0 * g.w * ch, (y1 - y0) * g.w * ch);
}

// Chunk sizes (tiles whose V and M share the cache at once), measured best; F(4x4)'s 7
// also divides a 28x28 image's 49 tiles (with 6, 5 of 54 row products were padding;
// the backend's README.md, "Convolutions alone").
template <int M, int O>
constexpr int ForwardRows() {
  return M == 4 ? 7 : (O >= 32 ? 12 : 24);
}

// y = conv(x) (+ bias [O], + residuals res[0], res[1] [B, H, W, O], each where not null).
template <int M, int C, int O>
void Forward(const Geometry& g, const float* x, const float* u, const float* bias,
             const float* const* res, float* y) {
  constexpr int kK = Tile<M>::kA * Tile<M>::kA;
  constexpr int kOB = O >= 32 ? 32 : 16;
  constexpr int kR = ForwardRows<M, O>();
#pragma omp parallel
  {
    std::vector<float> vbuf(kK * kR * C), mbuf(kK * kR * O);
    float* v = vbuf.data();
    float* m = mbuf.data();
#pragma omp for schedule(static)
    for (int64_t n = 0; n < g.b; n++) {
      const float* xe = x + n * g.h * g.w * C;
      float* ye = y + n * g.h * g.w * O;
      const float* r0 = res[0] ? res[0] + n * g.h * g.w * O : nullptr;
      const float* r1 = res[1] ? res[1] + n * g.h * g.w * O : nullptr;
      for (int64_t t0 = 0; t0 < g.tiles; t0 += kR) {
        const int rows = static_cast<int>(std::min<int64_t>(kR, g.tiles - t0));
        for (int r = 0; r < rows; r++) InputTile<M, C>(g, xe, t0 + r, r, kR, v);
        Lines next;  // this chunk's residuals and output, the next chunk's pixels
        AddRows<M>(next, g, r0, O, t0, rows, false);
        AddRows<M>(next, g, r1, O, t0, rows, false);
        AddRows<M>(next, g, ye, O, t0, rows, false);
        if (t0 + kR < g.tiles) AddRows<M>(next, g, xe, C, t0 + kR, kR, true);
        else if (n + 1 < g.b) AddRows<M>(next, g, xe + g.h * g.w * C, C, 0, kR, true);
        for (int k = 0; k < kK; k++) {
          next.Issue(kK);
          TileProductRows<C, O, kR, kOB>(rows, v + k * kR * C, u + k * C * O, m + k * kR * O);
        }
        for (int r = 0; r < rows; r++) OutputTile<M, O>(g, m, t0 + r, r, kR, bias, r0, r1, ye);
      }
    }
  }
}

constexpr int64_t kGroup = 8;  // examples per partial filter gradient

// du as above, and db[o] = sum of dy[..., o] (the bias gradient): point (1, 1) of
// dM = A dY A^T is the sum of the tile's dY (row 1 of A is all ones), so it is read off
// the transformed chunk instead of a separate pass over dy.
template <int M, int C, int O>
void FilterGrad(const Geometry& g, const float* x, const float* dy, float* du, float* db) {
  constexpr int kK = Tile<M>::kA * Tile<M>::kA;
  constexpr int kSum = Tile<M>::kA + 1;  // point (1, 1)
  constexpr int kOB = O >= 32 ? 32 : 16;
  constexpr int kCB = kOB == 32 ? 8 : 16;  // 16 accumulators
  constexpr int kR = M == 4 ? 28 : 56;     // tiles per chunk
  constexpr int64_t kSize = kK * C * O;
  const int64_t groups = (g.b + kGroup - 1) / kGroup;
  std::vector<float> partial(groups * kSize, 0.f), partial_db(groups * O, 0.f);
#pragma omp parallel
  {
    std::vector<float> vbuf(kK * kR * C), dmbuf(kK * kR * O);
    float* v = vbuf.data();
    float* dm = dmbuf.data();
#pragma omp for schedule(static)
    for (int64_t grp = 0; grp < groups; grp++) {
      float* acc = partial.data() + grp * kSize;
      float* acc_db = partial_db.data() + grp * O;
      for (int64_t n = grp * kGroup; n < std::min(g.b, (grp + 1) * kGroup); n++) {
        const float* xe = x + n * g.h * g.w * C;
        const float* ge = dy + n * g.h * g.w * O;
        for (int64_t t0 = 0; t0 < g.tiles; t0 += kR) {
          const int rows = static_cast<int>(std::min<int64_t>(kR, g.tiles - t0));
          for (int r = 0; r < rows; r++) {
            InputTile<M, C>(g, xe, t0 + r, r, kR, v);
            GradTile<M, O>(g, ge, t0 + r, r, kR, dm);
          }
          for (int r = 0; r < rows; r++) {
            const float* d = dm + (kSum * kR + r) * O;
#pragma omp simd
            for (int o = 0; o < O; o++) acc_db[o] += d[o];
          }
          Lines next;  // the next chunk's pixels and output gradient
          if (t0 + kR < g.tiles) {
            AddRows<M>(next, g, xe, C, t0 + kR, kR, true);
            AddRows<M>(next, g, ge, O, t0 + kR, kR, false);
          } else if (n + 1 < g.b) {
            AddRows<M>(next, g, xe + g.h * g.w * C, C, 0, kR, true);
            AddRows<M>(next, g, ge + g.h * g.w * O, O, 0, kR, false);
          }
          for (int k = 0; k < kK; k++) {
            next.Issue(kK);
            TileProductTN<C, O, kCB, kOB>(v + k * kR * C, dm + k * kR * O, rows,
                                          acc + k * C * O);
          }
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
#pragma omp for schedule(static)
    for (int o = 0; o < O; o++) {
      float s = 0.f;
      for (int64_t grp = 0; grp < groups; grp++) s += partial_db[grp * O + o];
      db[o] = s;
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
  static void Run(int m, const Geometry& g, const float* x, const float* u, const float* bias,
                  const float* const* res, float* y) {
    m == 4 ? Forward<4, C, O>(g, x, u, bias, res, y) : Forward<2, C, O>(g, x, u, bias, res, y);
  }
};

template <int C, int O>
struct RunFilterGrad {
  static void Run(int m, const Geometry& g, const float* x, const float* dy, float* du,
                  float* db) {
    m == 4 ? FilterGrad<4, C, O>(g, x, dy, du, db) : FilterGrad<2, C, O>(g, x, dy, du, db);
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

// The output tile size M of a transformed filter's (or its gradient's) kA^2 points.
int TileSize(int64_t points) { return points == 16 ? 2 : points == 36 ? 4 : 0; }

// Runs F<C, O> with output tiles of M x M on the image geometry of x [B, H, W, C] under
// the library's lock (see onednn_conv.cc); an error for channel counts not compiled, or
// without AVX-512.
template <template <int, int> class F, typename... Ptrs>
ffi::Error Dispatch(ffi::Span<const int64_t> xd, int m, int64_t o, Ptrs... ptrs) {
#if defined(__AVX512F__)
  const int64_t th = (xd[1] + m - 1) / m, tw = (xd[2] + m - 1) / m;
  const Geometry g{xd[0], xd[1], xd[2], tw, th * tw};
  std::lock_guard<std::mutex> lock(VdmrepKernelLock());
  if (ByChannels<F>(xd[3], o, m, g, ptrs...)) return ffi::Error::Success();
  return ffi::Error::InvalidArgument("vdmrep winograd: channels must be 16, 32, 64 or 128");
#else
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "vdmrep winograd: built without AVX-512");
#endif
}

// x [B, H, W, C], u [K, C, O], bias [O] or [0], residuals r0, r1 [B, H, W, O] or [0] ->
// y [B, H, W, O] = conv(x) + bias + r0 + r1 (an empty operand is left out); K = 16 for
// F(2x2, 3x3), 36 for F(4x4, 3x3). The bias and the residuals (a ResNet block's
// shortcut, or an up block's two shortcut parts) are added as each output tile is
// stored: no pass of their own over y.
ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                       ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> r0,
                       ffi::Buffer<ffi::F32> r1, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), ud = u.dimensions(), yd = y->dimensions();
  auto bd = bias.dimensions();
  const bool has_bias = bias.element_count() > 0;
  auto bad_residual = [&](const ffi::Buffer<ffi::F32>& r) {
    auto rd = r.dimensions();
    return r.element_count() > 0 && !(SameImage(rd, yd) && rd[3] == yd[3]);
  };
  if (xd.size() != 4 || ud.size() != 3 || !TileSize(ud[0]) || ud[1] != xd[3] ||
      yd.size() != 4 || !SameImage(xd, yd) || yd[3] != ud[2] ||
      (has_bias && (bd.size() != 1 || bd[0] != yd[3])) || bad_residual(r0) ||
      bad_residual(r1))
    return ffi::Error::InvalidArgument(
        "vdmrep winograd: expects x [B, H, W, C], u [16 or 36, C, O], bias [O] or [0], "
        "residuals [B, H, W, O] or [0] -> y [B, H, W, O]");
  const float* res[2] = {r0.element_count() ? r0.typed_data() : nullptr,
                         r1.element_count() ? r1.typed_data() : nullptr};
  return Dispatch<RunForward>(xd, TileSize(ud[0]), ud[2], x.typed_data(), u.typed_data(),
                              has_bias ? bias.typed_data() : nullptr,
                              static_cast<const float* const*>(res), y->typed_data());
}

// x [B, H, W, C], dy [B, H, W, O] -> du [K, C, O] (K = 16 or 36, as the forward's u) and
// db [O] (dy summed over B, H, W: the bias gradient).
ffi::Error FilterGradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> du, ffi::ResultBuffer<ffi::F32> db) {
  auto xd = x.dimensions(), gd = dy.dimensions(), dd = du->dimensions();
  auto bd = db->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || !SameImage(xd, gd) || dd.size() != 3 ||
      !TileSize(dd[0]) || dd[1] != xd[3] || dd[2] != gd[3] || bd.size() != 1 ||
      bd[0] != gd[3])
    return ffi::Error::InvalidArgument(
        "vdmrep winograd: expects x [B, H, W, C], dy [B, H, W, O] -> du [16 or 36, C, O], "
        "db [O]");
  return Dispatch<RunFilterGrad>(xd, TileSize(dd[0]), gd[3], x.typed_data(), dy.typed_data(),
                                 du->typed_data(), db->typed_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VdmrepWinogradForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VdmrepWinogradFilterGrad, FilterGradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
