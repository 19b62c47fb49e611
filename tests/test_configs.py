"""Config files: variants by argument (big_vision style), each valid, and loading one
imports no jax (a config is data; it must load where jax is absent or slow to import)."""
import os
import subprocess
import sys

import pytest

from configs import common, digits, fashion_mnist, mnist
from vdmrep import collapse, config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(f for f in os.listdir(os.path.join(ROOT, "configs"))
               if f.endswith(".py") and f not in ("__init__.py", "common.py"))

_LOAD = """
import importlib.util, sys
for name, arg in {cases!r}:
  spec = importlib.util.spec_from_file_location("cfg", "configs/" + name)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  mod.get_config(arg)
heavy = ("jax", "jaxlib", "flax", "optax", "tensorflow", "matplotlib", "orbax", "clu")
print("heavy:", sorted(m for m in sys.modules if m.split(".")[0] in heavy))
"""


def test_loading_any_config_imports_no_jax():
  cases = [(f, None) for f in FILES] + [("digits.py", "remedy=capacity,classes=true"),
                                        ("mnist.py", "remedy=infovae,source=idx:x")]
  done = subprocess.run([sys.executable, "-c", _LOAD.format(cases=cases)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().endswith("heavy: []"), done.stdout


@pytest.mark.parametrize("module,remedy", [(m, r) for m in (digits, mnist)
                                           for r in common.REMEDIES])
def test_every_remedy_variant_validates(module, remedy):
  c = module.get_config(f"remedy={remedy}")
  config_lib.validate(c)
  # Only the ELBO's own variants train a bound; every remedy changes the objective.
  assert collapse.is_bound(c)[0] == (remedy in ("elbo", "film", "unconditional", "vae"))


def test_every_config_file_and_fashion_variant_validates():
  import importlib.util
  for name in FILES:
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs", name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config_lib.validate(mod.get_config())
  for remedy in fashion_mnist.REMEDIES:
    config_lib.validate(fashion_mnist.get_config(f"remedy={remedy},steps=1000"))


def test_variants_set_what_their_names_say():
  ref = mnist.get_config("remedy=reference_beta1e4")
  assert (ref.collapse.schedule, ref.collapse.beta, ref.training.num_steps) == (
      "constant", 1e4, 100_000)
  assert ref.data.source == "tfds:mnist"
  assert mnist.get_config("source=idx:/data/m").data.source == "idx:/data/m"
  assert mnist.get_config("remedy=capacity").collapse.capacity_steps == 50_000
  assert digits.get_config("remedy=capacity").collapse.capacity_steps == 1000
  assert fashion_mnist.get_config("remedy=capacity,steps=800").collapse.capacity_steps == 400
  cls = digits.get_config("classes=true")
  assert (cls.model.num_classes, cls.model.label_dropout) == (10, 0.1)
  assert digits.get_config().model.num_classes == 0
  base = digits.get_config()
  assert digits.get_config("remedy=elbo").to_dict() == base.to_dict()  # the default


@pytest.mark.parametrize("arg,match", [
    ("remedy=nope", r"remedy='nope': choose one of"),
    ("remdy=elbo", r"configs/digits.py:remdy=elbo: expected key=value pairs"),
    ("remedy", r"expected key=value pairs"),
    ("classes=maybe", r"classes='maybe'; expected true or false"),
])
def test_a_bad_argument_is_one_line_naming_it(arg, match):
  with pytest.raises(ValueError, match=match):
    digits.get_config(arg)
