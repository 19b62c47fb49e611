"""The sampling benchmark's classic-VAE row (the generation time study C compares)."""
import pytest

from benchmarks import sampling


def test_sampling_benchmark_times_the_classic_vae(monkeypatch, capsys):
  """`benchmarks.sampling --decoder conv_vae`: one row, per-image time = batch time / N."""
  monkeypatch.setattr("sys.argv", ["sampling", "--decoder", "conv_vae", "--encoder", "te",
                                   "--num", "4", "--image", "8", "--repeats", "2"])
  sampling.main()
  rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| conv_vae |")]
  assert len(rows) == 1, rows
  cells = [c.strip() for c in rows[0].strip("|").split("|")]
  assert cells[:3] == ["conv_vae", "te", "4"]
  median_s, per_image_ms = float(cells[3].split()[0]), float(cells[5])
  assert per_image_ms > 0
  assert per_image_ms == pytest.approx(1e3 * median_s / 4, abs=0.13)  # "0.123": 3 decimals
