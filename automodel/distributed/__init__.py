"""Multi-process training on torch.distributed: FSDP2, DDP and tensor parallel over a `dp x tp` device mesh.

- `launcher.py`: `automodel ... --nproc-per-node N` starts the workers through torchrun (imports no torch until then).
- `env.py`: a worker's rank, world size and device from torchrun's or srun's environment; the process group.
- `parallel.py`: the mesh and strategy, and what the recipe asks of them (wrapping, sums over ranks, gradient sync,
  gradient clipping over sharded and plain gradients).
- `fsdp2.py`, `ddp.py`, `tp.py`, `activation_checkpointing.py`: one way each of spreading or slimming the model.
"""
