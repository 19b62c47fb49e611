"""The data-parallel step's compiled program moves data between devices only as one
combined all-reduce of all gradients (the scalar and batch-statistics metrics ride in
it), no all-gather/all-to-all/reduce-scatter/permute."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks.collectives import all_reduce_sizes, count_collectives, run_in_subprocess


def test_count_collectives_reads_hlo_text():
  hlo = """
  %all-reduce-start = (f32[3]) all-reduce-start(f32[3] %p), replica_groups={}
  %all-reduce-done = f32[3] all-reduce-done((f32[3]) %all-reduce-start)
  %ag = f32[8] all-gather(f32[1] %x), dimensions={0}
  %y = f32[2] add(f32[2] %a, f32[2] %b), metadata={op_name="all-reduce(fake)"}
  """
  got = count_collectives(hlo)
  assert got["all-reduce"] == 1 and got["all-gather"] == 1 and got["collective-permute"] == 0
  assert all_reduce_sizes(hlo) == [3]
  two = "%ar = (f32[2,3]{1,0}, /*index=1*/f32[], s32[4]{0}) all-reduce(%a, %b, %c), x={}"
  assert all_reduce_sizes(two) == [6 + 1 + 4]


@pytest.mark.slow
def test_sharded_step_has_one_all_reduce_and_no_other_traffic():
  """8 simulated CPU devices, the default (auto) chunked attention included."""
  r = run_in_subprocess(8, vdm="mvdm", encoder="te", batch=16, image=8)
  assert r["devices"] == 8
  others = {k: v for k, v in r["counts"].items() if k != "all-reduce"}
  assert others == dict.fromkeys(others, 0), r
  # Exactly one all-reduce: every gradient, plus the metrics (te latent D = 128: the
  # batch statistics' 3D sums and a few scalars, far fewer than the parameters).
  assert len(r["all_reduce_sizes"]) == 1, r
  assert r["num_params"] <= r["all_reduce_sizes"][0] < r["num_params"] + 1000, r
