"""Atomic writes and content-addressed stage directories.

Every file the suite writes goes through here, so that an interrupted run never leaves a
half-written file or cache entry behind: files are written to a temporary name in the same
folder, fsynced and renamed into place (and the folder fsynced, so the rename survives a power
cut); a stage directory is built under a temporary name, every file in it fsynced, and renamed
when complete, so its existence means it is finished. A stage counts as done only when its
manifest, holding the content hash of its files, is inside it (`verified_manifest`).

A writer killed outright (SIGKILL, power loss) cannot clean up: its temporary file or directory
stays, but the output never appears half-written. Temporary names hold the host and process of
their writer, and the next write of the same output removes those whose process on this host is
gone.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    from bench.killpoints import checkpoint, stage_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_folder(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_builder()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        checkpoint("write", stage_path(path))
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write() names no file: name it
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise
    _fsync_dir(path.parent)  # the rename itself survives a power cut only once its folder is synced


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under root to disk: libraries (save_pretrained, safetensors)
    write a stage's files without fsync, and the stage's rename must not reach the disk before them."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: Path | str, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextlib.contextmanager
def building_dir(final: Path | str) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_dead_builders(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{_builder()}.", suffix=".tmp"))
    try:
        yield tmp
        if final.exists():  # another process finished the same content first; keep theirs
            shutil.rmtree(tmp)
        else:
            from bench.killpoints import checkpoint

            _fsync_tree(tmp)
            checkpoint("stage", final.name)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _builder() -> str:
    return f"{socket.gethostname()}.{os.getpid()}"


def sweep_dead_builders(final: Path) -> list[Path]:
    """Remove the temporary files or directories of `final` left by writers on this host that no
    longer run (killed before they could clean up); returns what was removed. Writers on other
    hosts sharing the folder are left alone: their processes cannot be seen from here."""
    host = socket.gethostname()
    removed = []
    for tmp in final.parent.glob(f".{glob.escape(final.name)}.{glob.escape(host)}.*.tmp"):
        pid = tmp.name[len(f".{final.name}.{host}.") :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


_swept: set[Path] = set()


def _sweep_folder(folder: Path) -> None:
    """Remove the temporary files that killed writers on this host left in `folder`, the first time
    this process writes there (once, not per write: a records folder holds thousands of files)."""
    if folder in _swept:
        return
    _swept.add(folder)
    host = socket.gethostname()
    for tmp in folder.glob(f".*.{glob.escape(host)}.*.tmp"):
        pid = tmp.name.rsplit(f".{host}.", 1)[-1].split(".", 1)[0]
        if tmp.is_file() and pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def cached_dir(final: Path | str, build: Callable[[Path], None]) -> Path:
    """Return `final`, building it with `build(tmpdir)` first if it does not exist yet."""
    final = Path(final)
    if not final.exists():
        with building_dir(final) as tmp:
            build(tmp)
    return final


def replace_dir(final: Path | str, build: Callable[[Path], None]) -> Path:
    """Build a folder under a temporary name and swap it in for `final` (which may exist): readers see
    the old folder or the new one, never a half-written one. A kill between the two renames leaves
    `final` absent and the old folder aside (`.NAME.*.stale`), never a mix."""
    final = Path(final)
    new = final.parent / f".{final.name}.new"
    discard(new)  # left by a swap that was killed between its renames
    with building_dir(new) as tmp:
        build(tmp)
    discard(final)
    os.replace(new, final)
    _fsync_dir(final.parent)
    return final


def discard(path: Path | str) -> None:
    """Remove a finished stage directory: renamed aside first, so that no reader ever sees it half-deleted."""
    path = Path(path)
    if not path.exists():
        return
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".stale"))
    os.replace(path, aside / path.name)
    shutil.rmtree(aside, ignore_errors=True)


def verified_manifest(
    root: Path, content: Callable[[Path], Any], log: Callable[[str], None], name: str = "manifest.json"
) -> dict | None:
    """The manifest of the finished stage `root`, or None when the stage must be built (again).

    A cache key names the inputs; the manifest's `content_hash` names what was built from them. A
    stage whose files no longer hash to it (edited, or corrupt), whose manifest has none (made by
    older code, whose outputs for the same key may differ), or that has no manifest at all (deleted
    by hand, a copy of a cache cut short: a finished stage always has one, building_dir sees to it)
    is removed, and the reason said in one line. Left in place, a folder without its manifest made
    every later build of the stage throw its own result away (building_dir keeps what is there).
    """
    from bench.hashing import hash_value

    path = Path(root) / name
    if not Path(root).exists():
        return None
    if not path.exists():
        reason = f"has no {name} (a finished stage always has one)"
        log(f"{Path(root).name}: {reason}; rebuilding it")
        discard(root)
        return None
    manifest = json.loads(path.read_text())
    if "content_hash" not in manifest:
        reason = "made by older code (its manifest holds no content hash)"
    elif hash_value(content(Path(root))) != manifest["content_hash"]:
        reason = "its files no longer match the content hash in its manifest"
    else:
        return manifest
    log(f"{Path(root).name}: {reason}; rebuilding it")
    discard(root)
    return None


def check_can_create(folder: Path | str, fix: str) -> None:
    """Raise one line (UserError) unless `folder` exists writable or could be created; creates
    nothing, so that bad input leaves no trace. `fix` says which option to change."""
    from bench.errors import UserError

    folder = Path(folder).absolute()
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot create {folder}: {probe} is a file, not a folder; {fix}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {probe} (permission denied); {fix}")
