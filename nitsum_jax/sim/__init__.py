"""A calibrated simulator: the engine core (`engine/core.py`) on a virtual clock, step times
from a measured profile (`profile.py`, `step_model.py`), the static baselines and a plan search.
Commands: `nitsum-jax profile`, `simulate`, `plan` (`cli.py`). Only `measure.py` runs anything
on devices (importing the engine package imports JAX, but the simulator never calls it)."""
