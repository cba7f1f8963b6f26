"""deepopt: deep / associative-memory optimizers as backend-agnostic specs (numpy only)."""
