"""Ray's setup lives in capfilt/ray_env.py, on the floor every layer may import (model/'s trainer
launches Ray Train with it); the stages and tests import it from here as before."""

from capfilt.ray_env import ensure_ray, gpus_available  # noqa: F401  (also sets Ray's environment before ray)
