"""dtrain: one command to launch PyTorch training recipes on CPUs, GPUs, nodes and SLURM."""

__version__ = "0.1.0"
