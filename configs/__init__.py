"""Experiment configs, loaded by path (--config configs/NAME.py[:ARG]) from the repository
root, so that `configs.common` imports."""
