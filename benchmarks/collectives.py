"""Counts the cross-device ops in the compiled data-parallel train step.

  python -m benchmarks.collectives --devices 8 [--vdm mvdm --encoder te --batch 16 --image 8]

Runs itself in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N
(the flag must be set before jax starts) and prints, from the compiled HLO text, how
many all-reduce, all-gather, all-to-all, reduce-scatter and collective-permute ops one
step contains, and how many values each all-reduce carries. Data parallelism needs
one combined all-reduce of all the gradients and nothing else; the step's metrics
(including `diagnostics.batch_stats`, written as independent batch sums) ride in it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys

COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")


# One HLO instruction: `name = TYPE opcode(operands), attributes`; TYPE is one token
# (f32[8]{0}) or a tuple in parentheses. Only the opcode counts, not metadata strings.
_INSTRUCTION = re.compile(r"=\s+(\([^()]*\)|\S+)\s+([a-z][\w\-]*)\(")
_ARRAY = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def count_collectives(hlo_text: str) -> dict:
  """Collective ops in compiled HLO text -> {op name: count} (async start/done pairs once)."""
  counts = dict.fromkeys(COLLECTIVES, 0)
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.search(line)
    if m:
      op = m.group(2).removesuffix("-start")
      if op in counts:
        counts[op] += 1
  return counts


def all_reduce_sizes(hlo_text: str) -> list:
  """Number of values each all-reduce in the HLO text carries (sum over its operands)."""
  sizes = []
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.search(line)
    if m and m.group(2) in ("all-reduce", "all-reduce-start"):
      total = 0
      for dims in _ARRAY.findall(m.group(1)):
        total += math.prod(int(d) for d in dims.split(",") if d)
      sizes.append(total)
  return sizes


def step_hlo(vdm, encoder, batch, image, config_overrides=None) -> str:
  """Compiled HLO text of the sharded train step on all visible devices."""
  import jax
  import numpy as np

  from vdmrep import config_lib, parallel
  from vdmrep import train as train_lib
  from vdmrep.models import build_model

  config = config_lib.base_config()
  config.model.vdm, config.model.encoder = vdm, encoder
  config.model.n_blocks, config.model.channels = (1, 8) if vdm == "mvdm" else (0, 0)
  config.training.batch_size = batch
  for k, v in (config_overrides or {}).items():
    section, key = k.split(".")
    config[section][key] = v
  config_lib.validate(config, jax.device_count())
  model = build_model(config.model)
  tx = train_lib.make_optimizer(config.optim)
  mesh = parallel.make_mesh()
  shape = (image, image, 1)
  state = train_lib.initial_state(model, tx, config, shape, mesh)
  x = parallel.global_batch(mesh, np.zeros((batch,) + shape, np.uint8))
  step = train_lib.make_train_step(model, tx, config, mesh)
  return step.lower(state, x, jax.random.key(0)).compile().as_text(), train_lib.count_params(
      state.params)


def run_in_subprocess(devices: int, vdm="mvdm", encoder="te", batch=16, image=8,
                      overrides=None) -> dict:
  """Counts for the step compiled on `devices` simulated CPU devices (fresh process)."""
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + f" --xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ("import json\n"
          "import jax\n"
          "from benchmarks.collectives import all_reduce_sizes, count_collectives, step_hlo\n"
          "hlo, n = step_hlo(%r, %r, %d, %d, %r)\n"
          "print('RESULT' + json.dumps(dict(devices=jax.device_count(), num_params=n, "
          "counts=count_collectives(hlo), all_reduce_sizes=all_reduce_sizes(hlo))))\n") % (
              vdm, encoder, batch, image, overrides or {})
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=root)
  for line in out.stdout.splitlines():
    if line.startswith("RESULT"):
      return json.loads(line[len("RESULT"):])
  raise RuntimeError(f"subprocess failed:\n{out.stderr[-3000:]}")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--vdm", default="mvdm")
  p.add_argument("--encoder", default="te")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--image", type=int, default=8)
  args = p.parse_args()
  r = run_in_subprocess(args.devices, args.vdm, args.encoder, args.batch, args.image)
  print(f"| devices | model | params | batch | image | " + " | ".join(COLLECTIVES)
        + " | values per all-reduce |")
  print("|---" * (6 + len(COLLECTIVES)) + "|")
  print(f"| {r['devices']} | {args.vdm}+{args.encoder} | {r['num_params']} | {args.batch} | "
        f"{args.image}x{args.image} | " + " | ".join(str(r["counts"][c]) for c in COLLECTIVES)
        + f" | {r['all_reduce_sizes']} |")


if __name__ == "__main__":
  main()
