"""The training app: one loop for both stages (loop.py), optimiser and schedule (optim.py),
checkpoints (checkpoint.py) and the only code that talks to torch.distributed (distributed.py)."""
