"""Where the compiled train step's time goes, op by op (CPU backend).

  python -m benchmarks.trace_step --vdm tvdm --encoder te --batch 64 --image 28 --steps 3

Traces a few steps of the compiled train step with `jax.profiler`, reads the time of
every op XLA's CPU runtime executed (one trace event per op on XLA's threads), names
each op by the model code it came from (the `op_name` metadata of the compiled HLO;
ops inside loop bodies and fusions inherit their caller's, ops XLA's passes made
without one their operands') and sums them into groups:
convolutions, GroupNorm + swish, the attention blocks, the U-Net's skip concatenations,
... , split into forward and backward (`transpose(...)` in the name). Beside the table
it measures, in the same process, the matmul peak and the elementwise bandwidth of a
cache-sized and of a memory-sized array: the two roofs a group runs under.

Prints a markdown table (group, forward / backward / total ms per step, share of the
op time, ops per step, the bytes its ops read and write if nothing stayed in cache and
the rate that makes) and, with --top K, the K slowest single ops. A group whose rate
is near the memory figure is bound by memory traffic, not arithmetic.
The ops of one step run mostly one at a time (each uses both cores: a oneDNN call
through OpenMP, an XLA fusion split in two), so their sum is close to the step's time;
both are printed. XLA may start two kernel calls at once on its two threads; they
share one lock, so the second waits, and that wait is not counted as its time (the
printed line says how much was taken out).
"""
from __future__ import annotations

import collections
import functools
import glob
import gzip
import json
import os
import re
import tempfile
import time

from benchmarks import common
from benchmarks import train_step

import jax

from vdmrep import backends, config_lib

_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLEE = re.compile(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
# Ops that only run other ops (their events span their body's events): not counted.
_CONTROL = {"while", "call", "conditional"}


_DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "c64": 8, "f32": 4, "s32": 4, "u32": 4,
                "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def _array_bytes(shape: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES[dtype]
  return total


def _balanced(text: str, start: int) -> int:
  """Index just past the parenthesis group opening at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  return len(text)


@functools.lru_cache(maxsize=2)  # op_names and op_bytes read the same module
def _parse(hlo_text: str) -> dict[str, dict]:
  """Instruction name -> computation, own op_name (or None), output bytes, operand
  names and called computations, for every instruction of a compiled module's text."""
  out, current = {}, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(1)
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    rest = line[m.end():]
    end = _balanced(rest, 0) if rest.startswith("(") else rest.find(" ")
    args_at = rest.find("(", end)
    args = rest[args_at:_balanced(rest, args_at)] if args_at >= 0 else ""
    callees = _CALLEE.findall(line)
    for b in _BRANCHES.findall(line):
      callees += [c.strip().lstrip("%") for c in b.split(",")]
    o = _OP_NAME.search(line)
    out[m.group(1)] = dict(computation=current, op_name=o.group(1) if o else None,
                           bytes=_array_bytes(rest[:end]),
                           operands=re.findall(r"%([\w.\-]+)", args), callees=callees)
  return out


def op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name -> the op_name metadata it came from, for every instruction of a
  compiled HLO module's text. One without its own takes its calling instruction's
  (inside a fusion or a loop body), recursively; failing that, its first named
  operand's (ops XLA's passes create, e.g. a convolution's filter gradient rewritten
  after layout assignment), through unnamed operands too; "" if nothing leads anywhere."""
  inst = _parse(hlo_text)
  caller = {}
  for name, i in inst.items():
    for c in i["callees"]:
      caller.setdefault(c, name)

  def from_callers(name):
    for _ in range(64):  # nesting depth bound: fusion in loop body in loop body ...
      if name not in inst:
        return None
      if inst[name]["op_name"] is not None:
        return inst[name]["op_name"]
      name = caller.get(inst[name]["computation"])
    return None

  @functools.cache
  def resolve(name, depth=0):
    found = from_callers(name)
    if found is None and depth < 16 and name in inst:
      for operand in inst[name]["operands"]:
        found = resolve(operand, depth + 1)
        if found is not None:
          break
    return found

  return {name: resolve(name) or "" for name in inst}


def op_bytes(hlo_text: str) -> dict[str, int]:
  """Instruction name -> bytes of its operands plus its outputs (compiled HLO text):
  what one execution reads and writes if nothing stays in cache, the traffic a
  memory-bound op cannot run faster than. Bitcasts and tuples move nothing but are
  counted as written; only executed ops (trace events) are used, which excludes them."""
  inst = _parse(hlo_text)
  return {name: i["bytes"] + sum(inst[o]["bytes"] for o in i["operands"] if o in inst)
          for name, i in inst.items()}


def _is_kernel_call(instruction: str) -> bool:
  """Whether an HLO instruction is one of vdmrep's CPU kernel calls (an FFI custom call)."""
  return instruction.startswith(("ffi_call", "custom-call", "custom_call"))


def op_times(trace_file: str, instructions, lock_waits: bool = False):
  """(total seconds, number of events) per HLO instruction name, from a perfetto trace
  (`jax.profiler.trace(..., create_perfetto_trace=True)`): complete events whose name
  is one of `instructions`, control-flow ops excluded.

  vdmrep's kernel calls hold one lock (vdmrep/backends/cpu/csrc/onednn_conv.cc): when XLA starts
  two at once on its two threads, the second's event includes its wait for the first.
  Unless `lock_waits`, that wait is taken out: a kernel call counts from the later of
  its start and the end of the kernel call running before it. The third value returned
  is the seconds so taken out."""
  with gzip.open(trace_file) as fh:
    events = json.load(fh)["traceEvents"]
  seconds, count = collections.Counter(), collections.Counter()
  kernels, waited = [], 0.0
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X" or name not in instructions:
      continue
    if re.sub(r"\.\d+$", "", name) in _CONTROL:
      continue
    if _is_kernel_call(name) and not lock_waits:
      kernels.append((e["ts"], e["ts"] + e["dur"], name))
      continue
    seconds[name] += e["dur"] * 1e-6
    count[name] += 1
  free_at = float("-inf")  # when the lock was last released
  for start, end, name in sorted(kernels):
    run = end - max(start, min(free_at, end))
    waited += (end - start - run) * 1e-6
    free_at = max(free_at, end)
    seconds[name] += run * 1e-6
    count[name] += 1
  return seconds, count, waited


def group_of(op_name: str) -> str:
  """The part of the model an op belongs to, from its op_name (flax module path).

  A convolution is XLA's op (whatever thunk runs it: `convolution`, an XNNPACK/YNN
  fusion, a layout copy feeding it) or the oneDNN custom call inside a conv module.
  """
  if re.search(r"(^|/)\w*attn", op_name):
    return "attention blocks (norm, q/k/v/out, softmax core)"
  if re.search(r"(conv_general_dilated|/conv\w*/ffi_call)$", op_name):
    return "3x3 convolutions"
  if re.search(r"/norm\w*/", op_name):
    return "GroupNorm + swish"
  if re.search(r"/(concatenate|split)", op_name):
    return "U-Net skip concatenate / split"
  if "nin_shortcut" in op_name:
    return "1x1 shortcuts (nin_shortcut)"
  if re.search(r"(ScoreNet|Encoder)", op_name):
    if re.search(r"/(add|add_any)$", op_name):
      return "residual, bias and conditioning adds"
    return "rest of the networks"
  return "loss terms, optimiser, rest"


def breakdown(names, seconds, count, steps, nbytes=None):
  """Rows (group, fwd s, bwd s, total s, ops, bytes moved) per step, slowest group
  first; bytes from `nbytes` (op_bytes) times each op's executions, 0 without it."""
  groups = collections.defaultdict(lambda: [0.0, 0.0, 0, 0])
  for inst, sec in seconds.items():
    op = names.get(inst, "")
    g = groups[group_of(op)]
    g[1 if "transpose(" in op else 0] += sec / steps
    g[2] += count[inst]
    g[3] += (nbytes or {}).get(inst, 0) * count[inst]
  rows = [(k, f, b, f + b, n / steps, m / steps) for k, (f, b, n, m) in groups.items()]
  return sorted(rows, key=lambda r: -r[3])


def trace(compiled, state, x, key, steps, logdir):
  """Runs one untraced step, then `steps` traced ones; returns (wall seconds per traced
  step, the perfetto trace file)."""
  state, metrics = compiled(state, x, key)
  jax.block_until_ready(metrics)
  walls = []
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, x, key)
      jax.block_until_ready(metrics)
      walls.append(time.perf_counter() - t0)
  files = glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not files:
    raise RuntimeError(f"jax.profiler wrote no perfetto_trace.json.gz under {logdir}")
  return walls, max(files, key=os.path.getmtime)


def main():
  p = common.step_parser(__doc__)
  p.add_argument("--backend", default="auto", choices=config_lib.BACKENDS)
  p.add_argument("--steps", type=int, default=3, help="traced steps (after one untraced)")
  p.add_argument("--top", type=int, default=0, help="also list the K slowest single ops")
  p.add_argument("--logdir", default=None, help="keep the trace here (default: temporary)")
  args = p.parse_args()
  if args.steps < 1:
    p.error(f"--steps must be >= 1, got {args.steps}")
  if jax.default_backend() != "cpu":
    p.error("trace_step.py reads XLA:CPU's per-op trace events; this backend is "
            f"{jax.default_backend()} (use the vendor's profiler there)")

  print(f"hardware: {common.hardware()}; {common.load_note()}")
  peak = common.matmul_peak()
  cache_bw, memory_bw = common.stream_bandwidth(12), common.stream_bandwidth(512)
  print(f"measured float32 matmul peak {peak / 1e9:.1f} GFLOP/s; elementwise y = 1.5x + 0.5 "
        f"(bytes read + written): {cache_bw / 1e9:.1f} GB/s over 12 MiB (fits the cache), "
        f"{memory_bw / 1e9:.1f} GB/s over 512 MiB (memory)")
  model, compiled, state, x, key = train_step.build(
      args.vdm, args.encoder, args.batch, args.image, backend=args.backend)
  text = compiled.as_text()
  names, nbytes = op_names(text), op_bytes(text)
  with tempfile.TemporaryDirectory() as tmp:
    walls, trace_file = trace(compiled, state, x, key, args.steps, args.logdir or tmp)
    seconds, count, waited = op_times(trace_file, names)
  rows = breakdown(names, seconds, count, args.steps, nbytes)
  total = sum(r[3] for r in rows)
  med, lo, hi = common.summary(walls)
  print(f"\n{args.vdm} + {args.encoder}, batch {args.batch}, {args.image}x{args.image}, "
        f"backend {backends.name(model)}: step {med:.3f} s ({lo:.3f}..{hi:.3f}) "
        f"over {args.steps} traced steps; ops sum to {total:.3f} s per step, after "
        f"taking out {1e3 * waited / args.steps:.1f} ms of kernel calls waiting for the "
        f"kernels' lock\n")
  print("| group | forward ms | backward ms | total ms | share | ops per step | "
        "GB read + written | GB/s |")
  print("|---|---|---|---|---|---|---|---|")
  for g, f, b, t, n, m in rows:
    print(f"| {g} | {1e3 * f:.1f} | {1e3 * b:.1f} | {1e3 * t:.1f} | {100 * t / total:.0f}% | "
          f"{n:.0f} | {m / 1e9:.2f} | {m / t / 1e9:.1f} |")
  if args.top:
    print("\n| op | ms per step | calls per step | op_name |\n|---|---|---|---|")
    for inst, sec in seconds.most_common(args.top):
      print(f"| {inst} | {1e3 * sec / args.steps:.2f} | {count[inst] / args.steps:.0f} | "
            f"{names.get(inst, '')} |")
  print(f"\nafter: {common.load_note()}")


if __name__ == "__main__":
  main()
