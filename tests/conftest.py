"""Test setup: fake 4 CPU devices so sharded code is tested on any machine.

This must run before JAX initialises its backends, which is why it lives in conftest.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
