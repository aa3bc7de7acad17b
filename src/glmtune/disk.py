"""A full disk as one clear message: which output, where, how much it needed and how much is free; never a library's
traceback and never a half-written output left behind.

The gap this fills: each library reports a full disk its own way. Python and `datasets` raise OSError(ENOSPC);
safetensors a SafetensorError whose text ends "(os error 28)"; torch.save's C++ writer a RuntimeError ("unexpected
pos", "file write failed") that has lost the errno. `is_disk_full` recognises all three, `reporting_full_disk` turns
them into DiskFull around a write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from glmtune.errors import UserError

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
FULL_TEXTS = ("no space left on device", "disk quota exceeded",
              *(f"os error {code}" for code in sorted(FULL_ERRNOS)))  # Rust's io::Error, as safetensors shows it
TORCH_WRITER_TEXTS = ("pytorchstreamwriter failed", "file write failed", "unexpected pos")
# torch's writer does not say why it failed: it counts as a full disk only when the filesystem is (almost) full
# (see _nearly_full).
NEARLY_FULL_BYTES = 64 << 20


class DiskFull(UserError):
    """A write ran out of space (or quota): not a mistake in the command, so exit code 1 rather than 2."""

    exit_code = 1


def is_disk_full(error: BaseException, path: Path) -> bool:
    """Whether `error` (or an error it was raised from) says the filesystem holding `path` ran out of space."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in FULL_ERRNOS:
            return True
        text = str(current).lower()
        if any(t in text for t in FULL_TEXTS):
            return True
        if isinstance(current, RuntimeError) and any(t in text for t in TORCH_WRITER_TEXTS):
            return _nearly_full(path)
        current = current.__cause__ or current.__context__
    return False


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the filesystem of `path` (or of its nearest existing parent)."""
    usage = _usage(path)
    return usage.free if usage is not None else None


def _nearly_full(path: Path) -> bool:
    """Less free than the smaller of NEARLY_FULL_BYTES and a twentieth of the filesystem (a small one, in tests)."""
    usage = _usage(path)
    return usage is not None and usage.free < min(NEARLY_FULL_BYTES, usage.total // 20)


def _usage(path: Path) -> Any:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path)
    except OSError:
        return None


def size_on_disk(path: Path) -> int:
    """Bytes in the files under `path` (a file or a directory); 0 when it is gone."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).lstat().st_size
    return total


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """What these tensors take in a safetensors or torch.save file: the lower bound of a model's or optimizer's."""
    return sum(t.numel() * t.element_size() for t in tensors)


def human_bytes(count: int) -> str:
    """1536 -> "1.5 KiB": the units of `df -h` and `du -h`."""
    if count < 1024:
        return f"{count} B"
    size, units = count / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while size >= 1024 and len(units) > 1:
        size, units = size / 1024, units[1:]
    return f"{size:.1f} {units[0]}"


def remove_partial(path: Path) -> int:
    """Remove a half-written file or directory; returns how many bytes it held."""
    written = size_on_disk(path) if path.exists() else 0
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    return written


def full_disk_error(path: Path, what: str, needed: int | None = None, written: int | None = None,
                    hint: str | None = None, cause: BaseException | None = None) -> DiskFull:
    """The message for a write of `what` to `path` that ran out of space, once any partial output is gone (so that
    the free space it gives is what the user has to work with).

    Args:
        needed: the bytes the output needs, where known beforehand (at least its weights).
        written: the bytes written before the disk filled (and since removed).
        cause: the library's error, quoted so that a disk-full guess (torch's writer) can be checked.
    """
    facts = []
    if needed:
        facts.append(f"it needs at least {human_bytes(needed)}")
    if written:
        facts.append(f"{human_bytes(written)} was written before the disk filled, and removed")
    free = free_bytes(path)
    if free is not None:
        facts.append(f"{human_bytes(free)} free there now")
    reason = "the disk quota is exceeded" if _is_quota(cause) else "no space left on the device"
    message = f"{reason} while writing {what} to {path}" + (f": {'; '.join(facts)}" if facts else "")
    return DiskFull(message, hint=hint or "free space on that filesystem (`df -h` shows it), or write elsewhere",
                    problems=_detail(cause))


def unreported_full_disk(error: OSError) -> DiskFull:
    """A full disk that no write reported itself (those name what they were writing): the file, where the error
    names it (a failed write() does not), else only that the disk is full."""
    if error.filename:
        return full_disk_error(Path(error.filename), "a file", cause=error)
    return DiskFull(f"{'the disk quota is exceeded' if _is_quota(error) else 'no space left on the device'} while "
                    "writing a file (the library did not say which)",
                    hint="free space on the filesystem you write to (`df -h` shows it), or write elsewhere")


def _detail(error: BaseException | None) -> list[str]:
    """The file whose write failed, where the error names it; else torch's own words, since a full disk is inferred
    from them."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS and e.filename:
            return [f"the write that failed: {e.filename}"]
    if chain and not any(isinstance(e, OSError) for e in chain) and isinstance(chain[0], RuntimeError):
        return [f"torch said: {' '.join(str(chain[0]).split())[:200]}"]
    return []


def _is_quota(error: BaseException | None) -> bool:
    while error is not None:
        if (isinstance(error, OSError) and error.errno == errno.EDQUOT) or "quota" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def reporting_full_disk(path: Path, what: str, needed: int | None = None, partial: Path | None = None,
                        hint: str | None = None) -> Iterator[None]:
    """Around the writing of `what` to `path`: a full disk becomes DiskFull, after `partial` (the half-written file
    or directory, if any) is removed. Any other error passes through as it is.

    Raises:
        DiskFull: the filesystem (or the user's quota) ran out of space.
    """
    try:
        yield
    except Exception as e:
        if isinstance(e, UserError) or not is_disk_full(e, path):
            raise
        written = remove_partial(partial) if partial is not None else None
        raise full_disk_error(path, what, needed, written, hint, cause=e) from e
