"""Losses for deep metric learning, optax style: arrays first, hyperparameters keyword-only."""
