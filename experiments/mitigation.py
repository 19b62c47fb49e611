"""Study B: every collapse remedy for one decoder size, same columns as study A.

  python experiments/mitigation.py --out experiments/out/mitigation_digits        # CPU budget
  python experiments/mitigation.py --dataset mnist --steps 3000 --out ...          # MNIST
  VDMREP_MNIST_SOURCE=idx:DIR python experiments/mitigation.py --dataset mnist ...  # offline
  python experiments/mitigation.py --dataset mnist --only unconditional,elbo,free_bits ...
  python experiments/mitigation.py --full-budget --dataset mnist --out ...         # accelerators

Each remedy is a config variant (`configs/<dataset>.py:remedy=<remedy>`), so the table's
rows are exactly the configs a user would run by hand. Re-running skips finished runs.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import study_common as sc  # noqa: E402

# (row label, remedy (configs/common.py), extra overrides)
REMEDIES = [
    ("unconditional VDM", "unconditional", []),
    ("ELBO (beta = 1), additive", "elbo", []),
    ("ELBO (beta = 1), film", "elbo", ["--config.model.conditioning=film"]),
    ("reference beta = 1e4", "reference_beta1e4", []),
    ("UE: no KL", "ue", []),
    ("KL warm-up", "kl_warmup", []),
    ("cyclical annealing", "cyclical", []),
    ("free bits", "free_bits", []),
    ("KL capacity", "capacity", []),
    ("InfoVAE MMD", "infovae", []),
    ("deterministic + MMD (InfoDiffusion)", "infodiffusion", []),
    ("high-noise weighting", "high_noise", []),
]


def runs_for(args) -> list:
  runs = []
  for label, suffix, extra in REMEDIES:
    name = suffix + ("_film" if "--config.model.conditioning=film" in extra else "")
    cfg = f"configs/{args.dataset}.py:remedy={suffix}"
    overrides = sc.budget_overrides(args) + \
        [f"--config.model.vdm={args.vdm}", f"--config.model.encoder={args.encoder}"] + extra
    if suffix in ("unconditional", "ue"):
      overrides = [o for o in overrides if not o.startswith("--config.model.encoder=")]
    runs.append(harness.Run(name, cfg, overrides, labels={"remedy": label}))
  if args.only:
    wanted = args.only.split(",")
    unknown = sorted(set(wanted) - {r.name for r in runs})
    if unknown:
      raise SystemExit(f"error: --only: unknown run(s) {unknown}; known: "
                       f"{[r.name for r in runs]}")
    runs = [r for r in runs if r.name in wanted]
  return runs


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  sc.add_common_flags(p)
  p.add_argument("--vdm", default="mvdm")
  p.add_argument("--encoder", default="te")
  p.add_argument("--only", default="", help="comma-separated run names (e.g. "
                 "unconditional,elbo,free_bits); default: every remedy")
  args = p.parse_args()
  runs = sc.with_seeds(runs_for(args), sc.parse_seeds(args.seeds))
  if not args.table_only:
    harness.run_all(args.out, runs, parallel=args.parallel)
  title = f"Study B: collapse remedies ({args.vdm} + {args.encoder}) on {args.dataset}"
  sc.write_results(args, runs, title=title, label_cols=["remedy"],
                   filename="results_mitigation.md",
                   baseline_of=lambda key: (REMEDIES[0][0],),
                   baseline_note=f"the {REMEDIES[0][0]} trained with the same seed")


if __name__ == "__main__":
  main()
