"""vdmrep: a VAE with a Variational Diffusion Model decoder, in JAX.

Where things are (data flow left to right: config -> data -> model -> loss -> step ->
evaluation, samples and report):

  config_lib.py   the base ConfigDict and `validate` (every key checked before compiling;
                  errors.py: the ConfigError the modules' checks raise)
  data.py         sources (digits, fashion_mnist, idx:, npz:, tfds:) -> deterministic batches
  models/         encoder q(w|x), gamma schedules, the score network, VAEVDM (ELBO terms)
  losses.py       the objective's pure functions (nats per example; bpd conversion)
  collapse.py     beta, annealing, free bits, capacity, MMD: the trained objective
  train.py        TrainState, train_step, train_and_evaluate (sharded, orbax, clu)
  evaluators/     one evaluator per module (ELBO, baselines, latents, probes, OOD, samples,
                  pictures), one interface, chosen by config.eval.evaluators
  sampling.py     the ancestral sampler (any step count), guided and trajectory modes
  main.py         `python -m vdmrep.main --config configs/X.py --workdir DIR`; console.py
                  (what it prints), sample_mode.py (`--mode sample`)
  backends/       who computes the blocks: XLA (the plain flax model) or the optional
                  CPU kernels (backends/cpu: drop-ins with the same parameters)
  and around them: parallel.py (mesh, sharding), checkpoints.py, probes.py,
  diagnostics.py, quality.py (Frechet distances), plots.py, report.py

Importing `vdmrep` loads nothing heavy; import the module you need, e.g.
`from vdmrep import losses`.
"""
from importlib import metadata as _metadata

try:
  __version__ = _metadata.version("vdmrep")
except _metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH, not installed
  __version__ = "0+unknown"
