"""The kernel cache loads only what this user's build recorded (libcache.py).

A shared object runs its constructor the moment it is loaded, so each case plants one
whose constructor writes a marker file and asserts that the marker never appears and
that the one-line reason names the problem. No oneDNN is needed: the cache tag is made
from a stand-in oneDNN prefix; the planted library needs a C compiler (cc, gcc or g++).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[4]
CC = next((c for c in ("cc", "gcc", "g++") if shutil.which(c)), None)
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler to build the planted library")

PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
  FILE *f = fopen(MARKER, "w");
  if (f) { fputs("constructor ran\n", f); fclose(f); }
}
"""

# Runs in a fresh process (a loaded library cannot be unloaded): prints the one-line
# reason, then what model.backend=cpu resolves to.
PROBE = textwrap.dedent("""
    from vdmrep import backends, config_lib
    from vdmrep.backends.cpu import kernels
    print("reason:", kernels.unavailable_reason())
    c = config_lib.base_config().model
    c.backend = "cpu"
    print("resolved:", backends.resolve(c))
    """)


def _env(tmp_path, **extra):
  prefix = tmp_path / "onednn"  # a stand-in install: only its paths enter the cache tag
  (prefix / "include/oneapi/dnnl").mkdir(parents=True, exist_ok=True)
  (prefix / "include/oneapi/dnnl/dnnl.hpp").touch()
  (prefix / "lib").mkdir(exist_ok=True)
  (prefix / "lib/libdnnl.so").touch()
  env = dict(os.environ, VDMREP_KERNEL_CACHE=str(tmp_path / "cache"),
             VDMREP_ONEDNN_PREFIX=str(prefix), JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("VDMREP_REQUIRE_CPU_KERNELS", None)  # CI sets it; these runs expect the fallback
  env.update(extra)
  return env


def _python(code, env):
  return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=300)


def _library_path(env) -> Path:
  out = _python("from vdmrep.backends.cpu import kernels; print(kernels.library_path())", env)
  assert out.returncode == 0, out.stderr[-2000:]
  return Path(out.stdout.strip())


def _plant(tmp_path, env, manifest=None):
  """Builds the constructor library into the cache; returns (library, marker file)."""
  lib = _library_path(env)
  lib.parent.mkdir(parents=True, mode=0o700)
  marker = tmp_path / "constructor-ran"
  src = tmp_path / "planted.c"
  src.write_text(PLANTED)
  subprocess.run([CC, "-shared", "-fPIC", f'-DMARKER="{marker}"', str(src), "-o", str(lib)],
                 check=True)
  os.chmod(lib, 0o755)
  if manifest is not None:
    data = lib.read_bytes()
    record = {"library": lib.name, "size": len(data), "uid": os.geteuid(),
              "sha256": hashlib.sha256(data).hexdigest(), "command": ["g++"]}
    record.update(manifest)
    (lib.parent / "vdmrep_kernels.json").write_text(json.dumps(record))
  return lib, marker


def _probe(env):
  out = _python(PROBE, env)
  assert out.returncode == 0, out.stderr[-3000:]
  reason = out.stdout.split("reason: ", 1)[1].split("\n", 1)[0]
  assert out.stdout.strip().endswith("resolved: xla"), out.stdout
  notes = [l for l in out.stderr.splitlines() if l.startswith("model.backend=cpu")]
  assert notes == [f"model.backend=cpu: using XLA ({reason})"], out.stderr[-2000:]
  return reason


@needs_cc
def test_the_planted_library_runs_its_constructor_when_loaded(tmp_path):
  """The control: loading the planted library writes the marker, so its absence in the
  tests below means it was not loaded."""
  lib, marker = _plant(tmp_path, _env(tmp_path))
  out = _python(f"import ctypes; ctypes.CDLL({str(lib)!r})", _env(tmp_path))
  assert out.returncode == 0, out.stderr
  assert marker.read_text() == "constructor ran\n"


@needs_cc
@pytest.mark.parametrize("case", ["no_manifest", "other_digest", "empty_library",
                                  "group_writable_dir", "world_writable_library",
                                  "group_writable_root", "other_builder"])
def test_a_planted_library_is_never_loaded(tmp_path, case):
  env = _env(tmp_path)
  manifest = {"no_manifest": None, "other_digest": {"sha256": "0" * 64},
              "other_builder": {"uid": os.geteuid() + 1}}.get(case, {})
  lib, marker = _plant(tmp_path, env, manifest)
  cache = tmp_path / "cache"
  refuse = f"refusing to load the CPU kernels {lib}: "
  if case == "empty_library":
    lib.write_bytes(b"")
  elif case == "group_writable_dir":
    os.chmod(lib.parent, 0o770)
  elif case == "world_writable_library":
    os.chmod(lib, 0o757)
  elif case == "group_writable_root":
    os.chmod(cache, 0o775)
  reason = _probe(env)
  assert not marker.exists(), "the planted library's constructor ran"
  expected = {
      "no_manifest": f"it has no build manifest ({lib.parent / 'vdmrep_kernels.json'} is "
                     "missing), so it was not built by python -m vdmrep.backends.cpu.build; "
                     "rebuild it with that command",
      "other_digest": "its contents (",
      "empty_library": "its contents (0 bytes, SHA-256 e3b0c44298fc...) differ from what its "
                       "build recorded (",
      "group_writable_dir": f"{lib.parent} is writable by group or others (mode 770); ",
      "world_writable_library": f"{lib} is writable by group or others (mode 757); ",
      "group_writable_root": f"{cache} is writable by group or others (mode 775); ",
      "other_builder": f"its build manifest {lib.parent / 'vdmrep_kernels.json'} records "
                       f"another builder (uid {os.geteuid() + 1})",
  }[case]
  assert reason.startswith(refuse + expected), reason
  if case in ("other_digest", "empty_library"):
    assert "corrupt, empty or replaced; rebuild it with python -m vdmrep.backends.cpu.build" \
        in reason


@needs_cc
@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
@pytest.mark.parametrize("what", ["library", "directory", "root"])
def test_a_library_owned_by_another_user_is_never_loaded(tmp_path, what):
  env = _env(tmp_path)
  lib, marker = _plant(tmp_path, env, manifest={})
  path = {"library": lib, "directory": lib.parent, "root": tmp_path / "cache"}[what]
  os.chown(path, 65534, 65534)
  reason = _probe(env)
  assert not marker.exists()
  assert reason.startswith(f"refusing to load the CPU kernels {lib}: {path} is owned by uid "
                           "65534, not this user (uid 0); fix its owner or mode, or point "
                           "VDMREP_KERNEL_CACHE at a directory only you can write"), reason


@needs_cc
def test_require_cpu_kernels_turns_the_refusal_into_an_error(tmp_path):
  env = _env(tmp_path, VDMREP_REQUIRE_CPU_KERNELS="1")
  lib, marker = _plant(tmp_path, env)
  out = _python(PROBE, env)
  assert out.returncode != 0 and not marker.exists()
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("vdmrep.errors.ConfigError: model.backend=cpu: the CPU kernels "
                         f"cannot be loaded (refusing to load the CPU kernels {lib}: it has "
                         "no build manifest"), last
  assert last.endswith("and VDMREP_REQUIRE_CPU_KERNELS=1 forbids falling back to XLA")


# A stand-in compiler ($CXX is a command line: interpreter + script): it writes a small
# file as "the library" and logs each call, or fails like a compiler.
FAKE_CXX = textwrap.dedent("""
    import sys
    with open({log!r}, "a") as f:
      f.write("called\\n")
    if {fail!r}:
      sys.stderr.write("planted.cc:1:1: error: expected unqualified-id\\n")
      sys.exit(1)
    with open(sys.argv[sys.argv.index("-o") + 1], "wb") as f:
      f.write(b"built by the stand-in compiler")
    """)


def _fake_cxx(tmp_path, fail):
  script = tmp_path / ("fail_cxx.py" if fail else "cxx.py")
  log = tmp_path / "cxx.log"
  script.write_text(FAKE_CXX.format(log=str(log), fail=fail))
  return f"{sys.executable} {script}", log


BUILD = textwrap.dedent("""
    from vdmrep.backends.cpu import build, kernels, libcache
    try:
      path = build.build()
      print("built:", path, libcache.is_verified(path))
    except OSError as e:
      print("error:", str(e).splitlines()[0])
    print("reason:", kernels.unavailable_reason())
    """)


def test_an_empty_library_is_rebuilt_once_and_a_failed_build_is_remembered(tmp_path):
  """CXX is parsed as a command line; a 0-byte library is replaced and its digest
  recorded; a verified one is not rebuilt; a failed build is recorded and reported in one
  line until a build succeeds."""
  ok_cxx, log = _fake_cxx(tmp_path, fail=False)
  bad_cxx, _ = _fake_cxx(tmp_path, fail=True)
  env = _env(tmp_path, CXX=ok_cxx)
  lib = _library_path(env)
  lib.parent.mkdir(parents=True)
  lib.write_bytes(b"")  # what an interrupted or full-disk copy leaves
  out = _python(BUILD, env)
  assert f"built: {lib} True" in out.stdout, out.stdout + out.stderr[-2000:]
  assert lib.read_bytes() == b"built by the stand-in compiler"
  manifest = json.loads((lib.parent / "vdmrep_kernels.json").read_text())
  assert manifest["sha256"] == hashlib.sha256(lib.read_bytes()).hexdigest()
  assert manifest["command"][:2] == ok_cxx.split()
  assert _python(BUILD, env).returncode == 0
  assert log.read_text() == "called\n"  # verified: not rebuilt
  lib.write_bytes(b"")
  out = _python(BUILD, dict(env, CXX=bad_cxx))
  failed = lib.parent / "build-failed.log"
  assert "error: building the CPU kernels failed (" in out.stdout
  reason = out.stdout.split("reason: ", 1)[1].strip()
  assert reason == (f"the last build of the CPU kernels failed ({sys.executable} exited 1: "
                    f"planted.cc:1:1: error: expected unqualified-id; log: {failed}); fix the "
                    "cause and rerun python -m vdmrep.backends.cpu.build"), reason
  lib.unlink()  # a failed build with no library at all: reported the same way
  assert _probe(dict(env, CXX=bad_cxx)) == reason
  out = _python(BUILD, env)
  assert f"built: {lib} True" in out.stdout and not failed.exists()


@pytest.mark.parametrize("cxx,message", [
    ("'g++", "CXX=\"'g++\" is not a valid command line (No closing quotation)"),
    ("/no/such/compiler -O1", "cannot run the C++ compiler '/no/such/compiler' (No such file "
                              "or directory); install one or set CXX"),
])
def test_bad_cxx_is_one_line(tmp_path, cxx, message):
  out = _python(BUILD, _env(tmp_path, CXX=cxx))
  assert f"error: {message}\n" in out.stdout, out.stdout + out.stderr[-2000:]


def test_every_kernel_source_is_package_data():
  """A non-editable install ships every file the build compiles or hashes (a header left
  out made the build fail there, and the backend fall back to XLA)."""
  import fnmatch
  tomllib = pytest.importorskip("tomllib")
  pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
  globs = pyproject["tool"]["setuptools"]["package-data"]["vdmrep.backends.cpu"]
  from vdmrep.backends.cpu import kernels
  package = REPO / "vdmrep" / "backends" / "cpu"
  used = [p.relative_to(package).as_posix() for p in kernels.SOURCES + kernels.HEADERS]
  present = [p.relative_to(package).as_posix() for p in (package / "csrc").iterdir()]
  assert set(used) <= set(present)
  assert [f for f in present if not any(fnmatch.fnmatch(f, g) for g in globs)] == []
