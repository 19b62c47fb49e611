"""benchmarks/trace_step.py names every op of a traced train step by the model code it
came from: the per-group table the performance notes rest on."""
import os
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import trace_step, train_step


def test_ops_inside_a_loop_body_inherit_the_loops_name():
  def f(x):
    with jax.named_scope("outer_scope"):
      return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ h), x)
  compiled = jax.jit(f).lower(jnp.ones((8, 8))).compile()
  names = trace_step.op_names(compiled.as_text())
  dots = [n for n in names if n.startswith("dot")]
  assert dots, "the compiled loop has no dot instruction"
  # The dot sits in the while body; whether or not XLA put metadata on it, its name
  # must lead back to the code that wrote it.
  assert all("outer_scope" in names[d] for d in dots), {d: names[d] for d in dots}


def test_op_names_follow_callers_and_operands():
  hlo = """HloModule m

%fused (q: f32[2]) -> f32[2] {
  %q = f32[2]{0} parameter(0)
  ROOT %e = f32[2]{0} exponential(%q)
}

%body (p: f32[2]) -> f32[2] {
  %p = f32[2]{0} parameter(0)
  ROOT %ynn_fusion.1 = f32[2]{0} fusion(%p), kind=kCustom, calls=%fused
}

ENTRY %main (a: f32[2]) -> f32[2] {
  %a = f32[2]{0} parameter(0)
  %while.1 = f32[2]{0} while(%a), condition=%cond, body=%body, metadata={op_name="jit(f)/mid_attn/while"}
  %add.2 = f32[2]{0} add(%while.1, %a), metadata={op_name="jit(f)/add"}
  ROOT %convolution.9 = f32[2]{0} convolution(%a, %add.2), window={size=1}
}
"""
  names = trace_step.op_names(hlo)
  assert names["ynn_fusion.1"] == names["e"] == "jit(f)/mid_attn/while"
  assert names["add.2"] == "jit(f)/add"
  assert names["a"] == ""  # the entry's parameter: nothing calls it
  # No metadata and no caller (an op a compiler pass made): its first named operand's.
  assert names["convolution.9"] == "jit(f)/add"
  nbytes = trace_step.op_bytes(hlo)  # operands + outputs, 4 bytes per f32
  assert nbytes["ynn_fusion.1"] == 16 and nbytes["add.2"] == 24 and nbytes["e"] == 16


def test_kernel_calls_lose_their_wait_for_the_lock(tmp_path):
  """Two kernel calls started together on XLA's two threads: the second ran only after
  the first released the kernels' lock, so it counts from then; an XLA op beside them
  keeps its whole time."""
  import gzip
  import json
  events = [
      {"ph": "X", "name": "ffi_call.1", "ts": 0.0, "dur": 100.0, "tid": 1},
      {"ph": "X", "name": "ffi_call.2", "ts": 10.0, "dur": 150.0, "tid": 2},  # waits 90
      {"ph": "X", "name": "add.3", "ts": 20.0, "dur": 30.0, "tid": 3},
      {"ph": "X", "name": "ffi_call.4", "ts": 300.0, "dur": 50.0, "tid": 1},  # no wait
  ]
  path = tmp_path / "t.json.gz"
  with gzip.open(path, "wt") as fh:
    json.dump({"traceEvents": events}, fh)
  names = {"ffi_call.1": "", "ffi_call.2": "", "add.3": "", "ffi_call.4": ""}
  seconds, count, waited = trace_step.op_times(str(path), names)
  ms = {k: round(v * 1e6) / 1e3 for k, v in seconds.items()}
  assert ms == {"ffi_call.1": 0.1, "ffi_call.2": 0.06, "add.3": 0.03, "ffi_call.4": 0.05}
  assert abs(waited - 90e-6) < 1e-12 and count["ffi_call.2"] == 1


@pytest.mark.parametrize("op_name,group", [
    ("jit(train_step)/jvp(ScoreNet)/up_3/conv1/ffi_call", "3x3 convolutions"),
    ("jit(train_step)/transpose(jvp(ScoreNet))/down_0/conv2/conv_general_dilated", "3x3 convolutions"),
    ("jit(train_step)/jvp(ScoreNet)/up_3/conv1/add", "residual, bias and conditioning adds"),
    ("jit(train_step)/jvp(ScoreNet)/up_3/norm1/jit(silu)/div", "GroupNorm + swish"),
    ("jit(train_step)/transpose(jvp(Encoder))/mid_attn/while/body/closed_call/exp",
     "attention blocks (norm, q/k/v/out, softmax core)"),
    ("jit(train_step)/jvp(ScoreNet)/concatenate", "U-Net skip concatenate / split"),
    ("jit(train_step)/jvp(ScoreNet)/up_0/nin_shortcut/dot_general",
     "1x1 shortcuts (nin_shortcut)"),
    ("jit(train_step)/clip_by_global_norm/mul", "loss terms, optimiser, rest"),
])
def test_group_of(op_name, group):
  assert trace_step.group_of(op_name) == group


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "xla"])
def test_traced_step_is_named_and_sums_to_the_step(tmp_path, backend):
  """Both convolution paths: oneDNN custom calls, and XLA's op (which its runtime may
  run as a `convolution` thunk or an XNNPACK/YNN fusion)."""
  model, compiled, state, x, key = train_step.build("mvdm", "te", 2, 8, backend=backend)
  names = trace_step.op_names(compiled.as_text())
  walls, trace_file = trace_step.trace(compiled, state, x, key, 2, str(tmp_path))
  seconds, count, waited = trace_step.op_times(trace_file, names)
  with_waits, count_w, none = trace_step.op_times(trace_file, names, lock_waits=True)
  total = sum(seconds.values())
  assert none == 0.0 and count_w == count and waited >= 0.0
  assert abs(sum(with_waits.values()) - total - waited) < 1e-6
  assert total > 0 and len(seconds) > 50
  unnamed = sum(s for inst, s in seconds.items() if not names[inst])
  assert unnamed < 0.05 * total, sorted(
      ((s, i) for i, s in seconds.items() if not names[i]), reverse=True)[:5]
  nbytes = trace_step.op_bytes(compiled.as_text())
  rows = {r[0]: r for r in trace_step.breakdown(names, seconds, count, 2, nbytes)}
  for group in ("3x3 convolutions", "GroupNorm + swish",
                "attention blocks (norm, q/k/v/out, softmax core)"):
    assert rows[group][1] > 0 and rows[group][2] > 0, (group, rows[group])  # fwd and bwd
  assert abs(sum(r[3] for r in rows.values()) - total / 2) < 1e-9
  # A 3x3 convolution reads at least its input and writes its output: batch 2, 8x8.
  conv = rows["3x3 convolutions"]
  assert conv[5] > conv[4] * 2 * 8 * 8 * 4 * 2
  # The ops run one after another on this step, each over the whole machine: their sum
  # is of the order of the step's wall time, not several times it.
  assert 0.2 * sum(walls) < total < 1.5 * sum(walls) * os.cpu_count()
