"""Speed, memory and robustness measurements: run each as `python -m benchmarks.NAME`
from the repository root (figures and method in benchmarks/README.md)."""
