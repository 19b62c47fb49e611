"""Shared helpers for the benchmarks: timing, XLA cost/memory analysis, matmul peak.

Every benchmark times a compiled function (compile excluded), repeats it, and reports
the median and spread (min..max) in seconds, FLOPs from XLA's cost analysis, achieved
FLOP/s, the fraction of this machine's matmul peak (measured in the same process, in
the dtype the benchmark computes in),
and memory (XLA's compiled memory analysis and the process's peak RSS).
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

# A benchmark run as a script gets glibc's malloc settings for XLA's per-step buffers
# (huge pages, memory kept between steps; vdmrep/backends/cpu/hostmem.py). Not when
# imported by anything else (pytest): re-executing would replace that process.
if os.path.dirname(os.path.abspath(sys.argv[0])) == os.path.dirname(os.path.abspath(__file__)):
  from vdmrep.backends.cpu import hostmem  # noqa: E402
  hostmem.reexec_with_malloc_tunables()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def block(x):
  return jax.block_until_ready(x)


def time_fn(fn, *args, repeats: int = 5, warmup: int = 1):
  """Calls fn(*args) `warmup` times, then `repeats` times; returns the list of seconds."""
  for _ in range(warmup):
    block(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    block(fn(*args))
    times.append(time.perf_counter() - t0)
  return times


def summary(times):
  """(median, min, max) seconds."""
  return statistics.median(times), min(times), max(times)


def _cost_flops(stage) -> float:
  """The "flops" of `stage.cost_analysis()` (a Lowered or Compiled), or nan where the
  backend gives none (it raises, or returns None or an empty dict)."""
  try:
    cost = stage.cost_analysis()
  except Exception:  # NotImplementedError, or a runtime error naming UNIMPLEMENTED
    return float("nan")
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def flops_of(compiled) -> float:
  """FLOPs of one call of a compiled XLA executable (its cost analysis), or nan."""
  return _cost_flops(compiled)


def lowered_flops(lowered) -> float:
  """FLOPs of a lowered function from XLA's cost analysis, or nan.

  XLA counts a loop body once, whatever its trip count: benchmarks therefore count
  the FLOPs of the loop-free form of the same mathematics (attention over the whole
  batch at once, no remat, one Monte Carlo draw times K), the usual "model FLOPs".

  The count is of the program before optimisation, which CPU can analyse and CUDA's
  plugin cannot (there: nan, and the benchmarks call `flops_on_cpu`). The compiled
  program's count is no substitute on GPUs: XLA's GPU cost analysis leaves out the
  cuDNN convolutions (SVDM+OE, batch 64: 81 GFLOP per step compiled for an H100,
  1129 GFLOP counted before optimisation).
  """
  return _cost_flops(lowered)


def flops_on_cpu(module: str, args: list[str]) -> float:
  """Runs `python -m module *args` (from the repository root) on the CPU backend alone and returns the number it
  prints on a line `flops=N` (nan if none).

  For accelerators whose plugin cannot analyse a lowered module (jax 0.11.2's CUDA
  plugin on an H100: `Lowered.cost_analysis()` returns None): the same function,
  traced and lowered for CPU, has the same convolutions, matmuls and elementwise
  operations, so XLA's count of it is the model's FLOPs. Lowering only: nothing
  compiles or runs.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True,
                        text=True, check=False, cwd=ROOT)
  for line in reversed(done.stdout.splitlines()):
    if line.startswith("flops="):
      return float(line.split("=", 1)[1])
  print(f"flops_on_cpu: no count from {module} (exit {done.returncode}):\n{done.stderr[-2000:]}")
  return float("nan")


def memory_of(compiled) -> dict:
  """Compiled memory analysis in bytes: arguments, outputs, temporaries (may be empty)."""
  try:
    m = compiled.memory_analysis()
  except Exception:
    return {}
  if m is None:
    return {}
  return {"args": m.argument_size_in_bytes, "out": m.output_size_in_bytes,
          "temp": m.temp_size_in_bytes, "alias": m.alias_size_in_bytes}


def stream_bandwidth(mib: float, repeats: int = 9) -> float:
  """Measured bytes/s of y = 1.5 x + 0.5 over a float32 array of `mib` MiB (bytes read
  plus bytes written, divided by the median time).

  The elementwise roofline: an array that fits the last-level cache (a few MiB) gives
  the cache's rate; one far larger (hundreds of MiB) the memory's. A train step's
  activations are tens of MiB each pass and hundreds in all, so its normalisation,
  swish, add and concatenate passes run near the second.
  """
  n = int(mib * 2 ** 20) // 4
  x = jnp.ones((n,), jnp.float32)
  f = jax.jit(lambda x: x * 1.5 + 0.5)
  med, _, _ = summary(time_fn(f, x, repeats=repeats, warmup=2))
  return 2.0 * 4 * n / med


def peak_rss_mib() -> float:
  """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def matmul_peak(n: int | None = None, repeats: int = 9, dtype=jnp.float32) -> float:
  """Measured FLOP/s of one n x n x n `jnp.dot` in `dtype` (2 n^3 FLOPs): the best of
  `repeats` calls, since a peak is what the machine can do (a median let one slow
  moment on this VM read 106 GFLOP/s where calls minutes later gave 196-208).

  n defaults to 2048 on CPU and 8192 on accelerators (a 2048^3 product takes tens of
  microseconds on a GPU, too short to reach its rate). Default matmul precision, as the
  model uses: on NVIDIA GPUs that makes a float32 product TF32.
  """
  if n is None:
    n = 2048 if jax.default_backend() == "cpu" else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(jnp.dot)
  _, best, _ = summary(time_fn(f, a, b, repeats=repeats, warmup=2))
  return 2.0 * n ** 3 / best


def hardware() -> str:
  dev = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as fh:
      for line in fh:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  kind = dev.device_kind if dev.platform != "cpu" else cpu
  return f"{dev.platform} x{jax.device_count()} ({kind}; {os.cpu_count()} host cores), jax {jax.__version__}"


def _cpu_ticks_of_others() -> int:
  """utime + stime (clock ticks) of every process but this one (Linux /proc)."""
  me, total = os.getpid(), 0
  for pid in os.listdir("/proc"):
    if not pid.isdigit() or int(pid) == me:
      continue
    try:
      with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
      total += int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, IndexError, ValueError):
      continue  # the process ended while we read
  return total


def load_note(window_s: float = 1.0) -> str:
  """CPU cores busy with *other* processes over `window_s`, vs the machine's cores.

  The load average would count this benchmark's own threads; this does not. Figures
  taken while others use more than a quarter of the cores are flagged UNDER LOAD.
  """
  cores = os.cpu_count() or 1
  try:
    before, t0 = _cpu_ticks_of_others(), time.perf_counter()
    time.sleep(window_s)
    busy = (_cpu_ticks_of_others() - before) / os.sysconf("SC_CLK_TCK")
    busy /= time.perf_counter() - t0
  except (OSError, ValueError):
    return ""
  return (f"other processes busy {busy:.2f}/{cores} cores" +
          (" (UNDER LOAD)" if busy > 0.25 * cores else ""))


def step_parser(doc: str) -> argparse.ArgumentParser:
  """An argument parser (description: doc's first line) with the model and batch every
  train-step benchmark takes: --vdm, --encoder, --batch, --image (defaults: TVDM + TE,
  64 images of 28x28, the CPU speed target's shape)."""
  p = argparse.ArgumentParser(description=doc.splitlines()[0])
  p.add_argument("--vdm", default="tvdm")
  p.add_argument("--encoder", default="te")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--image", type=int, default=28)
  return p


def fmt_s(x: float) -> str:
  return f"{x:.3f}" if x < 10 else f"{x:.1f}"
