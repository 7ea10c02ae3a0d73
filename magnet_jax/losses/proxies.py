"""Proxy and classification losses: ProxyNCA, normalised softmax, ArcFace.

Each class has a learnable vector (a proxy, or a row of a cosine classifier). These vectors
are model parameters: the caller owns them (e.g. as an ``nnx.Param`` next to the embedding
network) and passes them in, so the losses stay pure functions.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from magnet_jax.losses._checks import (
    check_class_weights,
    check_embeddings_and_labels,
    check_reduction,
)
from magnet_jax.losses._masked import reduce_losses
from magnet_jax.losses.distances import l2_normalize, pairwise_distances, safe_sqrt

__all__ = ["proxy_nca_loss", "normalized_softmax_loss", "arcface_loss"]


def _cross_entropy(logits: jax.Array, labels: jax.Array, reduction: str) -> jax.Array:
    losses = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], axis=1)[:, 0]
    return reduce_losses(losses, jnp.ones_like(losses, dtype=bool), reduction)


def _cosines(embeddings: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.matmul(
        l2_normalize(embeddings), l2_normalize(weights).T, precision=jax.lax.Precision.HIGHEST
    )


def proxy_nca_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    proxies: jax.typing.ArrayLike,
    *,
    scale: float = 1.0,
    normalize: bool = True,
    exclude_positive: bool = False,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> jax.Array:
    r"""ProxyNCA: NCA against one learnable proxy per class.

    With :math:`d_{ic} = \|x_i - p_c\|^2` (after L2 normalisation of both, by default) and
    :math:`s` = ``scale``:

    .. math::
      \ell_i = -\log \frac{\exp(-s\, d_{i y_i})}{\sum_{c} \exp(-s\, d_{ic})},

    a softmax cross-entropy on the logits :math:`-s\,d`, averaged over the batch. This is
    pytorch-metric-learning's ``ProxyNCALoss`` (``softmax_scale`` = ``scale``) and
    ProxyNCA++'s form (where ``scale`` is the inverse temperature, 9 there). With
    ``exclude_positive=True`` the denominator runs over :math:`c \ne y_i` only, the
    original paper's equation, which is unbounded below. Difference from
    pytorch-metric-learning: it drops examples whose probability underflows to 0; here the
    loss is computed with ``log_softmax`` and never underflows.

    Args:
      embeddings: embeddings ``[batch, dim]``.
      labels: integer class labels ``[batch]``, in ``[0, num_classes)`` (not checked:
        they may be traced).
      proxies: one proxy per class ``[num_classes, dim]``.
      scale: the scale :math:`s` multiplying the negative squared distances.
      normalize: L2-normalise embeddings and proxies (default, as the paper).
      exclude_positive: leave the own proxy out of the denominator (original paper).
      reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"``: per-example
        ``[batch]``.

    Returns:
      The scalar loss ``[]`` (``[batch]`` with ``reduction="none"``).

    Raises:
      ValueError: for embeddings that are not ``[batch, dim]``, labels that are not integer
        ``[batch]``, proxies that are not ``[num_classes, dim]``, ``exclude_positive`` with
        a single class, or an unknown ``reduction``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0, 0.0]])
      >>> proxies = jnp.array([[1.0, 0.0], [-1.0, 0.0]])
      >>> # logits -0 and -4: -log(1 / (1 + e^-4)) = log(1 + e^-4)
      >>> round(float(proxy_nca_loss(x, jnp.array([0]), proxies)), 6)
      0.01815

    References:
      Movshovitz-Attias, Toshev, Leung, Ioffe, Singh, "No Fuss Distance Metric Learning
      using Proxies", ICCV 2017, arXiv:1703.07464.

      Teh, DeVries, Taylor, "ProxyNCA++: Revisiting and Revitalizing Proxy Neighborhood
      Component Analysis", ECCV 2020, arXiv:2004.01113.
    """
    embeddings, labels = check_embeddings_and_labels("proxy_nca_loss", embeddings, labels)
    proxies = check_class_weights("proxy_nca_loss", "proxies", proxies, embeddings)
    check_reduction("proxy_nca_loss", reduction)
    if exclude_positive and proxies.shape[0] < 2:
        raise ValueError(
            "proxy_nca_loss: exclude_positive needs at least 2 proxies; got "
            f"proxies.shape={proxies.shape}."
        )
    if normalize:
        embeddings = l2_normalize(embeddings)
        proxies = l2_normalize(proxies)
    logits = -scale * pairwise_distances(embeddings, proxies, squared=True)
    if not exclude_positive:
        return _cross_entropy(logits, labels, reduction)
    target = jax.nn.one_hot(labels, proxies.shape[0], dtype=bool)
    lowest = jnp.finfo(logits.dtype).min
    positive_logit = jnp.sum(jnp.where(target, logits, 0.0), axis=1)
    losses = jax.nn.logsumexp(jnp.where(target, lowest, logits), axis=1) - positive_logit
    return reduce_losses(losses, jnp.ones_like(losses, dtype=bool), reduction)


def normalized_softmax_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    weights: jax.typing.ArrayLike,
    *,
    temperature: float = 0.05,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> jax.Array:
    r"""Normalised softmax: cross-entropy of a cosine classifier with a temperature.

    With :math:`\hat x_i`, :math:`\hat w_c` the L2-normalised embeddings and class weights
    and :math:`T` = ``temperature``:

    .. math::
      \ell_i = -\log \frac{\exp(\hat x_i^\top \hat w_{y_i} / T)}
                          {\sum_c \exp(\hat x_i^\top \hat w_c / T)},

    averaged over the batch (pytorch-metric-learning's ``NormalizedSoftmaxLoss``; its ``W``
    is ``weights.T``).

    Args:
      embeddings: embeddings ``[batch, dim]``.
      labels: integer class labels ``[batch]``, in ``[0, num_classes)``.
      weights: class weights ``[num_classes, dim]`` (a model parameter).
      temperature: the softmax temperature :math:`T`.
      reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"``: per-example
        ``[batch]``.

    Returns:
      The scalar loss ``[]`` (``[batch]`` with ``reduction="none"``).

    Raises:
      ValueError: for embeddings that are not ``[batch, dim]``, labels that are not integer
        ``[batch]``, weights that are not ``[num_classes, dim]``, or an unknown
        ``reduction``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[2.0, 0.0]])
      >>> weights = jnp.array([[1.0, 0.0], [0.0, 3.0]])
      >>> # cosines 1 and 0, logits 1 and 0 at T = 1: log(1 + e^-1)
      >>> round(float(normalized_softmax_loss(x, jnp.array([0]), weights, temperature=1.0)), 6)
      0.313262

    References:
      Zhai, Wu, "Classification is a Strong Baseline for Deep Metric Learning", BMVC 2019,
      arXiv:1811.12649.
    """
    embeddings, labels = check_embeddings_and_labels("normalized_softmax_loss", embeddings, labels)
    weights = check_class_weights("normalized_softmax_loss", "weights", weights, embeddings)
    check_reduction("normalized_softmax_loss", reduction)
    return _cross_entropy(_cosines(embeddings, weights) / temperature, labels, reduction)


def arcface_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    weights: jax.typing.ArrayLike,
    *,
    margin: float = 0.5,
    scale: float = 64.0,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> jax.Array:
    r"""ArcFace: softmax on scaled cosines with an additive angular margin on the target.

    With :math:`\theta_{ic}` the angle between :math:`x_i` and :math:`w_c`, :math:`m` =
    ``margin`` (radians) and :math:`s` = ``scale``:

    .. math::
      \ell_i = -\log \frac{e^{s\,\psi(\theta_{i y_i})}}
                          {e^{s\,\psi(\theta_{i y_i})} + \sum_{c \ne y_i} e^{s \cos\theta_{ic}}},
      \qquad
      \psi(\theta) = \begin{cases} \cos(\theta + m) & \theta \le \pi - m \\
                                   \cos\theta - m \sin m & \text{otherwise,} \end{cases}

    averaged over the batch. The second branch keeps :math:`\psi` decreasing past
    :math:`\pi - m` (as the reference implementation and pytorch-metric-learning's
    ``ArcFaceLoss``, whose ``margin`` is in degrees: pass ``math.degrees(margin)`` there).
    :math:`\cos(\theta + m)` is computed as :math:`\cos\theta\cos m - \sin\theta \sin m` with
    :math:`\sin\theta = \sqrt{1 - \cos^2\theta}`, without ``arccos``, so the gradient stays
    finite (it is 0 at :math:`\cos\theta = \pm 1` exactly).

    Args:
      embeddings: embeddings ``[batch, dim]``.
      labels: integer class labels ``[batch]``, in ``[0, num_classes)``.
      weights: class weights ``[num_classes, dim]`` (a model parameter).
      margin: the additive angular margin :math:`m`, in radians (0.5 ≈ 28.6°).
      scale: the logit scale :math:`s`.
      reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"``: per-example
        ``[batch]``.

    Returns:
      The scalar loss ``[]`` (``[batch]`` with ``reduction="none"``).

    Raises:
      ValueError: for embeddings that are not ``[batch, dim]``, labels that are not integer
        ``[batch]``, weights that are not ``[num_classes, dim]``, or an unknown
        ``reduction``.

    Example:
      >>> import math
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0, 0.0]])
      >>> weights = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> # theta = 0 for the target, so psi = cos(m); the other cosine is 0.
      >>> loss = arcface_loss(x, jnp.array([0]), weights, margin=0.5, scale=1.0)
      >>> round(float(loss), 6) == round(math.log(1 + math.exp(-math.cos(0.5))), 6)
      True

    References:
      Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face
      Recognition", CVPR 2019, arXiv:1801.07698.
    """
    embeddings, labels = check_embeddings_and_labels("arcface_loss", embeddings, labels)
    weights = check_class_weights("arcface_loss", "weights", weights, embeddings)
    check_reduction("arcface_loss", reduction)
    cosines = jnp.clip(_cosines(embeddings, weights), -1.0, 1.0)
    target = jax.nn.one_hot(labels, weights.shape[0], dtype=bool)
    target_cos = jnp.sum(jnp.where(target, cosines, 0.0), axis=1)
    target_sin = safe_sqrt(1.0 - target_cos * target_cos)
    cos_plus_margin = target_cos * math.cos(margin) - target_sin * math.sin(margin)
    # theta <= pi - m  <=>  cos(theta) >= cos(pi - m) = -cos(m)
    target_logit = jnp.where(
        target_cos >= -math.cos(margin),
        cos_plus_margin,
        target_cos - margin * math.sin(margin),
    )
    logits = jnp.where(target, target_logit[:, None], cosines)
    return _cross_entropy(scale * logits, labels, reduction)
