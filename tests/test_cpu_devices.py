"""Several simulated CPU devices on few cores: the trainer must not deadlock.

XLA:CPU runs the per-device parts of all dispatched programs (and their convolutions'
intra-op work) on one shared thread pool; with asynchronous dispatch of consecutive train
steps or of independent embedding chunks, a collective could wait forever for a partner
whose thread was taken (XLA aborts the process after 40 s). Run in a subprocess so that a
regression fails this test instead of killing the test session.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    from magnet_jax import training
    from magnet_jax.config import TrainConfig

    rng = np.random.default_rng(0)
    np.savez(sys.argv[1], x=rng.random((1200, 28, 28, 1), dtype=np.float32),
             y=np.repeat(np.arange(6), 200))
    config = TrainConfig(dataset="npz:" + sys.argv[1], clusters_per_batch=6,
                         examples_per_cluster=4, clusters_per_class=2, eval_chunk_size=32,
                         num_devices=4, steps=1)
    run = training.prepare(config)
    index = training.refresh(run, run.initial_state, None, 0)  # 38 embedding chunks
    state, index, loss = run.steps.run_steps(run.initial_state, index, run.data, 100)
    assert np.isfinite(float(loss))
    print("finished", jax.device_count())
    """
)


def test_convnet_on_four_cpu_devices_does_not_deadlock(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "images.npz")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finished 4" in result.stdout
