"""--embedding-memory: the train steps' embeddings reused at a refresh."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from magnet_jax import embedding_memory, training
from magnet_jax.checkpoint import Checkpointer
from magnet_jax.config import TrainConfig
from magnet_jax.workdir import check_same_run


def test_remember_and_stale_rows_by_hand():
    memory = embedding_memory.empty(5, 2)
    assert embedding_memory.stale_rows(memory, 0, 10).tolist() == [0, 1, 2, 3, 4]
    # Step 3 embeds rows 1 and 4 (row 4 twice: a cluster smaller than D), step 7 row 1.
    memory = embedding_memory.remember(
        memory, jnp.array([1, 4, 4]), jnp.array([[1.0, 1.0], [4.0, 4.0], [4.0, 4.0]]), 3
    )
    memory = embedding_memory.remember(memory, jnp.array([1]), jnp.array([[9.0, 9.0]]), 7)
    np.testing.assert_array_equal(memory.embeddings, [[0, 0], [9, 9], [0, 0], [0, 0], [4, 4]])
    never = embedding_memory.NEVER
    np.testing.assert_array_equal(memory.step, [never, 7, never, never, 3])
    # At step 10: written at step >= 10 - max_age is recent enough.
    assert embedding_memory.stale_rows(memory, 10, 7).tolist() == [0, 2, 3]
    assert embedding_memory.stale_rows(memory, 10, 6).tolist() == [0, 2, 3, 4]
    assert embedding_memory.stale_rows(memory, 10, 3).tolist() == [0, 2, 3, 4]
    assert embedding_memory.stale_rows(memory, 10, 2).tolist() == [0, 1, 2, 3, 4]


def _run(**overrides):
    config = TrainConfig(
        steps=4, kmeans_iterations=10, num_devices=1, eval_chunk_size=100, **overrides
    )
    return training.prepare(config)


def test_a_step_writes_its_batch_embedded_with_the_parameters_it_started_from():
    run = _run(embedding_memory=3)
    state = run.initial_state
    index = training.refresh(run, state, None, 0)
    batch = run.method.sample(index, jax.random.fold_in(state.rng, state.step), run.data)
    expected = run.model(state.params)(run.data.x[batch.indices])
    # Kept: the step donates its inputs.
    stepped, _, _ = run.steps.train_step(
        jax.tree.map(jnp.copy, state), jax.tree.map(jnp.copy, index), run.data
    )
    rows = np.asarray(batch.indices)
    np.testing.assert_allclose(stepped.memory.embeddings[rows], expected, atol=1e-6, rtol=0)
    written = np.asarray(stepped.memory.step)
    assert set(np.flatnonzero(written == 0)) == set(rows.tolist())
    assert np.all(np.delete(written, rows) == embedding_memory.NEVER)


def test_a_refresh_reuses_recent_rows_and_embeds_the_others():
    run = _run(embedding_memory=3)
    state = run.initial_state
    full = np.asarray(run.steps.embed(state.params, run.data.x))
    n = full.shape[0]
    recent = np.arange(0, n, 3)  # written at step 8: reused by a refresh at step 10
    old = np.arange(1, n, 3)  # written at step 6: too old
    marker = jnp.full((recent.size, full.shape[1]), 7.0)
    memory = embedding_memory.empty(n, full.shape[1])
    memory = embedding_memory.remember(memory, jnp.asarray(old), jnp.zeros_like(full[old]), 6)
    memory = embedding_memory.remember(memory, jnp.asarray(recent), marker, 8)
    embed, embedded_rows = training._embed_with_memory(run, memory, 10)
    assert embedded_rows == n - recent.size
    combined = np.asarray(embed(state.params, run.data.x))
    np.testing.assert_array_equal(combined[recent], 7.0)
    others = np.setdiff1d(np.arange(n), recent)
    np.testing.assert_allclose(combined[others], full[others], atol=1e-6, rtol=0)
    # The memory itself is left as it was (the refresh embeds into a copy).
    np.testing.assert_array_equal(memory.embeddings[others[0]], 0.0)
    # No recent row: the plain, whole-set embedding.
    embed, embedded_rows = training._embed_with_memory(run, memory, 100)
    assert embedded_rows == n and embed(state.params, run.data.x).shape == (n, full.shape[1])


def test_training_with_a_memory_refreshes_from_it():
    run = _run(embedding_memory=2, refresh_every=2)
    result = training.learning_curve(run, [4])
    assert np.isfinite(result["final_loss"])
    written = np.asarray(result["state"].memory.step)
    assert set(np.unique(written)) <= {embedding_memory.NEVER, 0, 1, 2, 3}
    assert np.any(written == 3)


def test_a_refresh_reports_how_many_rows_it_embedded():
    run = _run(embedding_memory=2, refresh_every=2)
    state = run.initial_state
    index, first = training.refresh(run, state, None, 0, with_diagnostics=True)
    assert first["embedded_rows"] == run.info.num_examples  # nothing remembered yet
    state, index, _ = run.steps.run_steps(state, index, run.data, jnp.asarray(2, jnp.int32))
    _, later = training.refresh(run, state, index, 2, with_diagnostics=True)
    stale = embedding_memory.stale_rows(state.memory, 2, 2)
    assert later["embedded_rows"] == stale.size < run.info.num_examples
    assert training._refresh_line(run) == (
        "refresh every 2 steps, embedding only the examples the train steps did not embed "
        "in the last 2 steps (--embedding-memory 2)"
    )
    assert training._refresh_line(_run()).endswith("embedding the whole training set")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"embedding_memory": -1}, "--embedding-memory must be >= 0"),
        ({"embedding_memory": 5, "augment_shift": 2}, "--augment-shift"),
        ({"embedding_memory": 5, "augment_crop": True}, "--augment-crop"),
        ({"embedding_memory": 5, "train_bn": True, "backbone": "resnet50"}, "--train-bn"),
    ],
)
def test_bad_memory_flags_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides).validate()


@pytest.mark.parametrize(
    "loss, why", [("triplet", "has no refresh"), ("plm", "refreshes from embeddings of another")]
)
def test_methods_whose_refresh_cannot_reuse_the_steps_embeddings_are_refused(loss, why):
    with pytest.raises(ValueError, match=f"--embedding-memory .* --loss {loss} {why}"):
        training.prepare(TrainConfig(loss=loss, embedding_memory=5, num_devices=1))


def test_the_memory_is_recorded_and_cannot_change_on_resume():
    saved = json.loads(json.dumps(TrainConfig(embedding_memory=5).to_dict()))
    assert saved["embedding_memory"] == 5
    with pytest.raises(ValueError, match="--embedding-memory: saved 5, now 0"):
        check_same_run(saved, TrainConfig(), "W", 10)
    # A config.json from before the option: no memory, which is what the run had.
    del saved["embedding_memory"]
    check_same_run({**saved, "embedding_memory": 0}, TrainConfig(), "W", 10)


def test_checkpoints_hold_the_memory_only_when_there_is_one(tmp_path):
    """Without a memory the state item is the one earlier versions wrote (no ``memory``
    entry), so their checkpoints restore; with one it round-trips exactly."""
    run = _run(embedding_memory=3)
    state = run.initial_state
    state = state.replace(
        memory=embedding_memory.remember(
            state.memory, jnp.array([2, 5]), jnp.ones((2, state.memory.embeddings.shape[1])), 1
        )
    )
    checkpointer = Checkpointer(tmp_path / "with")
    checkpointer.save(1, state, None, {})
    restored = checkpointer.restore(1, run.initial_state, None).state
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    checkpointer.close()

    plain = state.replace(memory=None)
    checkpointer = Checkpointer(tmp_path / "without")
    checkpointer.save(1, plain, None, {})
    checkpointer.close()
    saved = ocp.PyTreeCheckpointHandler().metadata(tmp_path / "without" / "1" / "state").tree
    assert sorted(saved) == ["opt_state", "params", "rng", "step"]
