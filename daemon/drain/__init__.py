"""Drain back ends: the fleet's own engine (Slurm, Kubernetes) or the configured hooks, behind
one contract (backend.py). Nothing here judges health: the drain part decides, these act."""
