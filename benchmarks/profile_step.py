"""Where the train step's time goes: each part of the loss timed alone (fwd + bwd).

  python -m benchmarks.profile_step --vdm tvdm --encoder te --batch 64 --image 28

Prints a markdown table: part, median ms (min..max), GFLOP (XLA cost analysis; a loop
body such as chunked attention counts once), GFLOP/s.
Parts: the whole loss gradient, the score network, the encoder, the reconstruction
loss, one score-net ResNet block, the score-net attention block, and the optimiser
update (clip + AdamW + EMA) alone.
"""
from __future__ import annotations

from benchmarks import common
from benchmarks.common import fmt_s

import jax
import jax.numpy as jnp
import numpy as np

from vdmrep import collapse, config_lib, losses
from vdmrep import train as train_lib
from vdmrep import backends
from vdmrep.backends import build_model


def timed(name, fn, args, repeats):
  compiled = jax.jit(fn).lower(*args).compile()
  flops = common.flops_of(compiled)
  med, lo, hi = common.summary(common.time_fn(compiled, *args, repeats=repeats))
  return (f"| {name} | {1e3 * med:.1f} ({1e3 * lo:.1f}..{1e3 * hi:.1f}) | {flops / 1e9:.2f} | "
          f"{flops / med / 1e9:.1f} |")


def main():
  p = common.step_parser(__doc__)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--parts", default="all")
  p.add_argument("--backend", default="auto", choices=config_lib.BACKENDS)
  args = p.parse_args()
  config = config_lib.base_config()
  config.model.vdm, config.model.encoder = args.vdm, args.encoder
  config.model.compute_dtype = args.dtype
  config.model.backend = args.backend
  model = build_model(config.model)
  shape = (args.image, args.image, 1)
  params = model.init(jax.random.key(0), shape)
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (args.batch,) + shape), jnp.uint8)
  rng = jax.random.key(1)
  b = args.batch
  ch = model.score_net.channels
  h = jax.random.normal(jax.random.key(2), (b, args.image, args.image, ch))
  cond = jax.random.normal(jax.random.key(3), (b, 4 * ch))
  sq = lambda f: (lambda *a: jnp.sum(jnp.square(f(*a))))

  def loss(params):
    terms = model.elbo_terms(params, x, rng, train=True)
    return collapse.objective(terms, 0, config)[0]

  rows = []
  want = lambda n: args.parts == "all" or n in args.parts.split(",")
  if want("loss"):
    rows.append(timed("loss value_and_grad", jax.value_and_grad(loss), (params,), args.repeats))
  if want("score"):
    z = jax.random.normal(rng, (b,) + shape)
    g = jnp.linspace(-13.3, 5.0, b)
    w = jnp.zeros((b, model.encoder.latent)) if model.conditional else None
    f = lambda p: jnp.sum(jnp.square(model.eps_hat(p, z, g, w)))
    rows.append(timed("score net fwd+bwd", jax.grad(f), (params,), args.repeats))
  if want("encoder") and model.conditional:
    f = lambda p: jnp.sum(jnp.square(model.encode(p, x)[0]))
    rows.append(timed("encoder fwd+bwd", jax.grad(f), (params,), args.repeats))
  if want("recon"):
    z0 = losses.data_to_model_scale(x) + 0.01 * jax.random.normal(rng, x.shape)
    f = lambda z: jnp.sum(losses.reconstruction_loss(x, z, -13.3))
    rows.append(timed("reconstruction loss fwd+bwd", jax.grad(f), (z0,), args.repeats))
  if want("block"):
    blk = model.score_net.resnet_block(out_ch=ch, zero_init_out=False)  # the step's block
    bp = blk.init(rng, h, cond)
    f = lambda p, h: jnp.sum(jnp.square(blk.apply(p, h, cond)))
    rows.append(timed(f"one ResNet block ({ch} ch) fwd+bwd", jax.grad(f, argnums=(0, 1)),
                      (bp, h), args.repeats))
  if want("attn"):
    att = model.score_net.attn_block()  # as in the step
    ap = att.init(rng, h)
    f = lambda p, h: jnp.sum(jnp.square(att.apply(p, h)))
    rows.append(timed(f"attention block ({ch} ch, {args.image ** 2} positions) fwd+bwd",
                      jax.grad(f, argnums=(0, 1)), (ap, h), args.repeats))
  if want("optim"):
    tx = train_lib.make_optimizer(config.optim)
    opt = tx.init(params)
    def upd(params, opt):
      u, opt = tx.update(params, opt, params)
      return jax.tree.map(lambda a, b: 0.99 * a + 0.01 * b, params, u), opt
    rows.append(timed("optimiser update + EMA", upd, (params, opt), args.repeats))
  print(f"hardware: {common.hardware()}; {common.load_note()}; "
        f"backend: {backends.name(model)} (GFLOP counts no custom call)\n")
  print("| part | ms median (min..max) | GFLOP | GFLOP/s |\n|---|---|---|---|")
  print("\n".join(rows))


if __name__ == "__main__":
  main()
