"""A calibrated simulator: the engine core (`engine/core.py`) on a virtual clock, step times
from a measured profile (`profile.py`, `step_model.py`), the static baselines and a plan search.
Commands: `nitsum-jax profile`, `simulate`, `plan` (`cli.py`). No JAX except `measure.py`."""
