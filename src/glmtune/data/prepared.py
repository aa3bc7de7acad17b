"""A training command's --dataset_path: a directory `glmtune prepare` wrote, or a data file prepared here first.

Tokenizing happens once per run, not once per process: under torchrun / accelerate launch the main process
prepares the file (with prepare's own function and cache) while the other processes wait, then every process reads
the same directory. The result is a complete prepared dataset directory (manifest included) under prepare's cache,
HF_HOME/glmtune/prepare/datasets/, named by a hash of the data files, the model and the options.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from glmtune.arguments import ModelArguments, PrepareArguments, TokenizeArguments
from glmtune.artifacts import sha256_file, sha256_text
from glmtune.errors import UserError

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from transformers import TrainingArguments

# How long the other processes wait for the main one to tokenize. The Trainer's process group waits --ddp_timeout
# (30 minutes by default; on CPU accelerate does not even pass it on) before a process gives up, which a large
# file's tokenizing can exceed; the wait has its own group with this timeout instead. If the main process fails,
# the launcher (torchrun, accelerate launch) stops the waiting ones at once.
PREPARE_TIMEOUT = datetime.timedelta(hours=24)


def prepared_dataset_dir(dataset_path: str | None, model_name: str | None, training_args: TrainingArguments,
                         tokenize_args: TokenizeArguments | None = None, trust_remote_code: bool = False) -> Path:
    """The prepared dataset directory for --dataset_path, in every process of the run (a collective call: every
    process must make it).

    Args:
        dataset_path: a directory written by `glmtune prepare` (returned unchanged, and then `tokenize_args` must be
            left at their defaults: the directory's own options hold), or a data file in any format prepare reads.
        model_name: whose tokenizer and chat template tokenize a data file (required for one).
        training_args: which process prepares (`should_save`: the main process, or one per machine with
            --save_on_each_node, when machines don't share storage) and the seed of the validation split.
        tokenize_args: prepare's options for a data file (max_seq_length, truncation, format, val_size...).
        trust_remote_code: load the model's own tokenizer code.
    Raises:
        UserError: no dataset_path, a data file without model_name, tokenizing options given with a directory, or
            whatever prepare_dataset refuses in the file.
    """
    if not dataset_path:
        raise UserError("--dataset_path is required", hint="make one with `glmtune prepare`, or pass a data file")
    path = Path(dataset_path)
    tokenize_args = tokenize_args if tokenize_args is not None else TokenizeArguments()
    if not path.is_file():  # a prepared directory; one that isn't is refused by its reader, with the reason
        _refuse_tokenize_options(path, tokenize_args)
        return path
    if not model_name:
        raise UserError(f"--dataset_path {path} is a data file, and tokenizing it needs --model",
                        hint="pass --model MODEL (or prepare the file first with `glmtune prepare`)")
    options = {f.name: getattr(tokenize_args, f.name) for f in dataclasses.fields(TokenizeArguments)}
    prepare_args = PrepareArguments(data=[str(path)], seed=training_args.seed, use_cache=True,
                                    overwrite_output_dir=True, **options)
    from glmtune.data.prepare import default_cache_root, prepare_dataset

    key = sha256_text(json.dumps({"file": sha256_file(path), "model": model_name, "options": options,
                                  "seed": training_args.seed}, sort_keys=True, default=str))[:32]
    target = default_cache_root() / "datasets" / key
    prepare_args.save_path = str(target)
    with _others_wait():
        if training_args.should_save:
            # Always through prepare, even when `target` exists: prepare's own cache key covers the tokenizer and
            # the code, which the path above does not, and turns an identical earlier run into a copy.
            logger.info(f"preparing {path} for training (tokenized once, by this process; the others wait)")
            prepare_dataset(ModelArguments(model=model_name, trust_remote_code=trust_remote_code), prepare_args)
    return target


def _refuse_tokenize_options(path: Path, tokenize_args: TokenizeArguments) -> None:
    changed = [f"--{f.name}" for f in dataclasses.fields(TokenizeArguments)
               if getattr(tokenize_args, f.name) != f.default]
    if changed:
        raise UserError(f"{' '.join(changed)} {'apply' if len(changed) > 1 else 'applies'} to a data file, and "
                        f"--dataset_path {path} is not one: a prepared directory keeps the options it was "
                        "prepared with",
                        hint="leave them out, or prepare the data again with them (`glmtune prepare`), or pass the "
                             "data file as --dataset_path")


@contextlib.contextmanager
def _others_wait() -> Iterator[None]:
    """Like TrainingArguments.main_process_first, but waiting up to PREPARE_TIMEOUT rather than the process
    group's timeout."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        yield
        return
    # A gloo group can wait that long whatever the run's backend (NCCL included). Creating it is a collective call:
    # every process of the run must call prepared_dataset_dir.
    group = dist.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)
    yield  # an exception in the main process skips the barrier: it exits, and the launcher stops the others
    dist.barrier(group=group)
    dist.destroy_process_group(group)
