"""magnet-jax: deep metric learning with the Magnet Loss in JAX/Flax."""

__version__ = "0.1.0"
