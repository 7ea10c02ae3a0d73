"""The Magnet Loss (Rippel et al., ICLR 2016): minibatch loss (eq. 5) and full objective (eq. 4).

Both are pure functions of explicit arrays, usable under ``jax.jit``, ``jax.grad`` and
``jax.vmap``. Squared Euclidean distances are used everywhere, the variance is σ² (never
σ⁴), the denominator runs only over clusters of *other* classes, and there are no epsilon
terms that move the values; tests/test_magnet_loss.py holds the regression values.

Input checks (shapes, ranks, dtypes, hyperparameters) run eagerly in the public functions,
so they raise ``ValueError`` at trace time under ``jit``; the arithmetic lives in jitted
private functions, so eager calls do not dispatch op by op.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax._checks import check_integer_dtype, is_concrete
from magnet_jax.losses.distances import squared_distances

__all__ = [
    "MagnetTerms",
    "magnet_terms",
    "magnet_loss",
    "magnet_full_objective",
    "validate_cluster_labels",
]

_REDUCTIONS = ("mean", "sum", "none")


class MagnetTerms(NamedTuple):
    """Per-example terms of the minibatch Magnet Loss.

    Attributes:
      losses: [batch] per-example loss ℓ_i after the hinge; exactly 0 where
        ``has_impostor`` is False.
      variance: [] the shared batch variance σ̂² = Σ_i ‖r_i − μ̂(r_i)‖² / (B − 1), as
        computed (before the zero guard, so 0 when every cluster is a singleton).
        Gradients flow through it unless ``stop_gradient_variance`` was set.
      has_impostor: [batch] bool, whether the batch holds at least one cluster of another
        class than example i (otherwise ℓ_i has an empty denominator and is set to 0).
    """

    losses: jax.Array
    variance: jax.Array
    has_impostor: jax.Array


# ----------------------------------------------------------------------------------------
# Input checks (eager: shapes and dtypes are static even under jit)
# ----------------------------------------------------------------------------------------


def _check_alpha(alpha) -> None:
    if not is_concrete(alpha):
        # A traced margin (e.g. a jit argument) has no value to check here; the
        # docstrings say a negative one is the caller's responsibility.
        return
    alpha_value = np.asarray(alpha)
    if alpha_value.shape != ():
        raise ValueError(f"alpha must be a scalar, got shape {alpha_value.shape}.")
    if not alpha_value >= 0:  # also rejects NaN
        raise ValueError(f"alpha must be >= 0, got {alpha_value}.")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")


def _check_floating(name: str, array: jax.Array) -> None:
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise ValueError(
            f"{name} must have a floating dtype, got {array.dtype} (shape {array.shape})."
        )


def _check_embeddings(embeddings: jax.Array) -> None:
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must have shape [batch, dim], got shape {embeddings.shape}.")
    _check_floating("embeddings", embeddings)


def _check_per_example(name: str, array: jax.Array, embeddings: jax.Array) -> None:
    if array.ndim != 1 or array.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"{name} must have shape [batch] = [{embeddings.shape[0]}] to match embeddings "
            f"of shape {embeddings.shape}, got shape {array.shape}."
        )
    check_integer_dtype(name, array)


# ----------------------------------------------------------------------------------------
# Numerics
# ----------------------------------------------------------------------------------------


def _compute_dtype(*dtypes) -> jnp.dtype:
    # Half-precision inputs are computed in float32; float64 stays float64. Chosen
    # explicitly rather than by promotion, which is an error under strict promotion.
    if any(jnp.dtype(dtype).itemsize >= 8 for dtype in dtypes):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def _variance_floor(dtype) -> float:
    # The smallest variance used. Its square is still a normal number, so 1/σ² and the
    # gradient through σ² (which holds 1/σ⁴) stay finite when σ̂² = 0. Every real
    # variance is far above it (float32: ~1e-19), so normal values are unchanged.
    return float(np.sqrt(np.finfo(dtype).tiny))


def _hinged_losses(
    own_squared_distances: jax.Array,
    impostor_squared_distances: jax.Array,
    impostor_mask: jax.Array,
    variance: jax.Array,
    alpha: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """ℓ_i = max(0, d_own/(2σ²) + α + log Σ_{masked impostors} exp(−d/(2σ²))).

    Rows with no impostor get exactly 0 with zero gradients: every value on their
    backward path is kept finite (masked entries are replaced before exp and log, the
    "double where"), so no 0·inf appears.
    """
    dtype = own_squared_distances.dtype
    floor = _variance_floor(dtype)
    # `where`, not `maximum`: its gradient is a select, never a product with 0.
    variance = jnp.where(variance > floor, variance, floor)
    inverse_two_variance = 0.5 / variance
    # The clamp only acts when σ̂² hit the floor and a scaled distance overflowed.
    impostor_logits = jnp.maximum(
        -impostor_squared_distances * inverse_two_variance, -np.finfo(dtype).max
    )
    has_impostor = jnp.any(impostor_mask, axis=-1)
    safe_logits = jnp.where(impostor_mask, impostor_logits, 0)
    row_max = jnp.max(jnp.where(impostor_mask, safe_logits, -jnp.inf), axis=-1)
    row_max = jax.lax.stop_gradient(jnp.where(has_impostor, row_max, 0))
    exponentials = jnp.where(impostor_mask, jnp.exp(safe_logits - row_max[:, None]), 0)
    sum_exponentials = jnp.where(has_impostor, jnp.sum(exponentials, axis=-1), 1)
    log_denominator = row_max + jnp.log(sum_exponentials)
    margin_violation = own_squared_distances * inverse_two_variance + alpha + log_denominator
    losses = jnp.where(has_impostor, jax.nn.relu(margin_violation), 0)
    return losses, has_impostor


def _reduce(losses: jax.Array, reduction: str) -> jax.Array:
    if reduction == "mean":
        return jnp.mean(losses)
    if reduction == "sum":
        return jnp.sum(losses)
    return losses


@functools.partial(jax.jit, static_argnames="stop_gradient_variance")
def _magnet_terms(
    embeddings: jax.Array,
    labels: jax.Array,
    cluster_ids: jax.Array,
    alpha: jax.Array,
    stop_gradient_variance: bool,
) -> MagnetTerms:
    batch_size = embeddings.shape[0]
    # Each cluster is represented by its first member: `first_member[i]` is the index of
    # the first example with example i's id, a canonical cluster id in [0, batch).
    same_cluster = cluster_ids[:, None] == cluster_ids[None, :]
    first_member = jnp.argmax(same_cluster, axis=1)
    is_first_member = first_member == jnp.arange(batch_size)
    cluster_sums = jax.ops.segment_sum(embeddings, first_member, num_segments=batch_size)
    cluster_sizes = jax.ops.segment_sum(
        jnp.ones((batch_size,), embeddings.dtype), first_member, num_segments=batch_size
    )
    # Canonical ids that are no cluster's first member are empty: divide by 1, not 0.
    cluster_means = cluster_sums / jnp.where(cluster_sizes > 0, cluster_sizes, 1)[:, None]
    own_means = cluster_means[first_member]

    own_offsets = embeddings - own_means
    own_squared_distances = jnp.sum(own_offsets * own_offsets, axis=-1)
    variance = jnp.sum(own_squared_distances) / (batch_size - 1)
    if stop_gradient_variance:
        variance = jax.lax.stop_gradient(variance)

    # Column j stands for the cluster whose first member is j; labels[j] is its class.
    impostor_squared_distances = squared_distances(embeddings, own_means)
    impostor_mask = is_first_member[None, :] & (labels[None, :] != labels[:, None])
    losses, has_impostor = _hinged_losses(
        own_squared_distances, impostor_squared_distances, impostor_mask, variance, alpha
    )
    return MagnetTerms(losses=losses, variance=variance, has_impostor=has_impostor)


@functools.partial(jax.jit, static_argnames="reduction")
def _magnet_full_objective(
    embeddings: jax.Array,
    labels: jax.Array,
    assignments: jax.Array,
    centroids: jax.Array,
    valid: jax.Array,
    variance: jax.Array,
    alpha: jax.Array,
    reduction: str,
) -> jax.Array:
    num_classes, clusters_per_class, dim = centroids.shape
    own_offsets = embeddings - centroids[labels, assignments]
    own_squared_distances = jnp.sum(own_offsets * own_offsets, axis=-1)

    # Zero the invalid slots: an empty cluster's centre may be NaN or inf (0/0 in
    # k-means), and even masked out it would poison the gradients through its distances.
    impostor_centroids = jnp.where(valid[:, :, None], centroids, 0)
    impostor_centroids = impostor_centroids.reshape(num_classes * clusters_per_class, dim)
    slot_classes = jnp.repeat(jnp.arange(num_classes, dtype=labels.dtype), clusters_per_class)
    impostor_squared_distances = squared_distances(embeddings, impostor_centroids)
    impostor_mask = valid.reshape(-1)[None, :] & (slot_classes[None, :] != labels[:, None])
    losses, _ = _hinged_losses(
        own_squared_distances, impostor_squared_distances, impostor_mask, variance, alpha
    )
    return _reduce(losses, reduction)


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------


def magnet_terms(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    cluster_ids: jax.typing.ArrayLike,
    *,
    alpha: float = 1.0,
    stop_gradient_variance: bool = False,
) -> MagnetTerms:
    r"""Per-example terms of the minibatch Magnet Loss (paper eq. 5).

    The batch is partitioned into clusters by ``cluster_ids``; μ̂_m is the mean of the
    batch embeddings of cluster m, μ̂(r_i) that of example i's own cluster, and

    .. math::
      \hat\sigma^2 = \frac{1}{B - 1} \sum_{i=1}^{B} \lVert r_i - \hat\mu(r_i) \rVert^2,

      \ell_i = \max\Bigl(0,\; \frac{\lVert r_i - \hat\mu(r_i)\rVert^2}{2\hat\sigma^2}
        + \alpha + \log \sum_{m:\, C(m) \neq C(r_i)}
        e^{-\lVert r_i - \hat\mu_m\rVert^2 / 2\hat\sigma^2}\Bigr).

    The denominator runs over the distinct clusters of *other* classes only: the own
    cluster and every other cluster of the same class are excluded. A cluster's class is
    the label of its first member (a cluster's examples must share one label; see
    :func:`validate_cluster_labels`).

    Edge cases:
      * An example with no other-class cluster in the batch (which happens when the whole
        batch is of one class) has an empty denominator (log 0 = −inf): its ℓ_i is
        exactly 0 with zero, finite gradients, and ``has_impostor[i]`` is False.
      * σ̂² = 0 (every cluster a singleton, or each cluster's members identical): σ̂² is
        replaced by √tiny of the compute dtype (~1e-19 in float32), which no real
        variance reaches, so normal values are unchanged. The losses are then 0 with zero
        gradients unless an other-class centre coincides with an example: a batch needs
        clusters of at least two distinct examples to be informative.

    Numerics: computed in float32 for half-precision inputs (float64 for float64),
    squared distances from differences (no cancellation) for batches up to
    ``batch² · dim = 2²²`` elements and from a centred expansion beyond, and a
    max-subtracted log-sum-exp; embeddings scaled from 1e-3 to 1e3 give the same losses
    to float32 precision. Cost O(batch² · dim).

    Args:
      embeddings: [batch, dim] floating embeddings r_i; batch ≥ 2.
      labels: [batch] integer class of each example.
      cluster_ids: [batch] arbitrary integers; examples with equal ids form one cluster.
        Ids need not be contiguous or sorted (e.g. the flat ids ``c * K + k``).
      alpha: the margin α ≥ 0 between an example's own cluster and the impostor
        clusters, in units of 2σ̂². Checked when concrete; a traced ``alpha`` (e.g. an
        argument of a jitted function) cannot be, and a negative one is then used
        as given.
      stop_gradient_variance: if True, σ̂² is a constant in the backward pass (the value
        is unchanged). Default False: gradients flow through σ̂², as in every public
        implementation.

    Returns:
      A :class:`MagnetTerms` with ``losses`` [batch], ``variance`` [] and
      ``has_impostor`` [batch]; floats in the compute dtype (float32 for float16,
      bfloat16 and float32 inputs, float64 for float64 inputs).

    Example:
      >>> import jax.numpy as jnp
      >>> embeddings = jnp.array([[0., 0.], [0., 1.], [4., 0.], [4., 1.]])
      >>> terms = magnet_terms(embeddings, jnp.array([0, 0, 1, 1]), jnp.array([7, 7, 3, 3]))
      >>> terms.losses.shape, round(float(terms.variance), 4)
      ((4,), 0.3333)

    Raises:
      ValueError: if a shape, rank or dtype is wrong, batch < 2, or a concrete alpha < 0.

    References:
      Rippel, Paluri, Dollar, Bourdev, "Metric Learning with Adaptive Density
      Discrimination", ICLR 2016, https://arxiv.org/abs/1511.05939 (eq. 5).
    """
    embeddings = jnp.asarray(embeddings)
    labels = jnp.asarray(labels)
    cluster_ids = jnp.asarray(cluster_ids)
    _check_embeddings(embeddings)
    _check_per_example("labels", labels, embeddings)
    _check_per_example("cluster_ids", cluster_ids, embeddings)
    if embeddings.shape[0] < 2:
        raise ValueError(
            "The batch variance needs at least 2 examples, got embeddings of shape "
            f"{embeddings.shape}."
        )
    _check_alpha(alpha)
    dtype = _compute_dtype(embeddings.dtype)
    return _magnet_terms(
        embeddings.astype(dtype),
        labels,
        cluster_ids,
        jnp.asarray(alpha, dtype),
        stop_gradient_variance=bool(stop_gradient_variance),
    )


def magnet_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    cluster_ids: jax.typing.ArrayLike,
    *,
    alpha: float = 1.0,
    reduction: str = "mean",
    stop_gradient_variance: bool = False,
) -> jax.Array:
    r"""The minibatch Magnet Loss (paper eq. 5).

    .. math::
      L = \frac{1}{B} \sum_{i=1}^{B} \max\Bigl(0,\;
        \frac{\lVert r_i - \hat\mu(r_i)\rVert^2}{2\hat\sigma^2} + \alpha
        + \log \sum_{m:\, C(m) \neq C(r_i)}
        e^{-\lVert r_i - \hat\mu_m\rVert^2 / 2\hat\sigma^2}\Bigr),

    with the batch cluster means μ̂_m and the shared batch variance
    σ̂² = Σ_i ‖r_i − μ̂(r_i)‖² / (B − 1). The sum runs over the distinct clusters of other
    classes only. See :func:`magnet_terms` for the per-example terms and the edge cases:
    an example with no other-class cluster in the batch contributes exactly 0 (with zero
    gradients) and still counts in the mean's denominator B.

    Args:
      embeddings: [batch, dim] floating embeddings; batch ≥ 2.
      labels: [batch] integer class of each example.
      cluster_ids: [batch] arbitrary integers; examples with equal ids form one cluster.
      alpha: the margin α ≥ 0 (checked when concrete, not when traced; see
        :func:`magnet_terms`).
      reduction: ``"mean"`` (scalar, the paper's loss), ``"sum"`` (scalar) or ``"none"``
        ([batch] per-example losses, all with the same shared σ̂²).
      stop_gradient_variance: if True, no gradient flows through σ̂² (value unchanged).

    Returns:
      [] for ``"mean"`` and ``"sum"``, [batch] for ``"none"``; float32 for float16,
      bfloat16 and float32 inputs, float64 for float64 inputs.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> embeddings = jax.random.normal(jax.random.key(0), (8, 4))
      >>> labels = jnp.array([0, 0, 0, 0, 1, 1, 2, 2])
      >>> cluster_ids = jnp.array([0, 0, 1, 1, 2, 2, 4, 4])  # class c, cluster k: c * 2 + k
      >>> jax.jit(magnet_loss)(embeddings, labels, cluster_ids).shape
      ()

    Raises:
      ValueError: if a shape, rank or dtype is wrong, batch < 2, a concrete alpha < 0, or the
        reduction is unknown.

    References:
      Rippel, Paluri, Dollar, Bourdev, "Metric Learning with Adaptive Density
      Discrimination", ICLR 2016, https://arxiv.org/abs/1511.05939 (eq. 5).
    """
    _check_reduction(reduction)
    terms = magnet_terms(
        embeddings,
        labels,
        cluster_ids,
        alpha=alpha,
        stop_gradient_variance=stop_gradient_variance,
    )
    return _reduce(terms.losses, reduction)


def magnet_full_objective(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    assignments: jax.typing.ArrayLike,
    centroids: jax.typing.ArrayLike,
    valid: jax.typing.ArrayLike,
    variance: jax.typing.ArrayLike,
    *,
    alpha: float = 1.0,
    reduction: str = "mean",
) -> jax.Array:
    r"""The full Magnet objective (paper eq. 4) against a cluster index.

    .. math::
      \ell_n = \max\Bigl(0,\; \frac{\lVert r_n - \mu_{k_n}^{c_n}\rVert^2}{2\sigma^2}
        + \alpha + \log \sum_{c \neq c_n} \sum_{k:\, \mathrm{valid}[c, k]}
        e^{-\lVert r_n - \mu_k^c\rVert^2 / 2\sigma^2}\Bigr)

    where c_n = ``labels[n]``, k_n = ``assignments[n]``, μ_k^c = ``centroids[c, k]`` and
    σ² is the training-set variance. Invalid (empty) slots never enter the denominator
    and their centroid values are ignored (they may hold NaN or inf). Useful as a
    diagnostic on a held-out set.

    An example with no valid cluster of another class gets exactly 0 (zero gradients) and
    still counts in the mean. A ``variance`` of 0 is replaced by √tiny of the compute
    dtype, as in :func:`magnet_terms`. Labels and assignments are not range-checked (they
    cannot be under ``jit``): out-of-range indices are clamped by JAX's gather, and an
    example's own slot is used even if it is marked invalid. Memory O(N · C · K) for the
    distances: chunk over examples with ``reduction="none"`` for large sets.

    Args:
      embeddings: [num_examples, dim] floating embeddings.
      labels: [num_examples] integer class of each example, in [0, num_classes).
      assignments: [num_examples] integer cluster of each example within its class, in
        [0, clusters_per_class).
      centroids: [num_classes, clusters_per_class, dim] floating cluster centres.
      valid: [num_classes, clusters_per_class] bool, False for empty or unused slots.
      variance: [] the variance σ² > 0 (e.g. of the training set under the index).
      alpha: the margin α ≥ 0 (checked when concrete, not when traced; see
        :func:`magnet_terms`).
      reduction: ``"mean"``, ``"sum"`` (scalars) or ``"none"`` ([num_examples]).

    Returns:
      [] for ``"mean"`` and ``"sum"``, [num_examples] for ``"none"``; float32 for
      half-precision and float32 inputs, float64 for float64 inputs.

    Example:
      >>> import jax.numpy as jnp
      >>> centroids = jnp.array([[[0., 0.], [9., 9.]], [[4., 0.], [4., 4.]]])
      >>> valid = jnp.array([[True, False], [True, True]])
      >>> embeddings = jnp.array([[0., 1.], [4., 1.]])
      >>> magnet_full_objective(embeddings, jnp.array([0, 1]), jnp.array([0, 0]),
      ...                       centroids, valid, 1.0, reduction="none").shape
      (2,)

    Raises:
      ValueError: if a shape, rank or dtype is wrong, a concrete alpha < 0 or variance is
        negative, or the reduction is unknown.

    References:
      Rippel, Paluri, Dollar, Bourdev, "Metric Learning with Adaptive Density
      Discrimination", ICLR 2016, https://arxiv.org/abs/1511.05939 (eq. 4).
    """
    embeddings = jnp.asarray(embeddings)
    labels = jnp.asarray(labels)
    assignments = jnp.asarray(assignments)
    centroids = jnp.asarray(centroids)
    valid = jnp.asarray(valid)
    variance = jnp.asarray(variance)
    _check_embeddings(embeddings)
    _check_per_example("labels", labels, embeddings)
    _check_per_example("assignments", assignments, embeddings)
    if centroids.ndim != 3 or centroids.shape[-1] != embeddings.shape[-1]:
        raise ValueError(
            "centroids must have shape [num_classes, clusters_per_class, dim] with dim = "
            f"{embeddings.shape[-1]} (embeddings of shape {embeddings.shape}), got shape "
            f"{centroids.shape}."
        )
    _check_floating("centroids", centroids)
    if valid.shape != centroids.shape[:2]:
        raise ValueError(
            f"valid must have shape {centroids.shape[:2]} to match centroids of shape "
            f"{centroids.shape}, got shape {valid.shape}."
        )
    if valid.dtype != jnp.bool_:
        raise ValueError(
            f"valid must be a bool mask, got dtype {valid.dtype} (shape {valid.shape})."
        )
    if variance.shape != ():
        raise ValueError(f"variance must be a scalar (shape ()), got shape {variance.shape}.")
    if is_concrete(variance) and not np.asarray(variance) >= 0:
        raise ValueError(f"variance must be >= 0, got {np.asarray(variance)}.")
    _check_alpha(alpha)
    _check_reduction(reduction)

    dtype = _compute_dtype(embeddings.dtype, centroids.dtype)
    return _magnet_full_objective(
        embeddings.astype(dtype),
        labels,
        assignments,
        centroids.astype(dtype),
        valid,
        variance.astype(dtype),
        jnp.asarray(alpha, dtype),
        reduction=reduction,
    )


def validate_cluster_labels(
    labels: jax.typing.ArrayLike, cluster_ids: jax.typing.ArrayLike
) -> None:
    """Checks on concrete (host) inputs that every cluster's examples share one label.

    :func:`magnet_loss` assumes it and cannot check it under ``jit``; call this in tests
    or in a data pipeline.

    Args:
      labels: [batch] integer class of each example.
      cluster_ids: [batch] integer cluster id of each example.

    Raises:
      ValueError: if the shapes differ or a cluster holds examples of several labels (the
        message names the first such cluster and its labels).
    """
    labels = np.asarray(labels)
    cluster_ids = np.asarray(cluster_ids)
    if labels.ndim != 1 or labels.shape != cluster_ids.shape:
        raise ValueError(
            "labels and cluster_ids must both have shape [batch], got "
            f"{labels.shape} and {cluster_ids.shape}."
        )
    for cluster_id in np.unique(cluster_ids):
        cluster_labels = np.unique(labels[cluster_ids == cluster_id])
        if cluster_labels.size > 1:
            raise ValueError(
                f"cluster {cluster_id} holds examples of several labels: {cluster_labels.tolist()}."
            )
