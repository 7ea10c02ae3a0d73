"""``--input auto``: whether the data is copied onto the devices or read from the host.

``--input memory`` places the training and test sets on every device (as the float32
arrays a dataset holds; image files decoded at ``--image-size``), ``--input stream``
reads each batch's rows on the host (:mod:`magnet_jax.streaming`). ``auto`` streams when
memory mode's arrays would take more than
:data:`~magnet_jax.config.STREAM_SHARE` of one device's memory:
the allocator's limit of a GPU or TPU, or, for CPU devices, the host's available memory
divided among the run's devices on the host. The choice is made once, before the first
step (:func:`magnet_jax.training.resolve_input`); the run's ``config.json`` records
``memory`` or ``stream``, never ``auto``, so a resumed run reads its data the way it
started whatever the estimate says then.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import NamedTuple

import numpy as np

from magnet_jax.config import STREAM_SHARE, TrainConfig, flag


class Budget(NamedTuple):
    """The memory of one device.

    bytes: how many bytes it holds.
    source: where the number comes from, for the line that reports the choice.
    """

    bytes: int
    source: str


class InputChoice(NamedTuple):
    """input: ``"memory"`` or ``"stream"``; reason: one line saying why."""

    input: str
    reason: str


def memory_mode_bytes(x_train, x_test) -> int:
    """Bytes that ``--input memory`` places on each device: both sets, whole.

    Args:
      x_train: ``[N, ...]`` array, or :class:`~magnet_jax.data.lazy.ImageFiles` (its
        decoded shape and dtype).
      x_test: ``[N_test, ...]``, likewise.

    Returns:
      ``(N + N_test) × prod(...) × itemsize``: datasets hold float32, which the device
      array keeps.
    """
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in (x_train, x_test))


def host_available_bytes() -> int:
    """The host's available memory: ``MemAvailable`` of ``/proc/meminfo`` (free plus
    reclaimable caches), else the free pages that ``os.sysconf`` reports."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def device_budget(devices) -> Budget:
    """The memory of one of ``devices`` (a run's ``jax.Device`` list).

    A GPU or TPU reports its allocator's limit (``memory_stats()["bytes_limit"]``); CPU
    devices report none and share the host's memory, so each gets an equal part of what
    is available on its host.
    """
    first = devices[0]
    try:
        stats = first.memory_stats()
    except Exception:  # noqa: BLE001 -- a backend without memory statistics may raise
        stats = None
    if stats and stats.get("bytes_limit"):
        return Budget(int(stats["bytes_limit"]), f"the memory of one {first.platform} device")
    local = sum(d.process_index == first.process_index for d in devices)
    available = host_available_bytes()
    if local == 1:
        return Budget(available, "the host's available memory")
    return Budget(
        available // local,
        f"one of {local} equal shares of the host's available {format_bytes(available)}",
    )


def stream_blocker(config: TrainConfig) -> str | None:
    """Why ``config`` cannot stream (then auto keeps the data in memory), or None."""
    from magnet_jax import data

    if config.cache_prefix:
        return f"{flag('cache_prefix')} keeps the frozen stages' output on the devices"
    if config.image_size is None and data.takes_option(config.dataset, "lazy"):
        return f"image files are streamed at a fixed size only ({flag('image_size')})"
    if importlib.util.find_spec("grain") is None:
        return 'streaming needs Grain, which is not installed (pip install "magnet-jax[stream]")'
    return None


def choose(needed: int, budget: Budget, *, blocker: str | None = None) -> InputChoice:
    """``memory`` when ``needed`` bytes per device fit in :data:`STREAM_SHARE` of
    ``budget``, or when ``blocker`` says why the data cannot be streamed; else ``stream``."""
    limit = f"{STREAM_SHARE:.0%} of {format_bytes(budget.bytes)} ({budget.source})"
    size = f"the training and test sets take {format_bytes(needed)} per device"
    if needed <= STREAM_SHARE * budget.bytes:
        return InputChoice("memory", f"{size}, within {limit}")
    if blocker is not None:
        return InputChoice("memory", f"{size}, more than {limit}, but {blocker}")
    return InputChoice("stream", f"{size}, more than {limit}")


def format_bytes(count: int) -> str:
    """``1536000`` -> ``'1.5 MB'`` (decimal units)."""
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"
