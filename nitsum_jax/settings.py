"""Placeholder until the typed settings registry lands: the two engine knobs."""

import functools
import os


class _Settings:
    def __init__(self, environ):
        self.gil_switch_s = float(environ.get("NITSUM_GIL_SWITCH_S", "0.0005"))
        self.chain_steps = int(environ["NITSUM_CHAIN_STEPS"]) if "NITSUM_CHAIN_STEPS" in environ else None


@functools.cache
def settings():
    return _Settings(os.environ)
