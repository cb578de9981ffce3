"""Prefect flows: wiring only (which stage, in which order, with which config)."""

from capfilt.environment import apply_defaults

apply_defaults()  # flows imported as a library (a deployment, a notebook) are offline and patient too
