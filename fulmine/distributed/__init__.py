"""Many processes as one engine: tensor parallelism on torch.distributed."""
