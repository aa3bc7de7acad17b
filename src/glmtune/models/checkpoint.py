"""Read a checkpoint directory's weights as they are published: safetensors or pickled `pytorch_model*.bin`,
one file or shards with an index. Pickles load with weights_only=True: a checkpoint can't run code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glmtune.errors import UserError

CANDIDATES = [("model.safetensors.index.json", "model.safetensors"),
              ("pytorch_model.bin.index.json", "pytorch_model.bin")]


def weight_files(directory: Path) -> list[Path]:
    for index_name, single_name in CANDIDATES:
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise UserError(f"{directory} is incomplete: {index_name} names shards that are missing",
                                problems=missing[:20], hint="download the whole checkpoint")
            return [directory / s for s in shards]
        if (directory / single_name).is_file():
            return [directory / single_name]
    raise UserError(f"{directory} has no weights (model.safetensors or pytorch_model.bin, with or without an index)")


def read_state_dict(directory: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for path in weight_files(directory):
        if path.suffix == ".safetensors":
            state.update(load_file(str(path)))
        else:
            try:
                state.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
            except Exception as e:  # an unpicklable object refused by weights_only, or a damaged file
                raise UserError(f"{path}: cannot load it as plain tensors ({e})") from None
    return state
