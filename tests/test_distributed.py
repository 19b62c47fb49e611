"""Multi-process training (jax.distributed over loopback, CPU devices, gloo collectives).

The end-to-end test launches the CLI twice over: 2 processes x 1 CPU device, and
1 process x 2 CPU devices, with the same global batch. The jitted step is the same
SPMD program on 2 devices in both runs; only the gradient all-reduce crosses a
process boundary (gloo over TCP) in the first. The unit tests check the launch
arguments, the validation messages and the batch split without starting JAX's runtime.
"""
import json
import os
import re
import socket
import subprocess
import sys
import types

import numpy as np
import pytest

from conftest import TINY_PROBE_FLAGS
from vdmrep import config_lib, parallel
from vdmrep import data as data_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600  # a loaded 2-core CI box compiles slowly; a healthy run needs far less
TINY = ["--config", "configs/digits.py", "--config.model.n_blocks=1",
        "--config.model.channels=8", "--config.training.num_steps=5",
        "--config.training.log_every=1", "--config.training.batch_size=8",
        "--config.optim.warmup_steps=1", "--config.eval.batch_size=16",
        "--config.eval.max_examples=32", "--config.eval.num_time_samples=1",
        "--config.eval.sample_quality=False", *TINY_PROBE_FLAGS]


def _dist(**kw):
  d = config_lib.base_config().distributed
  d.update(kw)
  return d


# ---------------------------------------------------------------- launch arguments

def test_initialize_kwargs_config_wins_over_env_and_env_fills_the_rest():
  env = {parallel.ENV_NUM_PROCESSES: "4", parallel.ENV_PROCESS_ID: "3"}
  kw = parallel.initialize_kwargs(_dist(initialize=True, process_id=1), env)
  assert kw["process_id"] == 1 and kw["num_processes"] == 4
  assert "coordinator_address" not in kw  # left to JAX (JAX_COORDINATOR_ADDRESS / detection)
  kw = parallel.initialize_kwargs(_dist(initialize=True), {})
  assert "num_processes" not in kw and "process_id" not in kw  # JAX auto-detects


@pytest.mark.parametrize("env,cfg,needle", [
    ({parallel.ENV_PROCESS_ID: "one"}, {}, "JAX_PROCESS_ID='one'"),
    ({parallel.ENV_PROCESS_ID: "2"}, {"num_processes": 2}, "process id 2 is not in [0, 2)"),
])
def test_initialize_kwargs_rejects_bad_environment(env, cfg, needle):
  with pytest.raises(config_lib.ConfigError) as err:
    parallel.initialize_kwargs(_dist(initialize=True, **cfg), env)
  assert needle in str(err.value)


@pytest.mark.parametrize("kw,key", [
    ({"initialize": True, "coordinator_address": "10.0.0.1"}, "coordinator_address"),
    ({"initialize": True, "num_processes": 2, "process_id": 2}, "process_id"),
    ({"initialize": True, "process_id": -2}, "process_id"),
    ({"num_processes": 2}, "num_processes"),  # set without initialize=True
    ({"initialize": True, "cluster_detection_method": "pbs"}, "cluster_detection_method"),
    ({"initialize": True, "initialization_timeout": 0}, "initialization_timeout"),
])
def test_validate_names_the_distributed_key(kw, key):
  config = config_lib.base_config()
  config.distributed.update(kw)
  with pytest.raises(config_lib.ConfigError, match=rf"config\.distributed\.{key}="):
    config_lib.validate(config)


def test_batch_must_split_over_devices_and_processes():
  config = config_lib.base_config()
  config.training.batch_size = 18
  config.eval.batch_size = 36
  with pytest.raises(config_lib.ConfigError, match=r"config\.training\.batch_size=18 .* 4 dev"):
    config_lib.validate(config, num_devices=4)
  with pytest.raises(config_lib.ConfigError, match=r"config\.training\.batch_size=18 .* 4 proc"):
    config_lib.validate(config, num_devices=6, num_processes=4)


# ---------------------------------------------------------------- batch split

def test_process_slices_tile_the_global_batch_on_a_process_major_mesh():
  # 3 processes x 2 devices, listed in an interleaved order as a TPU runtime may do.
  devs = [types.SimpleNamespace(process_index=p, id=10 * p + i) for i in (1, 0) for p in (2, 0, 1)]
  order = parallel.process_major(devs)
  assert [d.process_index for d in order] == [0, 0, 1, 1, 2, 2]
  # Global row r lives on mesh position r // (B / num_devices); the process owning it
  # must be the one whose train_batch slice holds row r.
  ds = data_lib.Dataset("toy", np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1),
                        np.zeros((1, 1, 1, 1), np.uint8))
  batch, step, seed = 12, 7, 3
  full = ds.train_images[data_lib.batch_indices(50, batch, step, seed)]
  per_dev = batch // len(order)
  for p in range(3):
    local = data_lib.train_batch(ds, step, batch, seed, p, 3)
    rows = [r for r in range(batch) if order[r // per_dev].process_index == p]
    np.testing.assert_array_equal(local, full[rows])


def test_uneven_devices_per_process_are_rejected():
  devs = [types.SimpleNamespace(process_index=p, id=i) for i, p in enumerate((0, 0, 1))]
  with pytest.raises(config_lib.ConfigError, match=r"\{0: 2, 1: 1\}"):
    parallel.check_process_layout(devs)
  parallel.check_process_layout(devs[:2])  # one process: fine


# ---------------------------------------------------------------- end to end

def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(num_cpu_devices, extra=None):
  env = {k: v for k, v in os.environ.items()  # no cluster auto-detection from a CI runner
         if not k.startswith(("SLURM_", "OMPI_", "PMI_", "JAX_", "TPU_"))}
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(num_cpu_devices),
             # gloo is already the default in jax 0.10.2; explicit so the test says what it uses
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONPATH=REPO)
  env.update(extra or {})
  return env


def _launch(name, args, env, tmp_path):
  out = open(tmp_path / f"{name}.out", "w")
  err = open(tmp_path / f"{name}.err", "w")
  # --verbose: the scalars are read back from clu's logging lines (absl INFO, off by default)
  proc = subprocess.Popen([sys.executable, "-m", "vdmrep.main", "--verbose", *TINY, *args],
                          cwd=REPO,
                          env=env, stdout=out, stderr=err)
  return name, proc, (out, err)


def _wait_all(procs, tmp_path):
  """Waits for every process; on a timeout or failure kills the rest and fails with logs."""
  failed = None
  for name, proc, files in procs:
    try:
      proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      failed = failed or f"{name} did not finish within {TIMEOUT_S} s"
    if proc.returncode not in (0, None):
      failed = failed or f"{name} exited with status {proc.returncode}"
    if failed:
      break
  for name, proc, files in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    for f in files:
      f.close()
  if failed:
    tails = "\n".join(f"--- {name}.err (last 15 lines):\n" + "".join(
        (tmp_path / f"{name}.err").read_text().splitlines(True)[-15:]) for name, _, _ in procs)
    pytest.fail(f"{failed}\n{tails}", pytrace=False)


def _logged_scalars(text):
  """{(step, name): value} from clu's LoggingWriter lines ('[5] train/bpd=13.18, ...')."""
  out = {}
  for step, body in re.findall(r"\] \[(\d+)\] ((?:train|eval)/.*)$", text, re.M):
    for item in body.split(", "):
      key, val = item.split("=")
      out[(int(step), key)] = float(val)
  return out


def _restore_state(workdir, step):
  """Every array of the checkpointed train state, as host numpy (no sharding needed)."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return jax.tree.leaves(ckptr.restore(path, restore_args=args))


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
  addr = f"127.0.0.1:{_free_port()}"
  two, one = tmp_path / "two", tmp_path / "one"
  # Process 0 gets its coordinates from config flags, process 1 from the environment:
  # both launch routes of vdmrep.parallel are exercised. Cluster detection is off so a
  # CI runner that happens to be a SLURM job is not mistaken for the cluster.
  common = [f"--workdir={two}", "--config.distributed.initialize=True",
            "--config.distributed.cluster_detection_method=deactivate",
            "--config.distributed.initialization_timeout=120"]
  procs = [
      _launch("p0", common + [f"--config.distributed.coordinator_address={addr}",
                              "--config.distributed.num_processes=2",
                              "--config.distributed.process_id=0"], _env(1), tmp_path),
      _launch("p1", common, _env(1, {"JAX_COORDINATOR_ADDRESS": addr,
                                     parallel.ENV_NUM_PROCESSES: "2",
                                     parallel.ENV_PROCESS_ID: "1"}), tmp_path),
      _launch("ref", [f"--workdir={one}"], _env(2), tmp_path),
  ]
  _wait_all(procs, tmp_path)
  read = lambda name, ext: (tmp_path / f"{name}.{ext}").read_text()

  # Losses: clu logs 6 significant digits, so rtol 1e-5 is the resolution of the log.
  ref = _logged_scalars(read("ref", "err"))
  assert {k for k in ref if k[1] == "train/loss_bpd"} == {(s, "train/loss_bpd")
                                                          for s in range(1, 6)}
  assert (5, "eval/bpd") in ref
  for name in ("p0", "p1"):  # both processes see the same replicated metrics
    got = _logged_scalars(read(name, "err"))
    assert got.keys() == ref.keys(), name
    for k, v in ref.items():
      assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (name, k)

  # Parameters, EMA and Adam moments after 5 steps. The per-device programs are the
  # same and a 2-way sum is commutative, so equality is expected to the bit; atol 1e-6
  # (1e-3 of one Adam step at lr 1e-3) would still allow a reordered all-reduce over
  # more devices, while a wrong data slice or noise draw moves parameters by ~lr.
  got, want = _restore_state(str(two), 5), _restore_state(str(one), 5)
  assert len(got) == len(want) > 100
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)

  # Writes and prints happen once: one event file, meta written, one console report.
  assert len([f for f in os.listdir(two) if ".tfevents." in f]) == 1
  meta = json.loads((two / "checkpoints" / "5" / "meta" / "metadata").read_text())
  assert meta["step"] == 5
  for line in ("parameters: encoder=", "eval step 5: bpd"):
    assert line in read("p0", "out") and line not in read("p1", "out")
