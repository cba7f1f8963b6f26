"""Compile deepopt specs to optax.GradientTransformation."""
