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


def _import_graph(package_dir):
  """{module: the package's modules it imports}, imports inside functions included (a
  late import that closes a circle hides it from Python, not from a reader)."""
  import ast
  base = os.path.dirname(package_dir)
  files = {}
  for d, _, names in os.walk(package_dir):
    for n in names:
      if n.endswith(".py"):
        mod = os.path.relpath(os.path.join(d, n), base)[:-3].replace(os.sep, ".")
        files[mod.removesuffix(".__init__")] = os.path.join(d, n)
  graph = {m: set() for m in files}
  for mod, path in files.items():
    package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
    with open(path) as fh:
      tree = ast.parse(fh.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        stem = node.module or ""
        if node.level:  # relative: from . import x, from ..y import z
          parts = package.split(".")
          stem = ".".join(parts[:len(parts) - node.level + 1] + ([stem] if stem else []))
        # `from pkg import sub` runs pkg/__init__ first: it imports pkg as well as sub.
        targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
      else:
        continue
      for t in targets:  # a name imported from a module counts as that module
        while t and t not in files:
          t = t.rpartition(".")[0]
        if t and t != mod:
          graph[mod].add(t)
  return graph


def _cycles(graph):
  """The strongly connected components of more than one module (Tarjan), sorted."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(out)


def test_the_cycle_finder_sees_a_circle_closed_inside_a_function(tmp_path):
  pkg = tmp_path / "pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from pkg import b\n")
  (pkg / "b.py").write_text("def f():\n  from pkg.c import g\n")
  (pkg / "c.py").write_text("import pkg.a\n")
  (pkg / "d.py").write_text("from . import a\n")  # no circle through d
  assert _cycles(_import_graph(str(pkg))) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_the_cycle_finder_sees_a_circle_through_a_package_init(tmp_path):
  sub = tmp_path / "pkg" / "sub"
  sub.mkdir(parents=True)
  (tmp_path / "pkg" / "__init__.py").write_text("")
  (sub / "__init__.py").write_text("from pkg.sub.e import E\n")
  (sub / "e.py").write_text("from pkg.sub import f\nE = 1\n")  # runs sub/__init__ first
  (sub / "f.py").write_text("")
  (sub / "g.py").write_text("import pkg.sub.f as f\n")  # the module alone: no circle
  assert _cycles(_import_graph(str(tmp_path / "pkg"))) == [["pkg.sub", "pkg.sub.e"]]


def test_no_import_cycles_in_vdmrep_counting_imports_inside_functions():
  graph = _import_graph(os.path.join(ROOT, "vdmrep"))
  assert graph["vdmrep.errors"] == set()  # what the modules' config checks raise
  # config_lib.validate calls the modules' checks; none of them imports config_lib back.
  assert {"vdmrep.collapse", "vdmrep.evaluators", "vdmrep.sampling"} <= graph["vdmrep.config_lib"]
  assert _cycles(graph) == []
