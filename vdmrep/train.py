"""Training: TrainState, the jitted data-parallel `train_step`, and `train_and_evaluate`.

The state is a pytree (no methods that mutate it). The step is one `jax.jit` over a
1-D device mesh: parameters replicated, the batch split over devices, XLA inserting
the gradient all-reduce. All randomness of step s comes from fold_in(key(seed), s) and
the batch of step s from (seed, s), so a resumed run continues exactly.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from vdmrep import backends, checkpoints, collapse, config_lib, console, diagnostics, parallel
from vdmrep import data as data_lib
from vdmrep import evaluators, preflight, reliability
from vdmrep.models.vae_vdm import BOUND_TERMS


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  health: Any  # reliability.init_health(): non-finite step record (int32 scalars)


def make_optimizer(optim_cfg) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW, with a linear learning-rate warm-up."""
  lr = optax.linear_schedule(0.0, optim_cfg.lr, max(1, optim_cfg.warmup_steps))
  return optax.chain(
      optax.clip_by_global_norm(optim_cfg.grad_clip),
      optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                  weight_decay=optim_cfg.weight_decay))


def create_train_state(model, tx, rng, image_shape) -> TrainState:
  params = model.init(rng, image_shape)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                    health=reliability.init_health())


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


EMA_SCHEDULES = ("warmup", "constant")


def ema_decay(step, max_decay, schedule: str = "warmup"):
  """The EMA decay of step `step` (float32 scalar).

  'warmup': min(max_decay, (1 + step) / (10 + step)), so short runs still get a useful
  average; it reaches 0.999 only after 8,990 steps and 0.9999 after ~90k. 'constant':
  max_decay from the first step, as the official VDM code (0.9999).
  """
  if schedule == "constant":
    return jnp.asarray(max_decay, jnp.float32)
  step = step.astype(jnp.float32)
  return jnp.minimum(max_decay, (1.0 + step) / (10.0 + step))


def train_step(state: TrainState, batch, key, *, model, tx, config, aggressive=False):
  """One optimiser step on a global batch of uint8 images [B, H, W, C], or of
  (images, int labels [B]) for a class-conditional model.

  The loss the optimiser sees is the collapse objective in bits/dim. Returns the new
  state and a dict of scalar metrics (bits/dim per term, KL in nats/image).

  `aggressive` (static): He et al. (2019)'s aggressive inference step: first
  `collapse.aggressive_inner_steps` encoder-only Adam steps on this batch (fresh draws of
  w, t, eps each), then one step of everything but the encoder; it also logs the batch
  estimate of I_q(x; w) that decides when the phase ends (`train_and_evaluate`).
  """
  batch, labels = batch if isinstance(batch, tuple) else (batch, None)
  num_dims = int(np.prod(batch.shape[1:]))
  to_bpd = 1.0 / (num_dims * math.log(2.0))
  rng = jax.random.fold_in(key, state.step)

  def loss_fn(params, rng=rng):
    with_labels = {} if labels is None else {"y": labels}
    terms = model.elbo_terms(params, batch, rng, train=True, **with_labels,
                             deterministic_encoder=config.collapse.deterministic_encoder,
                             kl_balance=collapse.kl_balance(config))
    loss, logs = collapse.objective(terms, state.step, config, jax.random.fold_in(rng, 1))
    means = {k: jnp.mean(v) for k, v in terms.bound_terms().items()}
    logs = dict(logs, **diagnostics.batch_stats(terms, config.eval.active_threshold))
    if aggressive:
      logs["mi_batch_nats"] = diagnostics.batch_mutual_information(terms.mean, terms.logvar,
                                                                   terms.w)
    return loss * to_bpd, (means, logs)

  params = state.params
  if aggressive:
    params = _encoder_inner_steps(loss_fn, params, jax.random.fold_in(rng, 2),
                                  config.collapse.aggressive_inner_steps, config.optim.lr)
  (loss, (means, logs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, state.opt_state, params)
  updates = collapse.freeze_encoder(updates, state.step, config)
  if aggressive:  # the encoder moved in the inner steps; this step is the decoder's
    updates = dict(updates, encoder=jax.tree.map(jnp.zeros_like, updates["encoder"]))
  params = optax.apply_updates(params, updates)
  d = ema_decay(state.step, config.optim.ema_decay, config.optim.get("ema_schedule", "warmup"))
  ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
  metrics = {f"{k}_bpd": v * to_bpd for k, v in means.items()}
  metrics["bpd"] = sum(metrics[f"{k}_bpd"] for k in BOUND_TERMS)  # ELBO at beta = 1
  metrics.update(loss_bpd=loss, kl_nats=means["kl"], grad_norm=optax.tree.norm(grads), **logs)
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                            opt_state=opt_state)
  # A non-finite step keeps the old state (see reliability.py); no host sync here.
  checked = dict(means, loss=loss, grad=metrics["grad_norm"])
  return reliability.guard_step(state, new_state, checked, metrics,
                                policy=config.training.nan_policy,
                                max_skips=config.training.max_consecutive_skips)


def _encoder_inner_steps(loss_fn, params, rng, num_steps, lr):
  """`num_steps` Adam steps on the encoder's parameters alone (a fresh optimiser state):
  the inner loop of aggressive inference. Returns the parameters with the new encoder."""
  inner = optax.adam(lr)

  def body(i, carry):
    enc, opt = carry
    g = jax.grad(lambda e: loss_fn(dict(params, encoder=e), jax.random.fold_in(rng, i))[0])(enc)
    u, opt = inner.update(g, opt, enc)
    return optax.apply_updates(enc, u), opt
  enc, _ = jax.lax.fori_loop(0, num_steps, body,
                             (params["encoder"], inner.init(params["encoder"])))
  return dict(params, encoder=enc)


def make_train_step(model, tx, config, mesh, aggressive=False):
  repl = parallel.replicated(mesh)
  return jax.jit(functools.partial(train_step, model=model, tx=tx, config=config,
                                   aggressive=aggressive),
                 in_shardings=(repl, parallel.batch_sharded(mesh), repl),
                 out_shardings=(repl, repl), donate_argnums=(0,))


def setup(config):
  """Validates the config, loads the data and builds model, optimiser and mesh."""
  parallel.maybe_initialize_distributed(config.distributed)
  config_lib.validate(config, num_devices=jax.device_count(),
                      num_processes=jax.process_count())
  parallel.main_print(f"loading data ({config.data.source})")
  ds = data_lib.hold_out_class(data_lib.load(config.data), config.eval.ood_holdout_class)
  config_lib.check_image_shape(config, ds.image_shape)
  preflight.check_dataset(ds, config)
  data_lib.check_labels(ds, config.model.num_classes, "config.model.num_classes")
  parallel.main_print(f"data: {len(ds.train_images):,} training and {len(ds.eval_images):,} "
                      f"evaluation images of shape {ds.image_shape}")
  model = backends.build_model(config.model, ds.image_shape)
  return ds, model, make_optimizer(config.optim), parallel.make_mesh()


def log_param_counts(model, params):
  counts = {name: count_params(p) for name, p in params.items()}
  counts["total"] = sum(counts.values())
  logging.info("parameter counts: %s", counts)
  parallel.main_print("parameters: " + ", ".join(f"{k}={v:,}" for k, v in counts.items())
                      + f" (backend: {backends.name(model)})")
  return counts


def initial_state(model, tx, config, image_shape, mesh):
  init = functools.partial(create_train_state, model, tx, image_shape=image_shape)
  return jax.jit(init, out_shardings=parallel.replicated(mesh))(
      jax.random.fold_in(jax.random.key(config.seed), 1 << 30))


def check_memory(model, tx, config, image_shape) -> None:
  """Raises ConfigError if the estimated step memory exceeds the machine (traces, no compile)."""
  shapes = jax.eval_shape(functools.partial(create_train_state, model, tx,
                                            image_shape=image_shape), jax.random.key(0))
  problem = preflight.memory_problem(config, image_shape, count_params(shapes.params),
                                     jax.device_count())
  if problem:
    raise config_lib.ConfigError(problem)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (resuming from `workdir` if it holds a checkpoint), then evaluates.

  Returns the final evaluation summary (bits/dim terms with standard errors). Holds the
  workdir's lock throughout (one trainer per workdir). Raises reliability.Interrupted
  when SIGTERM/SIGINT arrives (after saving a checkpoint), and
  reliability.NumericalError when a non-finite step halts training (see reliability.py).
  """
  ds, model, tx, mesh = setup(config)
  reliability.check_workdir(workdir)
  with reliability.workdir_lock(workdir):
    return _train_and_evaluate(config, workdir, ds, model, tx, mesh)


def _train_and_evaluate(config, workdir, ds, model, tx, mesh) -> dict:
  ckpt = checkpoints.Checkpoints(workdir, keep=config.training.keep_checkpoints)
  fingerprint = config_lib.model_fingerprint(config)
  # Before anything compiles: the model, the settings of a resumed run, the memory.
  latest = ckpt.check_latest_compatible(fingerprint, ds.image_shape)
  digest = preflight.data_digest(ds)
  changed = preflight.check_resume(latest, config, digest, ckpt.directory)
  if changed:
    logging.warning("resuming with changed settings: %s", "; ".join(changed))
    parallel.main_print("warning: resuming with changed settings "
                        "(config.training.allow_config_change=True): " + "; ".join(changed))
  check_memory(model, tx, config, ds.image_shape)
  state = initial_state(model, tx, config, ds.image_shape, mesh)
  log_param_counts(model, state.params)
  restored, meta = ckpt.restore_latest(checkpoints.abstract(state), fingerprint, ds.image_shape)
  acc = None  # metric sums since the last log step (saved with checkpoints: exact logs)
  if restored is not None:
    state, acc = restored, _sums_from_json(meta.get("metric_sums"))
    logging.info("resumed from step %d in %s", int(state.step), ckpt.directory)
    parallel.main_print(f"resumed from checkpoint at step {int(state.step)}")
  start = int(state.step)
  num_steps = config.training.num_steps

  from clu import metric_writers, periodic_actions  # here: clu's writers import TensorFlow
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start == 0:
    writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()})
  hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)]
  # Aggressive inference runs until the batch estimate of I_q(x; w), averaged over a log
  # interval, stops rising; the phase and the last average are kept with checkpoints.
  aggressive = bool(config.collapse.aggressive_inner_steps) and (
      restored is None or meta.get("aggressive", True))
  mi_prev = meta.get("aggressive_mi") if restored is not None else None
  p_steps = {False: make_train_step(model, tx, config, mesh)}
  if aggressive:
    p_steps[True] = make_train_step(model, tx, config, mesh, aggressive=True)
  key = jax.random.key(config.seed)
  meta_base = {"model_fingerprint": fingerprint, "image_shape": list(ds.image_shape),
               "config": json.loads(config.to_json_best_effort()), "data_sha256": digest}
  t = config.training
  summary, skipped = None, 0

  make_batch = functools.partial(
      data_lib.train_batch, ds, batch_size=t.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      with_labels=bool(getattr(model, "num_classes", 0)))
  if start < num_steps:
    parallel.main_print(f"compiling the training step, then training steps {start}.."
                        f"{num_steps}")
  rate = console.Rate(start)
  with reliability.stop_on_signals() as stop:
    for step, local in data_lib.prefetch(make_batch, range(start, num_steps)):
      glob = jax.tree.map(functools.partial(parallel.global_batch, mesh), local)
      state, metrics = p_steps[aggressive](state, glob, key)
      if step == start:  # the first call compiled: the rate counts steps after it
        rate.restart(step)
      acc = metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)
      for h in hooks:
        h(step + 1)
      done = step + 1
      last = done == num_steps
      if done % t.log_every == 0 or last:  # the one host sync per log interval
        sums, health = jax.device_get((acc, state.health))
        reliability.check_health(health, config, ckpt.latest_step())
        if aggressive:
          mi = float(sums["mi_batch_nats"]) / max(float(sums["good_steps"]), 1.0)
          if mi_prev is not None and mi <= mi_prev:
            aggressive = False
            parallel.main_print(f"step {done}: aggressive inference ends (batch I_q(x; w) "
                                f"{mi:.4g} <= {mi_prev:.4g} nats over the last interval)")
          mi_prev = mi
        scalars, skipped = _write_train_scalars(writer, done, sums, health, skipped)
        parallel.main_print(console.train_line(done, num_steps, scalars, rate(done)))
        acc = None
      evaluate_now = not last and t.eval_every and done % t.eval_every == 0
      if not (last or evaluate_now or stop or done % t.checkpoint_every == 0):
        continue
      # Never evaluate or save a halted state; evaluate before saving so a kill in
      # between redoes the evaluation on resume; flush logs so none are lost. The last
      # step saves first and is evaluated after the loop: an evaluation that fails
      # never costs the training.
      reliability.check_health(jax.device_get(state.health), config, ckpt.latest_step())
      best = None
      if evaluate_now:
        summary = _eval_and_write(model, state, ds, config, mesh, writer, done, workdir,
                                  full=last or config.eval.periodic_full)
        if math.isfinite(summary.get("bpd", math.nan)):  # NaN: no bound (point mass)
          best = {checkpoints.BEST_METRIC: summary["bpd"]}
        rate.restart(done)  # steps/s counts training only
      writer.flush()
      ckpt.save(done, state, dict(meta_base, step=done, data_position=done,
                                  aggressive=aggressive, aggressive_mi=mi_prev,
                                  metric_sums=_sums_to_json(acc)), metrics=best)
      if stop:
        ckpt.close()
        raise reliability.Interrupted(stop.signum, done, finished=last,
                                      phase="the final save")
  # Training is finished and saved (now or by an earlier launch): a signal from here on
  # ends the job as done (exit 0).
  with reliability.raise_on_signals("the final evaluation", step=int(state.step),
                                    finished=True):
    summary = _eval_and_write(model, state, ds, config, mesh, writer, int(state.step), workdir)
  writer.flush()
  ckpt.close()
  return summary


def _write_train_scalars(writer, step, sums, health, skipped_before):
  """Writes averages over the applied steps of the interval and the skip count; returns
  (those scalars, the skip count)."""
  good = float(sums.pop("good_steps"))
  scalars = {f"train/{k}": float(v) / good for k, v in sums.items()} if good else {}
  scalars["train/skipped_steps"] = int(health["skipped"])
  writer.write_scalars(step, scalars)
  if int(health["skipped"]) > skipped_before:
    parallel.main_print(f"step {step}: {reliability.skip_note(health)}")
  return scalars, int(health["skipped"])


def _sums_to_json(acc):
  """Metric sums as exact JSON (float32 -> Python float is exact), or None."""
  if acc is None:
    return None
  return {k: [float(v), str(v.dtype)] for k, v in jax.device_get(acc).items()}


def _sums_from_json(sums):
  return None if sums is None else {k: jnp.asarray(v, d) for k, (v, d) in sums.items()}


def _eval_and_write(model, state, ds, config, mesh, writer, step, workdir, full=True):
  """Evaluates the EMA parameters; returns the report's flat metrics (see vdmrep/report.py)."""
  rep = evaluators.run_evaluation(model, state.ema_params, ds, config, mesh, step=step,
                                  workdir=workdir, writer=writer, full=full)
  return rep["metrics"]


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def evaluate_checkpoint(config, workdir: str, out: str | None = None) -> dict:
  """Evaluates the latest checkpoint in `workdir` (EMA parameters).

  Reads checkpoints only (a trainer may own the workdir). The report, pictures and
  TensorBoard events go to `out` when given (e.g. other evaluators on a finished run,
  leaving its report as it is); else to the workdir, or, if a trainer holds the workdir
  when this starts, to `<workdir>/evals/step<N>/` for its latest complete checkpoint, step
  N, so nothing the trainer writes is overwritten or raced, even if it finishes first.
  """
  ds, model, tx, mesh = setup(config)
  trainer = reliability.training_pid(workdir)  # asked first: the answer holds to the end
  # Read-only: a trainer may own this workdir; nothing in checkpoints/ is changed.
  ckpt = checkpoints.Checkpoints(workdir, keep=config.training.keep_checkpoints,
                                 read_only=True)
  fingerprint = config_lib.model_fingerprint(config)
  if ckpt.check_latest_compatible(fingerprint, ds.image_shape) is None:  # before compiling
    raise checkpoints.CheckpointError(f"no checkpoint to evaluate in {ckpt.directory}")
  reliability.check_workdir(out or workdir)  # the report, pictures and logs are written here
  state = initial_state(model, tx, config, ds.image_shape, mesh)
  restored, _ = ckpt.restore_latest(checkpoints.abstract(state), fingerprint, ds.image_shape)
  if restored is None:
    raise checkpoints.CheckpointError(f"no checkpoint to evaluate in {ckpt.directory}")
  step = int(restored.step)
  if not out and trainer is None:
    out = workdir
  elif not out:
    out = os.path.join(workdir, "evals", f"step{step}")
    os.makedirs(out, exist_ok=True)
    parallel.main_print(f"note: workdir {workdir} is being trained (PID {trainer}); "
                        f"evaluating its latest complete checkpoint (step {step}) into {out}")
  from clu import metric_writers  # here: clu's writers import TensorFlow
  writer = metric_writers.create_default_writer(out, just_logging=jax.process_index() > 0)
  summary = _eval_and_write(model, restored, ds, config, mesh, writer, step, out)
  writer.flush()
  ckpt.close()
  return summary
