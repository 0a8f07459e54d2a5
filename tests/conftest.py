"""Hypothesis profiles: "ci" is derandomized (set by CI=true), "dev" explores; neither has a deadline.

The tests run torch on one thread: their tensors are tiny, and on a busy machine torch's thread
pool waits on cores other processes hold (a 4x4 conv measured 3 us on one thread, 27 ms on two).
"""

import os

import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)

settings.register_profile(
    "ci", derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
