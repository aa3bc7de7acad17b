"""A training command's processes (under torchrun or accelerate launch, or one alone): the defaults that depend on
the machine, the end of a run, and which process reports."""

from __future__ import annotations

from typing import Any


def machine_defaults() -> dict[str, Any]:
    """TrainingArguments defaults for this machine, below the command's own defaults, YAML and flags.

    Pinned host memory only helps copies to a GPU; without one torch warns on every run."""
    import torch

    return {"dataloader_pin_memory": torch.cuda.is_available()}


def end_process_group() -> None:
    """Every process waits for the main one's final writes, then all tear the process group down together.

    Left to interpreter exit, the processes other than the main one leave right after the final save while the main
    one still writes; once in CI (tests/test_distributed.py, accelerate launch, a loaded machine) a complete
    2-process run ended with the second process aborted (SIGABRT) by the launcher's report: gloo's teardown racing
    with a peer is the suspected cause. PyTorch asks for destroy_process_group before exit anyway."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Whether this is the process that reports (the only one, or the main one of several): a run's summary is said
    once, not once per process."""
    from accelerate import PartialState

    return PartialState().is_main_process
