"""The train step, losses and models import without TensorFlow (clu's writers and tfds
need it; they are imported where used): what lets the step run on a machine that has
jax but no TensorFlow, such as a GPU box with only the accelerator's jax installed."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "clu", "keras"):
      raise ImportError("blocked for the test: " + name)
sys.meta_path.insert(0, Block())
from vdmrep import losses, train
from vdmrep.models import build_model
print("imported", sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "clu")))
"""


def test_train_step_imports_without_tensorflow_or_clu():
  done = subprocess.run([sys.executable, "-c", _BLOCK], cwd=ROOT, capture_output=True,
                        text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().endswith("imported []")
