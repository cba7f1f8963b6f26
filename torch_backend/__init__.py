"""Compile deepopt specs to torch.optim.Optimizer."""
