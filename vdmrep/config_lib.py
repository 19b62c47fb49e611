"""The base experiment config and its validation (run before anything compiles).

`configs/*.py` start from `base_config()` and override a few fields, so each file
reads like one row of an experiment table. `validate` names the offending key; it calls
the modules' own checks (collapse, evaluators, reliability, sampling, parallel,
preflight), imported inside it so that loading a config imports no jax. Those modules
raise `errors.ConfigError` and never import this one (tests/test_imports.py).
"""
from __future__ import annotations

import ml_collections

from vdmrep.errors import ConfigError  # noqa: F401  (raised here, and by the modules' checks)

DATA_SOURCES = ("digits", "fashion_mnist", "tfds:", "idx:", "npz:")
BACKENDS = ("auto", "xla", "cpu")  # config.model.backend (vdmrep/backends)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = "digits"          # digits | fashion_mnist[:<dir>] | tfds:<name> | idx:<dir>
                                    # | npz:<file>
  c.data.eval_fraction = 0.15       # held out when a source has no test split
  c.data.split_seed = 0             # fixed train/eval split of such sources
  c.data.tfds_data_dir = ""         # "" = tfds default
  c.data.max_train_examples = 0     # 0 = all; > 0 keeps the first N (small studies)
  c.data.npz_max_expansion = 100.0  # refuse an npz whose arrays exceed N x its size; 0 = no cap

  c.model = ml_collections.ConfigDict()
  c.model.decoder = "vdm"           # vdm (diffusion decoder sized by model.vdm) | conv_vae
                                    # (the classic VAE: a conv decoder, models/conv_vae.py)
  c.model.vdm = "tvdm"              # original | svdm | tvdm | mvdm (full resolution) |
                                    # unet | unet_s (multi-resolution U-Net, models/unet.py)
  c.model.encoder = "te"            # oepp | oe | se | te | ue (no KL) | none (unconditional)
  c.model.conditioning = "additive"  # additive | film
  c.model.gamma_type = "fixed"      # fixed | learned_linear | learned_nnet | per_pixel |
                                    # per_pixel_learned_endpoints (gamma(t, w), MuLAN-style)
  c.model.gamma_min = -13.3
  c.model.gamma_max = 5.0
  c.model.fourier_features = True
  c.model.dropout = 0.0
  c.model.n_blocks = 0              # 0 = the size's default
  c.model.channels = 0              # 0 = the size's default
  c.model.channel_mult = ()         # U-Net width per resolution; () = the size's default
  c.model.antithetic_time_sampling = True
  c.model.vocab_size = 256
  # The latent w and its prior p(w) (vdmrep/models/priors.py); defaults: today's N(0, I).
  c.model.latent = "gaussian"       # gaussian | categorical (M groups of K categories)
  c.model.latent_dim = 0            # gaussian: D (0 = the encoder size's); categorical: M
  c.model.latent_categories = 0     # categorical: K categories per group
  c.model.prior = "standard"        # gaussian: standard | mixture | vamp | flow | diffusion;
                                    # categorical: standard (uniform) | learned
  c.model.prior_components = 16     # mixture, vamp: number of components
  c.model.prior_flow_layers = 4     # flow: affine coupling layers
  c.model.prior_hidden = 128        # flow, diffusion: MLP width
  c.model.posterior_std_max = 0.0   # in (0, 1): delta-VAE cap on q's std (committed rate)
  c.model.relaxation_temperature = 1.0  # categorical: Gumbel-softmax temperature (gradient)
  c.model.compute_dtype = "float32"  # float32 | bfloat16 (params and loss stay f32)
  c.model.remat = False             # recompute score-net block activations (less memory)
  c.model.backend = "auto"          # auto | xla | cpu: who computes the blocks (same
                                    # parameters; vdmrep/backends)
  c.model.num_classes = 0           # > 0: class-conditional p(x | w, y) on the data's labels
  c.model.label_dropout = 0.1       # P(label -> "no label") in training (classifier-free)
  c.model.label_encoder = False     # the encoder sees the label too: q(w | x, y)

  # Posterior-collapse remedies; formulas and sources in vdmrep/collapse.py. The defaults
  # are the ELBO; each remedy is switched on by its own key and they combine.
  c.collapse = ml_collections.ConfigDict()
  c.collapse.schedule = "constant"  # KL weight beta(step): constant | linear | cyclical
  c.collapse.beta = 1.0             # constant beta, or the value the schedules rise to
  c.collapse.warmup_start = 0.0     # linear: beta at step 0
  c.collapse.warmup_steps = 10000   # linear: steps to reach beta
  c.collapse.cycles = 4             # cyclical: M cycles over training.num_steps
  c.collapse.cycle_ratio = 0.5      # cyclical: R, the rising proportion of each cycle
  c.collapse.free_bits = 0.0        # lambda, nats per latent dimension (0 = off)
  c.collapse.free_bits_mode = "batch"  # batch (floor the batch-mean KL) | example
  c.collapse.capacity_gamma = 0.0   # > 0: gamma |KL - C(step)| replaces the KL
  c.collapse.capacity_max = 25.0    # C_max, nats per image
  c.collapse.capacity_steps = 10000  # steps over which C ramps from 0 to C_max
  c.collapse.mmd_alpha = 0.0        # InfoVAE alpha: KL weight (1 - alpha)
  c.collapse.mmd_lambda = 1.0       # InfoVAE lambda: MMD weight (alpha + lambda - 1)
  c.collapse.mmd_kernel = "rbf"     # rbf: exp(-|d|^2/(2 D s^2)) | infovae: InfoVAE's
                                    # exp(-|d|^2/(D^2 s^2)) | imq (vdmrep/losses.py)
  c.collapse.mmd_bandwidth = 1.0    # s
  c.collapse.mmd_estimator = "unbiased"  # unbiased (U-statistic) | biased (InfoVAE's code)
  c.collapse.deterministic_encoder = False  # w = encoder mean (InfoDiffusion; mmd_alpha = 1)
  c.collapse.diffusion_weighting = "elbo"  # elbo | sigmoid (the diffusion term only) |
                                    # sigmoid_consistent (every term, vdmrep/collapse.py)
  c.collapse.diffusion_weight_bias = 0.0   # sigmoid: w = sigmoid(gamma_t + bias)
  c.collapse.kl_balance = -1.0      # alpha in [0, 1]: DreamerV2 KL balancing (same value,
                                    # split gradient); -1 = off
  c.collapse.stage_surrogate_steps = 0  # staged training: steps without the KL term, then
  c.collapse.stage_frozen_steps = 0     # steps with the encoder frozen, then joint
  c.collapse.aggressive_inner_steps = 0  # > 0: aggressive inference (He et al. 2019): this
                                    # many encoder-only steps per step until I_q(x; w) stalls

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 100
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.9999
  c.optim.ema_schedule = "warmup"   # warmup: min(ema_decay, (1+s)/(10+s)) | constant
                                    # (ema_decay from step 0, as the official VDM code)

  c.training = ml_collections.ConfigDict()
  c.training.batch_size = 64        # global, over all devices and hosts
  c.training.num_steps = 1000
  c.training.log_every = 50
  c.training.checkpoint_every = 500
  c.training.keep_checkpoints = 3
  c.training.eval_every = 0         # 0 = only at the end
  c.training.nan_policy = "stop"    # stop | skip: what a non-finite loss/gradient does
  c.training.max_consecutive_skips = 10  # 'skip' halts after more bad steps in a row
  c.training.allow_config_change = False  # resume although seed/batch/optim/data changed
  c.training.memory_check = True    # refuse when the estimated step memory exceeds the machine

  c.eval = ml_collections.ConfigDict()
  # Evaluators (vdmrep/evaluators/) a full / periodic evaluation runs, in order.
  c.eval.evaluators = "elbo,baselines,latents,probes,ood,samples,pictures"
  c.eval.periodic_evaluators = "elbo,baselines,latents"
  c.eval.seed = -1                  # seed of every eval draw; -1 = config.seed
  c.eval.batch_size = 256
  c.eval.num_time_samples = 4       # K Monte Carlo draws of (t, eps, w) per image
  c.eval.max_examples = 0           # 0 = the whole eval split
  c.eval.histogram_k = 0.5          # add-k smoothing of the per-pixel histogram baseline
  # deterministic encoders: q(w|x) = N(mean, s^2 I) with s fitted after training (a bound)
  c.eval.posterior_std_grid = "0.01,0.03,0.1,0.3,1.0"  # candidates for s; "" = no bound
  c.eval.posterior_fit_examples = 256  # first N train images choose s; 0 = all
  # collapse diagnostics (vdmrep/diagnostics.py)
  c.eval.active_threshold = 0.01    # active unit: Var_x E_q[w_d|x] above this
  c.eval.mi_samples = 1             # draws of w per image for the I_q(x; w) estimate
  c.eval.usefulness_num_t = 10      # t grid (bin midpoints) for the usefulness-of-w curve
  c.eval.usefulness_max_examples = 512  # 0 = all eval images
  # representation quality (vdmrep/probes.py)
  c.eval.probe_max_train = 10000    # first N train images fit the probes; 0 = all
  c.eval.probe_cs = "0.001,0.01,0.1,1,10,100"  # logistic probe's C candidates (CV on train)
  c.eval.probe_cv_folds = 3         # stratified folds of that cross-validation
  c.eval.probe_max_iter = 1000
  # feature sets probed: pixels | encoder (means of q(w|x)) | random_encoder (the same net at
  # init) | encoder_w (one draw w ~ q(w|x) per image: what the decoder sees)
  c.eval.probe_features = "pixels,encoder,random_encoder,encoder_w"
  c.eval.knn_k = 5
  c.eval.random_encoder_seed = 1    # init seed of the random-encoder baseline
  # pictures and OOD
  c.eval.pictures = True
  c.eval.tsne_max_points = 2000     # 0 = all
  c.eval.tsne_perplexity = 30.0
  c.eval.ood_source = ""            # a second data source scored as OOD ("" = none)
  c.eval.ood_holdout_class = -1     # >= 0: train without this class; its eval images are OOD
  c.eval.sample_quality = True      # full evals also sample (config.sample): FD, score, ...
  c.eval.periodic_full = False      # periodic evals also run probes, OOD and pictures

  c.sample = ml_collections.ConfigDict()  # --mode sample and the sample-quality section
  c.sample.num_steps = 1000         # ancestral steps from t = 1 to 0
  c.sample.num_samples = 10_000     # unconditional samples for the Frechet distance / score
  c.sample.batch_size = 256
  c.sample.decode = "sample"        # z_0 -> pixels: sample | argmax of p(x | z_0)
  c.sample.sampler = "ancestral"    # ancestral | ddim (deterministic), any num_steps
  c.sample.label = -1               # class-conditional model: >= 0 samples only this class;
                                    # -1 cycles through the classes
  c.sample.guidance = 0.0           # classifier-free guidance weight s (0 = none)
  c.sample.t_start = 0.8            # reconstruction: noise level the input is taken to
  c.sample.trajectory_frames = 8    # frames per reconstruction trajectory picture
  c.sample.num_trajectories = 8     # rows of that picture
  c.sample.grid_size = 64           # images per sample-grid picture
  c.sample.num_guided = 1000        # eval images for the guided class-match rate (capped)
  c.sample.num_interpolations = 4   # pairs of eval images
  c.sample.interpolation_steps = 8
  c.sample.interpolation = "slerp"  # slerp | linear, between encoder means
  c.sample.classifier_steps = 500   # the feature classifier (trained once per workdir)
  c.sample.classifier_batch_size = 128
  c.sample.classifier_lr = 1e-3
  c.sample.classifier_features = 64
  c.sample.inception_weights = ""   # Keras InceptionV3 weights (.h5) or a .keras model; "" = off

  c.distributed = ml_collections.ConfigDict()  # see docs/distributed.md
  c.distributed.initialize = False  # call jax.distributed.initialize() (multi-process runs)
  c.distributed.coordinator_address = ""  # host:port of process 0; "" = env / auto-detect
  c.distributed.num_processes = 0   # 0 = env JAX_NUM_PROCESSES / auto-detect
  c.distributed.process_id = -1     # -1 = env JAX_PROCESS_ID / auto-detect
  c.distributed.cluster_detection_method = ""  # "" = JAX tries SLURM, Open MPI, TPU, ...
  c.distributed.initialization_timeout = 300  # seconds to wait for all processes
  return c


def _choice(cfg, key, value, options):
  if value not in options:
    raise ConfigError(f"config.{key}={value!r} is not valid; choose one of {list(options)}")


def _positive(key, value, allow_zero=False):
  ok = value >= 0 if allow_zero else value > 0
  if not ok:
    raise ConfigError(f"config.{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def validate(config, num_devices: int = 1, num_processes: int = 1) -> None:
  """Raises ConfigError naming the first bad key; returns None if the config can run."""
  from vdmrep.models.conv_vae import VAE_DECODERS
  from vdmrep.models.encoder import ENCODER_SIZES
  from vdmrep.models.schedules import PER_PIXEL, SCHEDULES
  from vdmrep.models.score_net import CONDITIONINGS, VDM_SIZES
  from vdmrep.models.unet import UNET_SIZES
  m, t, o, e = config.model, config.training, config.optim, config.eval
  _choice(config, "model.decoder", m.get("decoder", "vdm"), ("vdm",) + VAE_DECODERS)
  if m.get("decoder", "vdm") != "vdm" and m.encoder == "none":
    raise ConfigError(f"config.model.decoder={m.decoder!r} is a VAE and needs an encoder; "
                      "config.model.encoder='none' has none")
  _choice(config, "model.vdm", m.vdm, tuple(VDM_SIZES) + tuple(UNET_SIZES))
  _choice(config, "model.encoder", m.encoder, tuple(ENCODER_SIZES) + ("none",))
  _choice(config, "model.conditioning", m.conditioning, CONDITIONINGS)
  _choice(config, "model.gamma_type", m.gamma_type, tuple(SCHEDULES) + PER_PIXEL)
  validate_latent(config)
  _choice(config, "model.compute_dtype", m.compute_dtype, ("float32", "bfloat16"))
  _choice(config, "model.backend", m.get("backend", "auto"), BACKENDS)
  if not m.gamma_min < m.gamma_max:
    raise ConfigError(f"config.model.gamma_min={m.gamma_min} must be < "
                      f"config.model.gamma_max={m.gamma_max}")
  if not 0.0 <= m.dropout < 1.0:
    raise ConfigError(f"config.model.dropout={m.dropout} must be in [0, 1)")
  _positive("model.n_blocks", m.n_blocks, allow_zero=True)
  _positive("model.channels", m.channels, allow_zero=True)
  if m.channels and m.channels % 4:
    raise ConfigError(f"config.model.channels={m.channels} must be a multiple of 4 (GroupNorm)")
  _positive("model.vocab_size", m.vocab_size)
  mult = m.get("channel_mult") or ()
  if mult and m.vdm not in UNET_SIZES:
    raise ConfigError(f"config.model.channel_mult={tuple(mult)} applies to a U-Net only "
                      f"(model.vdm in {list(UNET_SIZES)}), not model.vdm={m.vdm!r}")
  if not all(isinstance(k, int) and k > 0 for k in mult):
    raise ConfigError(f"config.model.channel_mult={tuple(mult)} must be positive integers")
  _positive("model.num_classes", m.num_classes, allow_zero=True)
  if not 0.0 <= m.label_dropout <= 1.0:
    raise ConfigError(f"config.model.label_dropout={m.label_dropout} must be in [0, 1]")
  if m.num_classes and m.get("decoder", "vdm") != "vdm":
    raise ConfigError(f"config.model.num_classes={m.num_classes}: class conditioning is for "
                      f"the VDM decoder, not model.decoder={m.decoder!r}")
  if m.label_encoder and not (m.num_classes and m.encoder != "none"):
    raise ConfigError("config.model.label_encoder=True needs config.model.num_classes > 0 "
                      "and an encoder")
  src = config.data.source
  if not (src in DATA_SOURCES[:2] or any(src.startswith(p) and len(src) > len(p)
                                         for p in ("fashion_mnist:",) + DATA_SOURCES[2:])):
    raise ConfigError(f"config.data.source={src!r} is not valid; use 'digits', "
                      "'fashion_mnist[:<dir>]', 'tfds:<name>', 'idx:<dir>' or 'npz:<file>'")
  if not 0.0 < config.data.eval_fraction < 1.0:
    raise ConfigError(f"config.data.eval_fraction={config.data.eval_fraction} must be in (0, 1)")
  for key in ("batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    _positive(f"training.{key}", t[key])
  _positive("training.eval_every", t.eval_every, allow_zero=True)
  if t.batch_size % num_devices:
    raise ConfigError(f"config.training.batch_size={t.batch_size} is not divisible by the "
                      f"{num_devices} devices it is sharded over")
  _positive("eval.batch_size", e.batch_size)
  if e.batch_size % num_devices:
    raise ConfigError(f"config.eval.batch_size={e.batch_size} is not divisible by the "
                      f"{num_devices} devices it is sharded over")
  for key, size in (("training.batch_size", t.batch_size), ("eval.batch_size", e.batch_size)):
    if size % num_processes:  # each process reads an equal slice of the global batch
      raise ConfigError(f"config.{key}={size} is not divisible by the {num_processes} "
                        "processes that each read an equal slice of it")
  _positive("eval.num_time_samples", e.num_time_samples)
  _positive("optim.lr", o.lr)
  _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
  _positive("optim.grad_clip", o.grad_clip)
  _choice(config, "optim.ema_schedule", o.ema_schedule, ("warmup", "constant"))
  if not 0.0 <= o.ema_decay < 1.0:
    raise ConfigError(f"config.optim.ema_decay={o.ema_decay} must be in [0, 1)")
  for key in ("b1", "b2"):
    if not 0.0 <= o[key] < 1.0:
      raise ConfigError(f"config.optim.{key}={o[key]} must be in [0, 1)")
  from vdmrep import collapse, evaluators, reliability, sampling
  collapse.validate(config)
  evaluators.validate(config)
  reliability.validate(config)
  sampling.validate(config, num_devices)
  from vdmrep import parallel
  parallel.validate(config)
  from vdmrep import preflight  # every number finite and in its domain
  problem = preflight.config_problem(config)
  if problem:
    raise ConfigError(problem)


def check_image_shape(config, image_shape) -> None:
  """Raises ConfigError if the model cannot take images of `image_shape` (H, W, C)."""
  from vdmrep.models.unet import UNET_SIZES
  m = config.model
  if m.get("decoder", "vdm") != "vdm" and (image_shape[0] % 4 or image_shape[1] % 4):
    raise ConfigError(f"config.model.decoder={m.decoder!r} needs image sides divisible by "
                      f"4; the data's images are {image_shape[0]}x{image_shape[1]}")
  if m.get("decoder", "vdm") == "vdm" and m.vdm in UNET_SIZES:
    levels = len(m.get("channel_mult") or UNET_SIZES[m.vdm].channel_mult)
    factor = 2 ** (levels - 1)
    if image_shape[0] % factor or image_shape[1] % factor:
      raise ConfigError(f"config.model.vdm={m.vdm!r} has {levels} resolutions and needs image "
                        f"sides divisible by {factor}; the data's images are "
                        f"{image_shape[0]}x{image_shape[1]}")


def validate_latent(config) -> None:
  """Checks the latent and prior keys of `config.model`; raises ConfigError naming one."""
  from vdmrep.models.priors import CATEGORICAL_PRIORS, PRIORS
  from vdmrep.models.schedules import PER_PIXEL
  m = config.model
  _choice(config, "model.latent", m.latent, ("gaussian", "categorical"))
  if m.latent == "categorical":
    _choice(config, "model.prior", m.prior, CATEGORICAL_PRIORS)
    if m.latent_dim < 1 or m.latent_categories < 2:
      raise ConfigError(f"config.model.latent_dim={m.latent_dim} (groups M) must be >= 1 and "
                        f"config.model.latent_categories={m.latent_categories} (K) >= 2 for "
                        "a categorical latent")
    if m.posterior_std_max:
      raise ConfigError("config.model.posterior_std_max applies to a gaussian latent only")
    if not m.relaxation_temperature > 0:
      raise ConfigError(f"config.model.relaxation_temperature={m.relaxation_temperature} "
                        "must be > 0")
  else:
    _choice(config, "model.prior", m.prior, PRIORS)
    if m.latent_categories:
      raise ConfigError("config.model.latent_categories is for model.latent='categorical'")
    if m.latent_dim and not 2 <= m.latent_dim <= 4096:
      raise ConfigError(f"config.model.latent_dim={m.latent_dim} must be 0 (the encoder "
                        "size's) or in 2..4096")
    if not 0.0 <= m.posterior_std_max < 1.0:
      raise ConfigError(f"config.model.posterior_std_max={m.posterior_std_max} must be in "
                        "[0, 1) (0 = off; a cap >= 1 commits no rate)")
    if m.posterior_std_max and m.prior != "standard":
      raise ConfigError("config.model.posterior_std_max: the committed rate holds for "
                        "model.prior='standard' only")
  for key in ("prior_components", "prior_flow_layers", "prior_hidden"):
    _positive(f"model.{key}", m[key])
  if m.encoder == "none" and (m.prior != "standard" or m.latent != "gaussian"
                              or m.latent_dim or m.gamma_type in PER_PIXEL):
    raise ConfigError(f"config.model.encoder='none' has no latent: model.prior, model.latent, "
                      "model.latent_dim and a per-pixel model.gamma_type need an encoder")
  if m.get("decoder", "vdm") != "vdm" and (
      m.prior != "standard" or m.latent != "gaussian" or m.gamma_type in PER_PIXEL
      or m.posterior_std_max):
    raise ConfigError(f"config.model.decoder={m.decoder!r} supports the gaussian latent with "
                      "model.prior='standard' only")
  c = config.collapse
  if not (c.kl_balance == -1.0 or 0.0 <= c.kl_balance <= 1.0):
    raise ConfigError(f"config.collapse.kl_balance={c.kl_balance} must be -1 (off) or in [0, 1]")
  factorised = m.latent == "categorical" or m.prior == "standard"
  if c.free_bits > 0 and not factorised:
    raise ConfigError(f"config.collapse.free_bits needs a KL that splits over dimensions: "
                      f"model.prior='standard' (not {m.prior!r}) or a categorical latent")
  if (c.mmd_alpha, c.mmd_lambda) != (0.0, 1.0) and not (m.latent == "gaussian"
                                                          and m.prior == "standard"):
    raise ConfigError("config.collapse.mmd_alpha/mmd_lambda: the MMD is to N(0, I); it needs "
                      "a gaussian latent with model.prior='standard'")
  if c.deterministic_encoder and (m.latent != "gaussian" or m.prior != "standard"):
    raise ConfigError("config.collapse.deterministic_encoder needs a gaussian latent with "
                      "model.prior='standard' (its fitted-std bound is closed form to N(0, I))")


# Latent keys join the fingerprint only when set, so checkpoints of earlier runs still load.
_LATENT_DEFAULTS = {"latent": "gaussian", "latent_dim": 0, "latent_categories": 0,
                    "prior": "standard", "prior_components": 16, "prior_flow_layers": 4,
                    "prior_hidden": 128}


def model_fingerprint(config) -> dict:
  """The config fields that fix the parameter shapes (checked when resuming)."""
  m = config.model
  out = {k: m[k] for k in ("vdm", "encoder", "conditioning", "gamma_type", "fourier_features",
                           "n_blocks", "channels", "vocab_size")}
  if m.get("channel_mult"):  # absent by default, so older records still match
    out["channel_mult"] = list(m.channel_mult)
  if m.get("decoder", "vdm") != "vdm":
    out["decoder"] = m.decoder
  if m.get("num_classes", 0):  # absent otherwise: older checkpoints stay compatible
    out.update(num_classes=m.num_classes, label_encoder=bool(m.label_encoder))
  out.update({k: m.get(k, d) for k, d in _LATENT_DEFAULTS.items() if m.get(k, d) != d})
  return out
