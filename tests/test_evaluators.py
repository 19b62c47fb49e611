"""The evaluator interface: selection by config, validation, and a custom evaluator list."""
import pytest

from vdmrep import config_lib, evaluators


def test_selection_follows_config_and_switches():
  c = config_lib.base_config()
  assert evaluators.selected(c, full=True) == list(evaluators.NAMES)
  assert evaluators.selected(c, full=False) == ["elbo", "baselines", "latents"]
  c.eval.sample_quality, c.eval.pictures = False, False
  assert "samples" not in evaluators.selected(c, True)
  assert "pictures" not in evaluators.selected(c, True)
  c.eval.periodic_full = True
  assert evaluators.selected(c, False) == evaluators.selected(c, True)


@pytest.mark.parametrize("key,value,match", [
    ("evaluators", "elbo,fid", "unknown evaluator"),
    ("evaluators", "latents,elbo", "'elbo' must come first"),
    ("periodic_evaluators", "ood", "need 'elbo'"),
    ("posterior_std_grid", "0.1,-1", "must be > 0"),
    ("probe_cs", "0.1,x", "comma-separated positive"),
])
def test_bad_evaluator_config_names_the_key(key, value, match):
  c = config_lib.base_config()
  c.eval[key] = value
  with pytest.raises(config_lib.ConfigError, match=f"config.eval.{key}=.*{match}"):
    config_lib.validate(c)
