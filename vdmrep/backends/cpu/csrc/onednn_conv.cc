// 2-D convolution (NHWC activations, HWIO filters, f32) as three XLA FFI custom calls
// into oneDNN: forward, gradient w.r.t. the input, gradient w.r.t. the filter.
//
// Why: XLA's CPU convolution runs the score net's 3x3 convolutions far below the
// machine's matmul rate; oneDNN's brgemm/jit kernels run them near it (the backend's
// benchmarks/conv_forms.py). The score net is ~45 such convolutions and little else.
//
// Activations stay in XLA's row-major NHWC buffers (oneDNN's `nhwc` tag, zero copies).
// Filters are tiny (9*C*O floats), so they are reordered per call between XLA's HWIO
// and the blocked layout each primitive prefers; that layout is what lets the two
// backward passes use the same fast kernels as the forward pass.
//
// Primitives are created once per (shapes, strides, padding) and cached. XLA runs
// independent ops on several threads at once, but this oneDNN build shares one
// scratchpad between primitives, so concurrent calls corrupted each other's results
// (seen as run-to-run differences in a loss); every call therefore holds one lock.
// Each call already uses all cores through OpenMP, so little is lost.
//
// A fourth handler, an identity custom call, forces XLA to hold a value in memory
// (kernels.materialize says why).

#include <array>
#include <cstring>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;

// One lock for every kernel call in this library (attention.cc takes it too): each call
// already spreads over all cores through OpenMP, and two at once (XLA runs independent
// ops on two threads) would put two thread teams on the same cores.
std::mutex& VdmrepKernelLock() {
  static std::mutex* mu = new std::mutex();
  return *mu;
}

namespace {

dnnl::engine& Engine() {
  static dnnl::engine* eng = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *eng;
}

// N, H, W, C (input), OH, OW, O (output), KH, KW, stride h/w, padding lo/hi for h/w.
using Key = std::array<int64_t, 15>;

struct Geometry {
  memory::dims src, wei, dst, strides, pad_l, pad_r;
  memory::desc src_md() const { return {src, memory::data_type::f32, tag::nhwc}; }
  memory::desc dst_md() const { return {dst, memory::data_type::f32, tag::nhwc}; }
  memory::desc wei_any() const { return {wei, memory::data_type::f32, tag::any}; }
  memory::desc wei_hwio() const { return {wei, memory::data_type::f32, tag::hwio}; }
};

Geometry MakeGeometry(const Key& k) {
  Geometry g;
  g.src = {k[0], k[3], k[1], k[2]};
  g.dst = {k[0], k[6], k[4], k[5]};
  g.wei = {k[6], k[3], k[7], k[8]};
  g.strides = {k[9], k[10]};
  g.pad_l = {k[11], k[13]};
  g.pad_r = {k[12], k[14]};
  return g;
}

struct Primitives {
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights bwd_weights;
  memory::desc fwd_wei, bwd_data_wei, bwd_weights_wei;  // the layouts each one wants
};

Primitives* Get(const Key& key) {
  static std::mutex mu;
  static auto* cache = new std::map<Key, std::unique_ptr<Primitives>>();
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(key);
  if (it != cache->end()) return it->second.get();
  Geometry g = MakeGeometry(key);
  auto alg = dnnl::algorithm::convolution_direct;
  auto fpd = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, alg, g.src_md(), g.wei_any(), g.dst_md(),
      g.strides, g.pad_l, g.pad_r);
  auto dpd = dnnl::convolution_backward_data::primitive_desc(
      Engine(), alg, g.src_md(), g.wei_any(), g.dst_md(), g.strides, g.pad_l, g.pad_r, fpd);
  auto wpd = dnnl::convolution_backward_weights::primitive_desc(
      Engine(), alg, g.src_md(), g.wei_any(), g.dst_md(), g.strides, g.pad_l, g.pad_r, fpd);
  auto p = std::make_unique<Primitives>(Primitives{
      dnnl::convolution_forward(fpd), dnnl::convolution_backward_data(dpd),
      dnnl::convolution_backward_weights(wpd), fpd.weights_desc(), dpd.weights_desc(),
      wpd.diff_weights_desc()});
  return cache->emplace(key, std::move(p)).first->second.get();
}

// Key from the NHWC input, HWIO filter and NHWC output shapes plus the attributes.
ffi::Error MakeKey(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                   ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t ph_lo,
                   int64_t ph_hi, int64_t pw_lo, int64_t pw_hi, Key* key) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4)
    return ffi::Error::InvalidArgument("vdmrep onednn conv: expects rank-4 NHWC/HWIO arrays");
  if (w[2] != x[3] || w[3] != y[3] || x[0] != y[0])
    return ffi::Error::InvalidArgument("vdmrep onednn conv: inconsistent shapes");
  *key = Key{x[0], x[1], x[2], x[3], y[1], y[2], y[3], w[0], w[1], sh, sw, ph_lo, ph_hi,
             pw_lo, pw_hi};
  return ffi::Error::Success();
}

// Stream per thread: XLA may run independent custom calls on different threads.
dnnl::stream& Stream() {
  thread_local dnnl::stream s(Engine());
  return s;
}

// Filter from XLA's HWIO buffer into `want`'s layout (a copy only when they differ).
memory FilterIn(const Geometry& g, const memory::desc& want, float* hwio) {
  memory user(g.wei_hwio(), Engine(), hwio);
  if (want == g.wei_hwio()) return user;
  memory blocked(want, Engine());
  dnnl::reorder(user, blocked).execute(Stream(), user, blocked);
  return blocked;
}

ffi::Error Wrap(const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(VdmrepKernelLock());
  try {
    body();
    Stream().wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("vdmrep onednn conv: ") + e.what());
  }
  return ffi::Error::Success();
}

#define VDMREP_CONV_ATTRS                                                                \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_h_lo")         \
      .Attr<int64_t>("pad_h_hi").Attr<int64_t>("pad_w_lo").Attr<int64_t>("pad_w_hi")

// Checks the shapes (NHWC input, HWIO filter, NHWC output), then runs
// body(primitives, geometry) for them under Wrap's lock.
ffi::Error Run(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
               ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t ph_lo, int64_t ph_hi,
               int64_t pw_lo, int64_t pw_hi,
               const std::function<void(const Primitives&, const Geometry&)>& body) {
  Key key;
  ffi::Error bad = MakeKey(x, w, y, sh, sw, ph_lo, ph_hi, pw_lo, pw_hi, &key);
  if (!bad.success()) return bad;
  return Wrap([&] { body(*Get(key), MakeGeometry(key)); });
}

ffi::Error ConvForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw,
                           int64_t ph_lo, int64_t ph_hi, int64_t pw_lo, int64_t pw_hi) {
  return Run(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, ph_lo, ph_hi, pw_lo, pw_hi,
             [&](const Primitives& p, const Geometry& g) {
    memory src(g.src_md(), Engine(), x.typed_data());
    memory dst(g.dst_md(), Engine(), y->typed_data());
    memory wei = FilterIn(g, p.fwd_wei, w.typed_data());
    p.fwd.execute(Stream(), {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
  });
}

// dy: [N, OH, OW, O], w: [KH, KW, C, O] -> dx: [N, H, W, C].
ffi::Error ConvInputGradImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                             ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw,
                             int64_t ph_lo, int64_t ph_hi, int64_t pw_lo, int64_t pw_hi) {
  return Run(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, ph_lo, ph_hi, pw_lo,
             pw_hi, [&](const Primitives& p, const Geometry& g) {
    memory diff_dst(g.dst_md(), Engine(), dy.typed_data());
    memory diff_src(g.src_md(), Engine(), dx->typed_data());
    memory wei = FilterIn(g, p.bwd_data_wei, w.typed_data());
    p.bwd_data.execute(Stream(), {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, wei},
                                  {DNNL_ARG_DIFF_SRC, diff_src}});
  });
}

// x: [N, H, W, C], dy: [N, OH, OW, O] -> dw: [KH, KW, C, O] (summed over the batch).
ffi::Error ConvFilterGradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                              ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw,
                              int64_t ph_lo, int64_t ph_hi, int64_t pw_lo, int64_t pw_hi) {
  return Run(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, ph_lo, ph_hi, pw_lo,
             pw_hi, [&](const Primitives& p, const Geometry& g) {
    memory src(g.src_md(), Engine(), x.typed_data());
    memory diff_dst(g.dst_md(), Engine(), dy.typed_data());
    memory user(g.wei_hwio(), Engine(), dw->typed_data());
    bool direct = p.bwd_weights_wei == g.wei_hwio();
    memory diff_wei = direct ? user : memory(p.bwd_weights_wei, Engine());
    p.bwd_weights.execute(Stream(), {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
                                     {DNNL_ARG_DIFF_WEIGHTS, diff_wei}});
    if (!direct) dnnl::reorder(diff_wei, user).execute(Stream(), diff_wei, user);
  });
}

// Identity whose result XLA must hold in memory (see kernels.materialize).
// The result is declared to alias the operand, so usually there is nothing to copy.
ffi::Error MaterializeImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  if (y->untyped_data() != x.untyped_data()) {
    std::memcpy(y->untyped_data(), x.untyped_data(), x.size_bytes());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VdmrepConvForward, ConvForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() VDMREP_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(VdmrepConvInputGrad, ConvInputGradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() VDMREP_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(VdmrepConvFilterGrad, ConvFilterGradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() VDMREP_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(VdmrepMaterialize, MaterializeImpl,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
