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
from glmtune.disk import reporting_full_disk
from glmtune.errors import UserError

MANIFEST = "manifest.json"
SECRET_FLAG_WORDS = ("token", "api_key", "password", "secret")


def check_writable_output(path: Path, overwrite: bool, kind: str = "directory",
                          inputs: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work is done, an output the command could not write or must not replace:
    a parent that is not a directory, a file where a directory goes (or the reverse), one of the inputs, the
    current directory or one above it, or anything non-empty without the overwrite flag."""
    flag = "--overwrite_output_dir"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: {parent} is a file, not a directory")
    if not path.exists() and not path.is_symlink():
        return
    resolved = path.resolve()
    if any(resolved == p.resolve() for p in inputs):
        raise UserError(f"the output {path} is also an input of this command", hint="choose another output path")
    if kind == "directory" and not path.is_dir():
        raise UserError(f"output {path} is a file, expected a directory", hint="choose another path")
    if kind == "file" and path.is_dir():
        raise UserError(f"output {path} is a directory, expected a file path", hint="choose another path")
    if path.is_dir() and not any(path.iterdir()):
        return
    if not overwrite:
        raise UserError(f"output {path} already exists and is not empty",
                        hint=f"choose another path, or pass {flag} to replace it")
    if path.is_dir() and _is_precious(resolved):
        raise UserError(f"output {path} is the current directory, one above it, or home: refusing to replace it",
                        hint="pass a dedicated directory")


def _is_precious(resolved: Path) -> bool:
    cwd = Path.cwd().resolve()
    return resolved in {cwd, *cwd.parents, Path.home().resolve()}


def empty_directory(path: Path) -> None:
    """Remove a directory the user allowed us to replace (check_writable_output has run)."""
    if path.is_symlink():
        path.unlink()
    elif path.is_dir():
        if _is_precious(path.resolve()):
            raise UserError(f"refusing to remove {path}: it is the current directory, one above it, or home")
        shutil.rmtree(path)


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool, inputs: tuple[Path, ...] = (), what: str = "the output",
                     needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it replaces `target`, on failure it is removed.

    An interrupted run never leaves a half-written directory that looks complete, and a full disk leaves `target`
    as it was.

    Args:
        what: what is being written, for the full-disk message ("the prepared dataset").
        needed: the bytes it needs, where known beforehand (its weights, its Arrow tables).
    Raises:
        DiskFull: the filesystem ran out of space (the temporary directory is gone by then).
    """
    check_writable_output(target, overwrite, "directory", inputs)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        with reporting_full_disk(target, what, needed, partial=tmp, hint=_unchanged_hint(target)):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            yield tmp
        if target.exists() or target.is_symlink():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            empty_directory(old)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: Path, overwrite: bool, inputs: tuple[Path, ...] = (),
                what: str = "the output") -> Iterator[Path]:
    """Like atomic_directory, for one file."""
    check_writable_output(target, overwrite, "file", inputs)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        with reporting_full_disk(target, what, partial=tmp, hint=_unchanged_hint(target)):
            target.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def _unchanged_hint(target: Path) -> str:
    kept = f"{target} is as it was" if target.exists() else f"nothing was left at {target}"
    return f"free space on that filesystem (`df -h` shows it), or write elsewhere; {kept}"


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
        "argv": redact_secrets(sys.argv),
        "config": config,
        **fields,
    }
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def redact_secrets(argv: list[str]) -> list[str]:
    """The command line with the values of token/key/password flags blanked (manifests get shared)."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        flag, has_value, _ = arg.partition("=")
        secret = flag.startswith("--") and any(word in flag for word in SECRET_FLAG_WORDS)
        out.append("***" if hide_next else f"{flag}=***" if secret and has_value else arg)
        hide_next = secret and not has_value
    return out


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is a UserError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the {what}: {e}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: the {what} should be a JSON object, found {type(value).__name__}")
    return value


def read_manifest(directory: Path, expected_command: str, what: str) -> dict[str, Any]:
    """Read the manifest of a directory a previous stage wrote; refuse anything else with a clear message."""
    path = directory / MANIFEST
    if not directory.exists():
        raise UserError(f"{what} {directory} does not exist")
    if not path.is_file():
        raise UserError(f"{directory} is not a {what}: it has no {MANIFEST}",
                        hint=f"make one with `glmtune {expected_command}`")
    manifest = read_json_object(path, "manifest")
    if manifest.get("command") != expected_command:
        raise UserError(f"{directory} was written by `glmtune {manifest.get('command')}`, "
                        f"not by `glmtune {expected_command}`", hint=f"pass a {what}")
    return manifest
