"""Test setup: fake 4 CPU devices so sharded code is tested on any machine, and compile
each program once per session.

This must run before JAX initialises its backends, which is why it lives in conftest.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests build a program that an earlier test (or process) already compiled: every
# `training.prepare` makes fresh jitted closures, a resumed run compiles its step again,
# and each process of a kill-and-resume or multi-process test starts cold. JAX's
# persistent compilation cache turns those compilations into reads of the same executable
# (it changes no number). Set in the environment, before JAX is imported, so that the
# processes the tests start and pytest-xdist's workers share it; `.ci/run` names one
# directory for all its stages, else each session gets one of its own.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="magnet-jax-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
# Only programs that take a tenth of a second or more to compile: every write to a cache with
# a size limit lists and stats the whole directory (its LRU eviction), so caching the
# thousands of op-by-op programs of eager tests made each write slower as the suite went on,
# and eager tests late in a run several times slower than alone.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# A size limit turns on the cache's file lock: without it a process may read an entry that
# another is still writing (two processes of one run compile the same programs).
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
