"""Output directories as contracts: written beside the target, moved into place when complete, each with a
manifest.json saying which command and version wrote it, from what inputs, with what configuration.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from glmtune import __version__
from glmtune.errors import UserError

MANIFEST = "manifest.json"


def check_writable_output(path: Path, overwrite: bool, flag: str = "--overwrite_output_dir") -> None:
    """Refuse to replace a non-empty file or directory the user already has, unless told to."""
    if not path.exists():
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    if not overwrite:
        raise UserError(f"output {path} already exists and is not empty",
                        hint=f"choose another path, or pass {flag} to replace it")


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it replaces `target`, on failure it is removed.

    An interrupted run never leaves a half-written directory that looks complete.
    """
    check_writable_output(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(target)


@contextlib.contextmanager
def atomic_file(target: Path, overwrite: bool) -> Iterator[Path]:
    """Like atomic_directory, for one file."""
    check_writable_output(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(target)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_manifest(directory: Path, command: str, config: dict[str, Any], **fields: Any) -> Path:
    manifest = {
        "command": command,
        "glmtune_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "config": config,
        **fields,
    }
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_manifest(directory: Path, expected_command: str, what: str) -> dict[str, Any]:
    """Read the manifest of a directory a previous stage wrote; refuse anything else with a clear message."""
    path = directory / MANIFEST
    if not directory.exists():
        raise UserError(f"{what} {directory} does not exist")
    if not path.is_file():
        raise UserError(f"{directory} is not a {what}: it has no {MANIFEST}",
                        hint=f"make one with `glmtune {expected_command}`")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("command") != expected_command:
        raise UserError(f"{directory} was written by `glmtune {manifest.get('command')}`, "
                        f"not by `glmtune {expected_command}`", hint=f"pass a {what}")
    return manifest
