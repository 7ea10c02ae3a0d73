"""Piecewise-linear manifolds (Bhatnagar & Ahuja, CPAL 2024) as a label-free training method.

State: a momentum (EMA) copy of the network's parameters, the training set embedded with
that copy at the last refresh, its nearest-neighbour table and one linear piece per point
(:mod:`magnet_jax.manifolds`). Refresh: embed the training set with the momentum copy,
rebuild the table, refit the pieces. Step: draw ``M`` random anchors each with its
``D - 1`` nearest neighbours, score the batch with the PLM loss
(:mod:`magnet_jax.losses.plm`) against targets computed from the momentum embeddings and
pieces, then move the momentum copy towards the updated parameters. The ``N_ρ`` proxies
are the method's own parameters (``params["method"]["proxies"]``), trained with the model.
No label is ever read: the trainer hands this method no labels.

Choices the paper leaves open (besides those documented in :mod:`magnet_jax.manifolds`
and :mod:`magnet_jax.losses.plm`):

- the targets of a batch come from the momentum embeddings *stored at the last refresh*
  (the ones the pieces were fitted to), not from a second forward pass of the momentum
  network on the batch: the pieces and the points they are measured from are then the
  same snapshot, and a step costs one forward pass, not two;
- the momentum copy starts as the network's parameters at the first refresh;
- the proxies start as standard normal points scaled to the embedding's unit sphere
  radius (``1/√d`` per coordinate), i.e. on the scale of L2-normalised embeddings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax import manifolds
from magnet_jax.losses import plm as plm_losses
from magnet_jax.methods.base import DataInfo, Embed, Method, TrainingData

_METHOD_PARAMS = "method"  # the run's key of a method's own parameters


class PLMState(NamedTuple):
    """The PLM method's state (replicated; checkpointed whole).

    Attributes:
        ema: the momentum copy of the model's parameters (the model's part of the run's
            parameters, same structure).
        embeddings: [N, d] the training set embedded with ``ema`` at the last refresh.
        neighbours: [N, k] int32 nearest neighbours of every point, itself excluded.
        pieces: the :class:`~magnet_jax.manifolds.LinearPieces` fitted to ``embeddings``.
    """

    ema: Any
    embeddings: jax.Array
    neighbours: jax.Array
    pieces: manifolds.LinearPieces


class PLMBatch(NamedTuple):
    """A batch and the momentum model's view of it (constants of the loss).

    Attributes:
        indices: [B] int32 training-set rows, anchor by anchor, each followed by its
            ``D - 1`` nearest neighbours.
        targets: [B, d] stored momentum embeddings of the rows.
        bases: [B, d, r] their pieces' bases.
        scales: [B] their pieces' length scales.
        neighbour_embeddings: [B, k, d] momentum embeddings of each row's table neighbours.
        neighbour_mask: [B, k] bool, which of them are members of the row's piece.
    """

    indices: jax.Array
    targets: jax.Array
    bases: jax.Array
    scales: jax.Array
    neighbour_embeddings: jax.Array
    neighbour_mask: jax.Array


class PLMStats(NamedTuple):
    """The step's loss terms, all scalars []."""

    point: jax.Array
    proxy: jax.Array
    neighbourhood: jax.Array


def _model_part(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != _METHOD_PARAMS}


@dataclasses.dataclass(frozen=True)
class PLM(Method):
    """Unsupervised metric learning with piecewise-linear manifolds.

    Attributes:
        anchors_per_batch: M random anchors per batch.
        neighbours_per_anchor: D − 1 nearest neighbours drawn with each anchor
            (``batch_size = M · D``).
        num_neighbours: k, the neighbour table's width: the largest neighbourhood a piece
            may grow to is k + 1 points, and the neighbourhood term sees the k neighbours.
        max_rank: the largest dimension of a piece.
        error_threshold: τ, the relative reconstruction error a piece may have.
        subset_selection: grow each neighbourhood while it stays linear (False: the
            paper's ablation, all k + 1 points).
        similarity: ``"continuous"``, ``"binary"`` or ``"orthogonal_only"`` (ablations).
        orthogonal_exponent: N_α, the decay away from a piece.
        inplane_exponent: N_β, the decay along a piece.
        num_proxies: N_ρ learnable proxies (0: no proxy term).
        delta: δ, the distance of fully dissimilar points.
        proxy_weight, neighbourhood_weight: weights of the proxy and neighbourhood terms.
        momentum: of the EMA copy, per step.
    """

    name = "plm"
    needs_labels = False
    has_refresh = True

    anchors_per_batch: int = 8
    neighbours_per_anchor: int = 7
    num_neighbours: int = 16
    max_rank: int = 4
    error_threshold: float = 0.2
    subset_selection: bool = True
    similarity: str = "continuous"
    orthogonal_exponent: float = 3.0
    inplane_exponent: float = 0.5
    num_proxies: int = 100
    delta: float = 1.0
    proxy_weight: float = 1.0
    neighbourhood_weight: float = 1.0
    momentum: float = 0.99

    # -- set-up ----------------------------------------------------------------------

    def check_data(self, info: DataInfo) -> None:
        if self.num_neighbours > info.num_examples - 1:
            raise ValueError(
                f"--plm-neighbours k={self.num_neighbours} needs more than k training "
                f"examples; the training set has {info.num_examples}: choose k <= "
                f"{info.num_examples - 1}"
            )
        if self.neighbours_per_anchor > self.num_neighbours:
            raise ValueError(
                f"--examples-per-cluster D={self.neighbours_per_anchor + 1} draws D-1 = "
                f"{self.neighbours_per_anchor} neighbours with every anchor, more than the "
                f"--plm-neighbours k={self.num_neighbours} in the table; raise k or lower D"
            )
        if self.max_rank > min(self.num_neighbours, info.embedding_dim):
            raise ValueError(
                f"--plm-max-rank {self.max_rank} must be <= min(--plm-neighbours, "
                f"--embedding-dim) = {min(self.num_neighbours, info.embedding_dim)}"
            )

    def init_params(self, key: jax.Array, info: DataInfo) -> dict:
        if self.num_proxies == 0:
            return {}
        scale = 1.0 / np.sqrt(info.embedding_dim)
        proxies = scale * jax.random.normal(key, (self.num_proxies, info.embedding_dim))
        return {"proxies": proxies}

    def init_state(self, info: DataInfo) -> Any:
        # Built by the first refresh, which the trainer runs before any step.
        return None

    def abstract_state(self, info: DataInfo) -> Any:
        if info.model_params is None:
            raise ValueError(
                "--loss plm: the momentum copy's structure needs DataInfo.model_params "
                "(set by magnet_jax.training.prepare)"
            )
        num, dim = info.num_examples, info.embedding_dim
        embeddings = jax.ShapeDtypeStruct((num, dim), jnp.float32)
        neighbours = jax.ShapeDtypeStruct((num, self.num_neighbours), jnp.int32)
        pieces = jax.eval_shape(self._fit, embeddings, neighbours)
        ema = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), info.model_params)
        return PLMState(ema, embeddings, neighbours, pieces)

    def _fit(self, embeddings, neighbours) -> manifolds.LinearPieces:
        return manifolds.fit_linear_pieces(
            embeddings,
            neighbours,
            max_rank=self.max_rank,
            error_threshold=self.error_threshold,
            subset_selection=self.subset_selection,
        )

    # -- refresh -----------------------------------------------------------------------

    def refresh(
        self,
        state: Any,
        *,
        embed: Embed,
        params: Any,
        data: TrainingData,
        key: jax.Array,
        diagnostics: bool = False,
    ) -> tuple[Any, dict]:
        # A fresh copy: the step donates the method state, the run's parameters too.
        ema = jax.tree.map(jnp.copy, _model_part(params)) if state is None else state.ema
        embeddings = embed(ema, data.x)
        neighbours = manifolds.neighbour_table(embeddings, num_neighbours=self.num_neighbours)
        pieces = self._fit(embeddings, neighbours)
        new = PLMState(ema, embeddings, neighbours, pieces)
        if not diagnostics:
            return new, {}
        report = {
            "piece_size": float(jnp.mean(pieces.sizes)),
            "piece_rank": float(jnp.mean(pieces.ranks)),
            "piece_error": float(jnp.mean(pieces.errors)),
        }
        return new, report

    # -- step --------------------------------------------------------------------------

    def sample(self, state: PLMState, key: jax.Array, data: TrainingData) -> PLMBatch:
        indices = manifolds.sample_anchor_batch(
            state.neighbours,
            key,
            num_anchors=self.anchors_per_batch,
            neighbours_per_anchor=self.neighbours_per_anchor,
        )
        table = state.neighbours[indices]  # [B, k]
        return PLMBatch(
            indices=indices,
            targets=state.embeddings[indices],
            bases=state.pieces.bases[indices],
            scales=state.pieces.radii[indices],
            neighbour_embeddings=state.embeddings[table],
            neighbour_mask=manifolds.piece_members(state.pieces, state.neighbours)[indices],
        )

    def loss(self, model, params, embeddings, batch: PLMBatch):
        proxies = params[_METHOD_PARAMS]["proxies"] if self.num_proxies else None
        targets = plm_losses.plm_targets(
            batch.targets,
            batch.bases,
            batch.scales,
            proxies=proxies,
            neighbour_embeddings=batch.neighbour_embeddings,
            orthogonal_exponent=self.orthogonal_exponent,
            inplane_exponent=self.inplane_exponent,
            mode=self.similarity,
        )
        terms = plm_losses.plm_loss(
            embeddings,
            targets,
            proxies=proxies,
            neighbour_embeddings=batch.neighbour_embeddings,
            neighbour_mask=batch.neighbour_mask,
            delta=self.delta,
            proxy_weight=self.proxy_weight,
            neighbourhood_weight=self.neighbourhood_weight,
        )
        return terms.loss, PLMStats(terms.point, terms.proxy, terms.neighbourhood)

    def update(self, state: PLMState, batch, stats, params) -> PLMState:
        return state._replace(ema=_ema(state.ema, _model_part(params), self.momentum))


def _ema(ema, params, momentum: float):
    """``ema + (1 − momentum)(params − ema)`` on float leaves, ``params`` on the others.

    The same average as :func:`magnet_jax.manifolds.ema_update`, written so that a leaf
    the optimizer never changes (a frozen stage, the batch-norm statistics) stays exactly
    equal to the network's: ``m·e + (1 − m)·e`` is off by rounding.
    """

    def one(e, p):
        if not jnp.issubdtype(e.dtype, jnp.floating):
            return p
        return (e + (1.0 - momentum) * (p - e)).astype(e.dtype)

    return jax.tree.map(one, ema, params)
