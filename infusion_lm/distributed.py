"""Running under ``accelerate launch``: one process group, rank 0 writes, every rank waits at stage boundaries.

Retraining runs on every rank (the HF Trainer distributes it). kronfluence distributes fitting and scoring only over
CUDA processes (its ``State`` ignores a CPU process group), so on GPUs fit and score run on every rank and on CPUs on
rank 0. The other stages (synthesize, measure, select, edit, evaluate) run on rank 0 while the rest wait, then read
its outputs. Every file is written by rank 0 only, so the run folder is the same as a single process would leave.
"""

from __future__ import annotations

import os

import torch.distributed as dist


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_if_launched() -> None:
    """Joins the process group accelerate set up the environment for (gloo on CPU, nccl on GPU)."""
    if launched() and not dist.is_initialized():
        from accelerate import PartialState

        PartialState()


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    return not distributed() or dist.get_rank() == 0


def barrier() -> None:
    if distributed():
        dist.barrier()


def kronfluence_distributed() -> bool:
    """Whether kronfluence itself sees the process group (it does only on CUDA)."""
    if not distributed():
        return False
    from kronfluence.utils.state import State

    return State().num_processes > 1


def runs_here(stage: str) -> bool:
    """Whether this rank runs ``stage``: every rank for what is distributed, rank 0 for the rest."""
    if stage == "retrain":
        return True
    if stage in ("fit", "score") and kronfluence_distributed():
        return True
    return is_main()
