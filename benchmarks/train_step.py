"""Seconds per train step, images/s, FLOPs and memory for a named VDM x encoder size.

  python -m benchmarks.train_step --vdm tvdm --encoder te --batch 64 --image 28
  python -m benchmarks.train_step --sweep batch   # step time vs batch size (mvdm+te)
  python -m benchmarks.train_step --sweep image   # step time vs image size (mvdm+te)
  python -m benchmarks.train_step --sweep variants  # backend xla, default, bf16, remat
  python -m benchmarks.train_step --backend xla  # the plain flax blocks on XLA
  python -m benchmarks.train_step --sweep accelerator  # SVDM+OE, f32 and bf16 (for a GPU)

Times the full jitted step (forward + backward + clip + AdamW + EMA, buffers donated)
after compilation, `--repeats` times, and prints one markdown table row per setting:
median (min..max) seconds, images/s, model GFLOP per step (XLA cost analysis of the
loop-free form: common.lowered_flops), achieved
GFLOP/s, fraction of the matmul peak measured in the same run in the row's compute
dtype (float32 rows against the float32 peak, bfloat16 rows against the bfloat16 peak:
the model-FLOPs utilisation, MFU), XLA's temp memory and the process's peak RSS.
"""
from __future__ import annotations

import functools
import resource

from benchmarks import common
from benchmarks.common import fmt_s

import jax
import jax.numpy as jnp
import numpy as np

from vdmrep import backends, config_lib, parallel
from vdmrep import train as train_lib

HEADER = ("| vdm | encoder | batch | image | dtype | remat | backend | s/step median (min..max) "
          "| images/s | GFLOP/step | GFLOP/s | % matmul peak | XLA temp MiB | peak RSS MiB "
          "| page faults/step |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def make_config(vdm, encoder, batch, dtype="float32", remat=False, backend="auto"):
  c = config_lib.base_config()
  c.model.vdm, c.model.encoder = vdm, encoder
  c.model.compute_dtype = dtype
  c.model.remat = remat
  c.model.backend = backend
  c.training.batch_size = batch
  return c


def _model_flops(vdm, encoder, batch, dtype, state, x, key):
  """FLOPs of one step of the loop-free form (see common.lowered_flops), with XLA's
  plain flax blocks (XLA cannot count a custom call's FLOPs; the mathematics is the same)."""
  config = make_config(vdm, encoder, batch, dtype, remat=False, backend="xla")
  model = backends.build_model(config.model)
  tx = train_lib.make_optimizer(config.optim)
  step = train_lib.make_train_step(model, tx, config, parallel.make_mesh())
  return common.lowered_flops(step.lower(state, x, key))


def build(vdm, encoder, batch, image, channels=1, dtype="float32", remat=False,
          backend="auto"):
  """(model, compiled step, state, batch, key) for one setting: a uint8 batch drawn
  from seed 0, the state initialised and placed as the training loop places it."""
  config = make_config(vdm, encoder, batch, dtype, remat, backend)
  config_lib.validate(config, jax.device_count())
  model = backends.build_model(config.model)
  tx = train_lib.make_optimizer(config.optim)
  mesh = parallel.make_mesh()
  shape = (image, image, channels)
  state = train_lib.initial_state(model, tx, config, shape, mesh)
  rng = np.random.default_rng(0)
  x = parallel.global_batch(mesh, rng.integers(0, 256, (batch,) + shape, dtype=np.uint8))
  key = jax.random.key(0)
  step = train_lib.make_train_step(model, tx, config, mesh)
  return model, step.lower(state, x, key).compile(), state, x, key


def bench(vdm, encoder, batch, image, channels=1, dtype="float32", remat=False,
          backend="auto", repeats=5, peak=None, pipeline=1):
  """Returns a dict of the figures for one setting.

  `pipeline` = K > 1 times K steps dispatched back to back with one wait at the end
  (as the training loop runs them: no host sync per step) and reports the time per
  step; 1 waits after every step (latency, the CPU figures' convention).
  """
  model, compiled, state, x, key = build(vdm, encoder, batch, image, channels, dtype, remat,
                                         backend)
  flops = _model_flops(vdm, encoder, batch, dtype, state, x, key)
  if np.isnan(flops) and jax.default_backend() != "cpu":
    flops = common.flops_on_cpu("benchmarks.train_step", [
        "--count-flops", f"--vdm={vdm}", f"--encoder={encoder}", f"--batch={batch}",
        f"--image={image}", f"--channels={channels}", f"--dtype={dtype}"])
  mem = common.memory_of(compiled)
  # Donation consumes `state`, so thread it through the timed calls.
  holder = [state]

  def run():
    for _ in range(pipeline):
      holder[0], metrics = compiled(holder[0], x, key)
    return metrics
  run()
  # Minor page faults: fresh 4 KiB pages first touched (vdmrep/backends/cpu/hostmem.py).
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  times = [t / pipeline for t in common.time_fn(run, repeats=repeats, warmup=1)]
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (
      (repeats + 1) * pipeline)
  med, lo, hi = common.summary(times)
  return dict(vdm=vdm, encoder=encoder, batch=batch, image=f"{image}x{image}x{channels}",
              dtype=dtype, remat=remat, backend=backends.name(model), med=med, lo=lo, hi=hi, ips=batch / med,
              gflop=flops / 1e9, gflops=flops / med / 1e9,
              frac=(flops / med / peak) if peak else float("nan"),
              temp=mem.get("temp", float("nan")) / 2 ** 20, rss=common.peak_rss_mib(),
              faults=faults)


def row(r):
  return (f"| {r['vdm']} | {r['encoder']} | {r['batch']} | {r['image']} | {r['dtype']} | "
          f"{'yes' if r['remat'] else 'no'} | {r['backend']} | {fmt_s(r['med'])} ({fmt_s(r['lo'])}..{fmt_s(r['hi'])}) | "
          f"{r['ips']:.1f} | {r['gflop']:.1f} | {r['gflops']:.1f} | {100 * r['frac']:.0f}% | "
          f"{r['temp']:.0f} | {r['rss']:.0f} | {r['faults']:.0f} |")


def main():
  p = common.step_parser(__doc__)
  p.add_argument("--channels", type=int, default=1)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--remat", action="store_true")
  p.add_argument("--backend", default="auto", choices=config_lib.BACKENDS)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--sweep", choices=("none", "batch", "image", "sizes", "variants",
                                      "accelerator"), default="none")
  p.add_argument("--pipeline", type=int, default=1,
                 help="steps per timed call, one wait at the end (s/step = time / K)")
  p.add_argument("--count-flops", action="store_true",
                 help="print flops=N of one step's loop-free form and exit (no timing)")
  args = p.parse_args()
  if args.pipeline < 1:
    p.error(f"--pipeline must be >= 1 (steps per timed call), got {args.pipeline}")

  if args.count_flops:
    config = make_config(args.vdm, args.encoder, args.batch, args.dtype)
    model = backends.build_model(config.model)
    tx = train_lib.make_optimizer(config.optim)
    shape = (args.image, args.image, args.channels)
    # Shapes suffice to lower: nothing is initialised or compiled.
    state = jax.eval_shape(functools.partial(train_lib.create_train_state, model, tx,
                                             image_shape=shape), jax.random.key(0))
    x = jax.ShapeDtypeStruct((args.batch,) + shape, jnp.uint8)
    flops = _model_flops(args.vdm, args.encoder, args.batch, args.dtype, state, x,
                         jax.random.key(0))
    print(f"flops={flops!r}")
    return

  if args.sweep == "batch":
    settings = [dict(batch=b) for b in (8, 16, 32, 64, 128)]
  elif args.sweep == "image":
    settings = [dict(image=s) for s in (8, 16, 28, 32)]
  elif args.sweep == "sizes":
    settings = [dict(vdm=v, encoder=e) for v, e in
                (("mvdm", "te"), ("tvdm", "te"), ("tvdm", "none"), ("mvdm", "none"))]
  elif args.sweep == "accelerator":  # SVDM+OE, f32 and bf16
    settings = [dict(vdm="svdm", encoder="oe", dtype=d) for d in ("float32", "bfloat16")]
  elif args.sweep == "variants":
    settings = [dict(backend="xla"), {}, dict(dtype="bfloat16"), dict(remat=True)]
  else:
    settings = [{}]
  base = dict(vdm=args.vdm, encoder=args.encoder, batch=args.batch, image=args.image,
              channels=args.channels, dtype=args.dtype, remat=args.remat,
              backend=args.backend)
  settings = [{**base, **s} for s in settings]

  print(f"hardware: {common.hardware()}; {common.load_note()}")
  # Each row's utilisation is against the matmul peak of its own compute dtype, measured
  # just before the row: this VM's rate moves between minutes.
  peaks = []
  print("\n" + HEADER)
  for kw in settings:
    peak = common.matmul_peak(dtype=jnp.dtype(kw["dtype"]))
    peaks.append(f"{kw['dtype']} {peak / 1e9:.1f}")
    print(row(bench(repeats=args.repeats, peak=peak, pipeline=args.pipeline, **kw)),
          flush=True)
  print(f"\nmatmul peak (jnp.dot, default precision, best of 9) before each row, GFLOP/s: "
        f"{', '.join(peaks)}")
  print(f"after: {common.load_note()}")


if __name__ == "__main__":
  main()
