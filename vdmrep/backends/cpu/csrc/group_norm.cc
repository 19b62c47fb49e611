// GroupNorm with the ResNet block's extras (a per-example channel shift before it, FiLM
// after it, swish last), forward and backward, as XLA FFI custom calls: one pair for an
// input tensor, one for an input given as two channel parts (see `Input`).
//
// Why: XLA computes the folded norm (reference.group_norm) as a reduction pass and an
// elementwise pass over the whole [B, H, W, C] tensor, and its backward as two more;
// at batch 64 each pass streams 3-13 MB from main memory (the backend's README.md).
// Here each example (H W C floats: 50-200 KB at 28x28, in L2) is read from memory
// once: its statistics, the group arithmetic and the output (or, backward, the
// reductions and dx) are all computed while it is in cache. Examples are
// shared out over the OpenMP threads; each output element is computed by one thread
// in a fixed order, so results do not depend on the thread count. Statistics are
// accumulated in double, two-pass (mean, then centred squares).
//
// Mathematics (one example; channel c in group g of G channels; n = H W positions):
//   forward:  m_g, v_g = mean and variance of x + shift_c over g's n G values,
//             r_g = (v_g + eps)^-1/2,  xhat = (x + shift_c - m_g) r_g = (x - mu_c) r_g
//             with mu_c = m_g - shift_c,  u = xhat scale_c + bias_c,
//             z = u (1 + fs_c) + fb_c,  y = swish(z) (or z).   Saved: mu, r per channel.
//   backward: dz = dy swish'(z),  A_c = sum_n dz,  Bh_c = sum_n dz xhat,
//             k_c = scale_c (1 + fs_c),  S1_g = sum_g k_c A_c,  S2_g = sum_g k_c Bh_c,
//             dx = r_g (k_c dz - (S1_g + xhat S2_g) / (n G)),  dshift_c = sum_n dx.
//   The parameter gradients are [B, C] arithmetic on A and Bh, left to JAX
//   (kernels.group_norm).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <vector>

#include "vec_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using vdmrep::Sigmoid;

std::mutex& VdmrepKernelLock();  // onednn_conv.cc

namespace {

struct Shape {
  int64_t b, n, c, groups, per;  // batch, positions, channels, groups, channels per group
};

bool Same(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

ffi::Error CheckShapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> vec,
                       ffi::Span<const int64_t> per_example, int64_t groups, Shape* s) {
  if (x.size() != 4)
    return ffi::Error::InvalidArgument("vdmrep group_norm: x must be [B, H, W, C]");
  s->b = x[0];
  s->n = x[1] * x[2];
  s->c = x[3];
  s->groups = groups;
  if (groups < 1 || s->c % groups)
    return ffi::Error::InvalidArgument("vdmrep group_norm: C must split into the groups");
  s->per = s->c / groups;
  if (vec.size() != 1 || vec[0] != s->c || per_example.size() != 2 ||
      per_example[0] != s->b || per_example[1] != s->c)
    return ffi::Error::InvalidArgument(
        "vdmrep group_norm: scale/bias must be [C], shift/film [B, C]");
  return ffi::Error::Success();
}

// Per-example bodies, templated on the channel count: with C a compile-time constant
// (16, 32, 64, 128: the models' widths) GCC drops the vector loops' remainder handling,
// which at C = 16 is one vector per position and dominated the runtime-C loops.
// kC = 0 is the general case.
template <int64_t kC>
void ForwardExample(const Shape& s, const float* __restrict__ xe,
                    const float* __restrict__ sc, const float* __restrict__ bi,
                    const float* __restrict__ she, const float* __restrict__ fse,
                    const float* __restrict__ fbe, float* __restrict__ ye,
                    float* __restrict__ mue, float* __restrict__ re, float eps, bool swish,
                    double* __restrict__ sm, double* __restrict__ sqp,
                    float* __restrict__ gain, float* __restrict__ off) {
  const int64_t n = s.n, c = kC ? kC : s.c;
  for (int64_t j = 0; j < c; ++j) sm[j] = 0.0;
  for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) sm[j] += xe[i * c + j];
  }
  // Group means of x + shift, then centred squares about them.
  for (int64_t g = 0; g < s.groups; ++g) {
    double t = 0.0;
    for (int64_t j = g * s.per; j < (g + 1) * s.per; ++j) t += sm[j] / n + she[j];
    for (int64_t j = g * s.per; j < (g + 1) * s.per; ++j)
      mue[j] = static_cast<float>(t / s.per - she[j]);
  }
  for (int64_t j = 0; j < c; ++j) sqp[j] = 0.0;
  for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const double d = static_cast<double>(xe[i * c + j]) - mue[j];
      sqp[j] += d * d;
    }
  }
  for (int64_t g = 0; g < s.groups; ++g) {
    double t = 0.0;
    for (int64_t j = g * s.per; j < (g + 1) * s.per; ++j) t += sqp[j];
    const float r = static_cast<float>(1.0 / std::sqrt(t / (n * s.per) + eps));
    for (int64_t j = g * s.per; j < (g + 1) * s.per; ++j) {
      re[j] = r;
      // z = x gain + off: the normalisation, scale, bias and FiLM as one affine map.
      const float film = 1.f + fse[j];
      gain[j] = r * sc[j] * film;
      off[j] = (bi[j] - mue[j] * r * sc[j]) * film + fbe[j];
    }
  }
  if (swish) {
    for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) {
        const float z = xe[i * c + j] * gain[j] + off[j];
        ye[i * c + j] = z * Sigmoid(z);
      }
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) ye[i * c + j] = xe[i * c + j] * gain[j] + off[j];
    }
  }
}

template <int64_t kC>
void BackwardExample(const Shape& s, const float* __restrict__ xe,
                     const float* __restrict__ dye, const float* __restrict__ mue,
                     const float* __restrict__ re, const float* __restrict__ sc,
                     const float* __restrict__ bi, const float* __restrict__ fse,
                     const float* __restrict__ fbe, float* __restrict__ dxe,
                     float* __restrict__ ae, float* __restrict__ bhe, float* __restrict__ dse,
                     bool swish, float* __restrict__ dz, float* __restrict__ gain,
                     float* __restrict__ off, float* __restrict__ ca, float* __restrict__ cx,
                     float* __restrict__ c0, double* __restrict__ aa, double* __restrict__ ab,
                     double* __restrict__ ad) {
  const int64_t n = s.n, c = kC ? kC : s.c;
  for (int64_t j = 0; j < c; ++j) {
    const float film = 1.f + fse[j];
    gain[j] = re[j] * sc[j] * film;
    off[j] = (bi[j] - mue[j] * re[j] * sc[j]) * film + fbe[j];
    aa[j] = ab[j] = ad[j] = 0.0;
  }
  // dz (kept per example in cache when it differs from dy) and its two sums.
  const float* g = dye;
  if (swish) {
    for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) {
        const float z = xe[i * c + j] * gain[j] + off[j];
        const float sg = Sigmoid(z);
        dz[i * c + j] = dye[i * c + j] * sg * (1.f + z * (1.f - sg));
      }
    }
    g = dz;
  }
  for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const double gv = g[i * c + j];
      aa[j] += gv;
      ab[j] += gv * (static_cast<double>(xe[i * c + j]) - mue[j]);
    }
  }
  // dx = dz ca + x cx + c0, per channel coefficients from the group sums.
  const double inv_count = 1.0 / static_cast<double>(n * s.per);
  for (int64_t grp = 0; grp < s.groups; ++grp) {
    double s1 = 0.0, s2 = 0.0;
    const int64_t lo = grp * s.per, hi = lo + s.per;
    for (int64_t j = lo; j < hi; ++j) {
      const double k = static_cast<double>(sc[j]) * (1.0 + fse[j]);
      ae[j] = static_cast<float>(aa[j]);
      bhe[j] = static_cast<float>(ab[j] * re[j]);
      s1 += k * aa[j];
      s2 += k * ab[j] * re[j];
    }
    for (int64_t j = lo; j < hi; ++j) {
      const double r = re[j], k = static_cast<double>(sc[j]) * (1.0 + fse[j]);
      ca[j] = static_cast<float>(r * k);
      cx[j] = static_cast<float>(-r * r * s2 * inv_count);
      c0[j] = static_cast<float>(-r * s1 * inv_count + mue[j] * r * r * s2 * inv_count);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const float v = g[i * c + j] * ca[j] + xe[i * c + j] * cx[j] + c0[j];
      dxe[i * c + j] = v;
      ad[j] += v;
    }
  }
  for (int64_t j = 0; j < c; ++j) dse[j] = static_cast<float>(ad[j]);
}

// The specialisation for s.c (see above).
template <typename F>
void ByChannels(int64_t c, F&& f) {
  switch (c) {
    case 16: f(std::integral_constant<int64_t, 16>()); break;
    case 32: f(std::integral_constant<int64_t, 32>()); break;
    case 64: f(std::integral_constant<int64_t, 64>()); break;
    case 128: f(std::integral_constant<int64_t, 128>()); break;
    default: f(std::integral_constant<int64_t, 0>());
  }
}

// The normalised input as one tensor or as the channel concatenation of two (the U-Net
// up blocks' [h, skip]: normalising the parts saves writing the concatenation, and the
// 1x1 shortcut reads the parts too). Example e of two parts is gathered into a
// per-thread [n, C] buffer (in L2); gradients are scattered back the same way.
struct Input {
  const float* a;
  int64_t ca;
  const float* b;  // null: one tensor
  int64_t cb;

  const float* Example(int64_t e, int64_t n, float* buf) const {
    if (!b) return a + e * n * ca;
    const float *pa = a + e * n * ca, *pb = b + e * n * cb;
    for (int64_t i = 0; i < n; ++i) {
      std::copy(pa + i * ca, pa + (i + 1) * ca, buf + i * (ca + cb));
      std::copy(pb + i * cb, pb + (i + 1) * cb, buf + i * (ca + cb) + ca);
    }
    return buf;
  }
};

void ScatterExample(const float* g, int64_t e, int64_t n, float* da, int64_t ca, float* db,
                    int64_t cb) {
  float *pa = da + e * n * ca, *pb = db + e * n * cb;
  for (int64_t i = 0; i < n; ++i) {
    std::copy(g + i * (ca + cb), g + i * (ca + cb) + ca, pa + i * ca);
    std::copy(g + i * (ca + cb) + ca, g + (i + 1) * (ca + cb), pb + i * cb);
  }
}

ffi::Error CheckParams(ffi::Span<const int64_t> scale,
                       ffi::Span<const int64_t> bias, ffi::Span<const int64_t> per_example,
                       ffi::Span<const int64_t> fs, ffi::Span<const int64_t> fb) {
  if (!Same(bias, scale) || !Same(fs, per_example) || !Same(fb, per_example))
    return ffi::Error::InvalidArgument("vdmrep group_norm: bias/film shapes");
  return ffi::Error::Success();
}

// Shape of the concatenation of x1 [B, H, W, C1] and x2 [B, H, W, C2] (x2 absent: x1's).
std::vector<int64_t> Joined(ffi::Span<const int64_t> x1, const ffi::Span<const int64_t>* x2) {
  std::vector<int64_t> d(x1.begin(), x1.end());
  if (x2 && d.size() == 4 && x2->size() == 4 && std::equal(d.begin(), d.end() - 1, x2->begin()))
    d[3] += (*x2)[3];
  else if (x2)
    d.clear();  // mismatched parts: CheckShapes rejects the empty shape
  return d;
}

// y: [B, H, W, C]; scale, bias: [C]; shift, fs, fb, mu, rstd: [B, C].
ffi::Error Forward(const Input& x, ffi::Span<const int64_t> x_dims, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> shift,
                   ffi::Buffer<ffi::F32> fs, ffi::Buffer<ffi::F32> fb,
                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mu,
                   ffi::ResultBuffer<ffi::F32> rstd, int64_t groups, float eps, int64_t swish) {
  Shape s;
  ffi::Error bad = CheckShapes(x_dims, scale.dimensions(), shift.dimensions(), groups, &s);
  if (bad.success())
    bad = CheckParams(scale.dimensions(), bias.dimensions(), shift.dimensions(),
                      fs.dimensions(), fb.dimensions());
  if (!bad.success()) return bad;
  const int64_t n = s.n, c = s.c;
  const float *sc = scale.typed_data(), *bi = bias.typed_data();
  const float *shp = shift.typed_data(), *fsp = fs.typed_data(), *fbp = fb.typed_data();
  float *yp = y->typed_data(), *mup = mu->typed_data(), *rp = rstd->typed_data();
  std::lock_guard<std::mutex> lock(VdmrepKernelLock());  // see onednn_conv.cc
  ByChannels(c, [&](auto k) {
#pragma omp parallel
    {
      std::vector<double> sum(c), sq(c);
      std::vector<float> gain(c), off(c), joined(x.b ? n * c : 0);
#pragma omp for schedule(static)
      for (int64_t e = 0; e < s.b; ++e)
        ForwardExample<decltype(k)::value>(
            s, x.Example(e, n, joined.data()), sc, bi, shp + e * c, fsp + e * c, fbp + e * c,
            yp + e * n * c, mup + e * c, rp + e * c, eps, swish != 0, sum.data(), sq.data(),
            gain.data(), off.data());
    }
  });
  return ffi::Error::Success();
}

// dy: [B, H, W, C]; mu, rstd (the forward's), fs, fb: [B, C]; scale, bias: [C]
// -> dx (one tensor, or two parts: da, db), A, Bh, dshift ([B, C] each; see the header).
ffi::Error Backward(const Input& x, ffi::Span<const int64_t> x_dims, ffi::Buffer<ffi::F32> dy,
                    ffi::Buffer<ffi::F32> mu, ffi::Buffer<ffi::F32> rstd,
                    ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                    ffi::Buffer<ffi::F32> fs, ffi::Buffer<ffi::F32> fb, float* da, float* db,
                    ffi::ResultBuffer<ffi::F32> a_out, ffi::ResultBuffer<ffi::F32> bh_out,
                    ffi::ResultBuffer<ffi::F32> dshift, int64_t groups, int64_t swish) {
  Shape s;
  ffi::Error bad = CheckShapes(x_dims, scale.dimensions(), mu.dimensions(), groups, &s);
  if (bad.success())
    bad = CheckParams(scale.dimensions(), bias.dimensions(), mu.dimensions(),
                      fs.dimensions(), fb.dimensions());
  if (!bad.success()) return bad;
  if (!Same(dy.dimensions(), x_dims) || !Same(rstd.dimensions(), mu.dimensions()))
    return ffi::Error::InvalidArgument("vdmrep group_norm: dy/rstd shapes");
  const int64_t n = s.n, c = s.c;
  const float *dyp = dy.typed_data(), *mup = mu.typed_data();
  const float *rp = rstd.typed_data(), *sc = scale.typed_data(), *bi = bias.typed_data();
  const float *fsp = fs.typed_data(), *fbp = fb.typed_data();
  float *ap = a_out->typed_data(), *bhp = bh_out->typed_data();
  float* dsp = dshift->typed_data();
  std::lock_guard<std::mutex> lock(VdmrepKernelLock());
  ByChannels(c, [&](auto k) {
#pragma omp parallel
    {
      std::vector<float> dz(swish ? n * c : 0), coef(5 * c);
      std::vector<float> joined(x.b ? n * c : 0), djoined(x.b ? n * c : 0);
      std::vector<double> acc(3 * c);
      float* cf = coef.data();
      double* ac = acc.data();
#pragma omp for schedule(static)
      for (int64_t e = 0; e < s.b; ++e) {
        float* dxe = x.b ? djoined.data() : da + e * n * c;
        BackwardExample<decltype(k)::value>(
            s, x.Example(e, n, joined.data()), dyp + e * n * c, mup + e * c, rp + e * c, sc,
            bi, fsp + e * c, fbp + e * c, dxe, ap + e * c, bhp + e * c, dsp + e * c,
            swish != 0, dz.data(), cf, cf + c, cf + 2 * c, cf + 3 * c, cf + 4 * c, ac, ac + c,
            ac + 2 * c);
        if (x.b) ScatterExample(dxe, e, n, da, x.ca, db, x.cb);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> shift,
                       ffi::Buffer<ffi::F32> fs, ffi::Buffer<ffi::F32> fb,
                       ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mu,
                       ffi::ResultBuffer<ffi::F32> rstd, int64_t groups, float eps,
                       int64_t swish) {
  auto d = x.dimensions();
  Input in{x.typed_data(), d.size() == 4 ? d[3] : 0, nullptr, 0};
  return Forward(in, d, scale, bias, shift, fs, fb, y, mu, rstd, groups, eps, swish);
}

ffi::Error ForwardPartsImpl(ffi::Buffer<ffi::F32> x1, ffi::Buffer<ffi::F32> x2,
                            ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                            ffi::Buffer<ffi::F32> shift, ffi::Buffer<ffi::F32> fs,
                            ffi::Buffer<ffi::F32> fb, ffi::ResultBuffer<ffi::F32> y,
                            ffi::ResultBuffer<ffi::F32> mu, ffi::ResultBuffer<ffi::F32> rstd,
                            int64_t groups, float eps, int64_t swish) {
  auto d2 = x2.dimensions();
  std::vector<int64_t> d = Joined(x1.dimensions(), &d2);
  if (d.empty()) return ffi::Error::InvalidArgument("vdmrep group_norm: parts' shapes differ");
  Input in{x1.typed_data(), x1.dimensions()[3], x2.typed_data(), d2[3]};
  return Forward(in, d, scale, bias, shift, fs, fb, y, mu, rstd, groups, eps, swish);
}

ffi::Error BackwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                        ffi::Buffer<ffi::F32> mu, ffi::Buffer<ffi::F32> rstd,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                        ffi::Buffer<ffi::F32> fs, ffi::Buffer<ffi::F32> fb,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> a_out,
                        ffi::ResultBuffer<ffi::F32> bh_out,
                        ffi::ResultBuffer<ffi::F32> dshift, int64_t groups, int64_t swish) {
  auto d = x.dimensions();
  Input in{x.typed_data(), d.size() == 4 ? d[3] : 0, nullptr, 0};
  return Backward(in, d, dy, mu, rstd, scale, bias, fs, fb, dx->typed_data(), nullptr, a_out,
                  bh_out, dshift, groups, swish);
}

ffi::Error BackwardPartsImpl(ffi::Buffer<ffi::F32> x1, ffi::Buffer<ffi::F32> x2,
                             ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> mu,
                             ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> scale,
                             ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> fs,
                             ffi::Buffer<ffi::F32> fb, ffi::ResultBuffer<ffi::F32> dx1,
                             ffi::ResultBuffer<ffi::F32> dx2, ffi::ResultBuffer<ffi::F32> a_out,
                             ffi::ResultBuffer<ffi::F32> bh_out,
                             ffi::ResultBuffer<ffi::F32> dshift, int64_t groups,
                             int64_t swish) {
  auto d2 = x2.dimensions();
  std::vector<int64_t> d = Joined(x1.dimensions(), &d2);
  if (d.empty()) return ffi::Error::InvalidArgument("vdmrep group_norm: parts' shapes differ");
  Input in{x1.typed_data(), x1.dimensions()[3], x2.typed_data(), d2[3]};
  return Backward(in, d, dy, mu, rstd, scale, bias, fs, fb, dx1->typed_data(),
                  dx2->typed_data(), a_out, bh_out, dshift, groups, swish);
}

}  // namespace

#define VDMREP_GN_PARAMS                                                               \
  .Arg<ffi::Buffer<ffi::F32>>()      /* scale */                                       \
      .Arg<ffi::Buffer<ffi::F32>>()  /* bias */                                        \
      .Arg<ffi::Buffer<ffi::F32>>()  /* shift */                                       \
      .Arg<ffi::Buffer<ffi::F32>>()  /* film scale */                                  \
      .Arg<ffi::Buffer<ffi::F32>>()  /* film bias */

#define VDMREP_GN_FORWARD_RETS                                                         \
  .Ret<ffi::Buffer<ffi::F32>>()      /* y */                                           \
      .Ret<ffi::Buffer<ffi::F32>>()  /* mu */                                          \
      .Ret<ffi::Buffer<ffi::F32>>()  /* rstd */                                        \
      .Attr<int64_t>("groups")                                                         \
      .Attr<float>("eps")                                                              \
      .Attr<int64_t>("swish")

#define VDMREP_GN_BACKWARD_ARGS                                                        \
  .Arg<ffi::Buffer<ffi::F32>>()      /* dy */                                          \
      .Arg<ffi::Buffer<ffi::F32>>()  /* mu */                                          \
      .Arg<ffi::Buffer<ffi::F32>>()  /* rstd */                                        \
      .Arg<ffi::Buffer<ffi::F32>>()  /* scale */                                       \
      .Arg<ffi::Buffer<ffi::F32>>()  /* bias */                                        \
      .Arg<ffi::Buffer<ffi::F32>>()  /* film scale */                                  \
      .Arg<ffi::Buffer<ffi::F32>>()  /* film bias */

#define VDMREP_GN_BACKWARD_RETS                                                        \
  .Ret<ffi::Buffer<ffi::F32>>()      /* A */                                           \
      .Ret<ffi::Buffer<ffi::F32>>()  /* Bh */                                          \
      .Ret<ffi::Buffer<ffi::F32>>()  /* dshift */                                      \
      .Attr<int64_t>("groups")                                                         \
      .Attr<int64_t>("swish")

XLA_FFI_DEFINE_HANDLER_SYMBOL(VdmrepGroupNormForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  VDMREP_GN_PARAMS VDMREP_GN_FORWARD_RETS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(VdmrepGroupNormPartsForward, ForwardPartsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x1
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x2
                                  VDMREP_GN_PARAMS VDMREP_GN_FORWARD_RETS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(VdmrepGroupNormBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  VDMREP_GN_BACKWARD_ARGS
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  VDMREP_GN_BACKWARD_RETS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(VdmrepGroupNormPartsBackward, BackwardPartsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x1
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x2
                                  VDMREP_GN_BACKWARD_ARGS
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx1
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx2
                                  VDMREP_GN_BACKWARD_RETS);
