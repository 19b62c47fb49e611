"""Study A: the reference grid, VDM size x encoder (incl. UE and unconditional) x beta.

Reproduces the reference study's ablation at its hidden setting (beta = 1e4, KL in
bits/dim) and at the true ELBO (beta = 1), and writes a markdown table + figures:

  python experiments/collapse_grid.py --out experiments/out/grid_digits            # CPU budget
  python experiments/collapse_grid.py --dataset mnist --vdm mvdm --encoders te,ue,none \
      --steps 3000 --out experiments/out/grid_mnist                                # MNIST subset
  python experiments/collapse_grid.py --full-budget --dataset mnist --out ...      # accelerators

Re-running skips finished runs (those with report.json) and resumes unfinished ones.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import study_common as sc  # noqa: E402


def runs_for(args) -> list:
  runs = []
  for vdm in args.vdm.split(","):
    for enc in args.encoders.split(","):
      # ue and none have no KL term in their objective: beta does not apply.
      betas = ["-"] if enc in ("ue", "none") else args.betas.split(",")
      for beta in betas:
        name = f"{vdm}_{enc}" + ("" if beta == "-" else f"_beta{beta}")
        overrides = [f"--config.model.vdm={vdm}", f"--config.model.encoder={enc}"]
        if beta != "-":
          overrides.append(f"--config.collapse.beta={float(beta)}")
        runs.append(harness.Run(name, sc.base_config_file(args), sc.budget_overrides(args)
                                + overrides, labels={"VDM": vdm, "encoder": enc, "beta": beta}))
  return runs


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  sc.add_common_flags(p)
  p.add_argument("--vdm", default="svdm,tvdm,mvdm")
  p.add_argument("--encoders", default="oepp,oe,se,te,ue,none")
  p.add_argument("--betas", default="10000,1")
  args = p.parse_args()
  runs = sc.with_seeds(runs_for(args), sc.parse_seeds(args.seeds))
  if not args.table_only:
    harness.run_all(args.out, runs, parallel=args.parallel)
  sc.write_results(args, runs, title=f"Study A: the reference grid (VDM size x encoder x beta) on {args.dataset}",
                   label_cols=["VDM", "encoder", "beta"], filename="results_grid.md",
                   baseline_of=lambda key: (key[0], "none", "-"),
                   baseline_note="the same VDM size without an encoder, same seed")


if __name__ == "__main__":
  main()
