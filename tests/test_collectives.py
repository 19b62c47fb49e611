"""The data-parallel step's compiled program moves data between devices only once:
one combined all-reduce (gradients + metrics), no all-gather/all-to-all/permute."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from collectives import count_collectives, run_in_subprocess  # noqa: E402


def test_count_collectives_reads_hlo_text():
  hlo = """
  %all-reduce-start = (f32[3]) all-reduce-start(f32[3] %p), replica_groups={}
  %all-reduce-done = f32[3] all-reduce-done((f32[3]) %all-reduce-start)
  %ag = f32[8] all-gather(f32[1] %x), dimensions={0}
  %y = f32[2] add(f32[2] %a, f32[2] %b), metadata={op_name="all-reduce(fake)"}
  """
  got = count_collectives(hlo)
  assert got["all-reduce"] == 1 and got["all-gather"] == 1 and got["collective-permute"] == 0


def test_sharded_step_has_one_all_reduce_and_no_other_traffic():
  """8 simulated CPU devices, the default (auto) chunked attention included."""
  r = run_in_subprocess(8, vdm="mvdm", encoder="te", batch=16, image=8)
  assert r["devices"] == 8
  assert r["counts"] == {"all-reduce": 1, "all-gather": 0, "all-to-all": 0,
                         "reduce-scatter": 0, "collective-permute": 0}, r
