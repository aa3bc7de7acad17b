"""The end of a run under torchrun or accelerate launch."""

from __future__ import annotations


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
