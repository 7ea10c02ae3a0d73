"""The names the command line accepts, each list defined once (imports no JAX).

:mod:`magnet_jax.config` validates against these lists and the command derives its help
from them; the modules that implement the names (:mod:`magnet_jax.methods`,
:mod:`magnet_jax.clustering`, :mod:`magnet_jax.losses.triplet`) import them too, and a
test checks that every name has exactly one implementation.
"""

from __future__ import annotations

# Training methods (``--loss``): the keys of magnet_jax.methods.METHODS.
LOSSES = (
    "magnet",
    "triplet",
    "contrastive",
    "multi_similarity",
    "proxy_nca",
    "normalized_softmax",
    "arcface",
    "softmax",
    "plm",
)

# Similarities of the piecewise-linear manifold model (``--plm-similarity``):
# magnet_jax.manifolds.piece_similarity's modes.
PLM_SIMILARITIES = ("continuous", "binary", "orthogonal_only")

# Clusterings of the Magnet index (``--clustering``): magnet_jax.clustering.CLUSTERERS.
CLUSTERINGS = ("kmeans", "agglomerative")

# Linkages of agglomerative clustering (``--linkage``).
LINKAGES = ("ward", "average", "single")

# Triplet minings (``--mining``): magnet_jax.losses.triplet.
MININGS = ("batch_all", "batch_hard", "semi_hard")

LR_SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adam", "sgd")
