"""Where a checkpoint lives on disk: which files are ours, staging, the atomic commit, recovery,
and reads confined to the checkpoint directory.

The rules (``docs/reliability.md``):

* **A user's files are never deleted.** The package only removes files it wrote: those listed in
  a checkpoint's description (``quantization_config.json``) and the description itself. Saving
  into an existing directory that is not one of our checkpoints and holds anything is refused
  unless the caller passes ``overwrite=True``; even then only the files named like ours are
  replaced and every other file is kept. Files a user adds to one of our checkpoints (a tokenizer,
  a README) survive every later save.
* **A save is atomic.** Everything is written into a staging directory next to the target (the
  files the user keeps are hard-linked into it), fsynced, and exchanged with the target in one
  ``renameat2(RENAME_EXCHANGE)`` (Linux; ``renamex_np(RENAME_SWAP)`` on macOS): there is no moment
  at which the path holds no checkpoint. Where the exchange is not available the old directory is
  renamed aside first; a crash between the two renames is repaired by the next save or load
  (:func:`recover`), which also removes what killed saves left behind.
* **Reads stay inside the directory.** Every file a checkpoint names is a plain name in the
  directory, and a symlink must resolve inside it (or, in a Hugging Face cache snapshot, into the
  repository's ``blobs/``).

Saves to one path from several processes or threads are serialized by an advisory lock on the
parent directory, held only while committing (``fcntl.flock``; no locking where it does not exist).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import secrets
import stat
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import UnsafePathError

__all__ = [
    "DESCRIPTION_NAME",
    "WRITTEN_NAME_PATTERN",
    "StagedDirectory",
    "StagedFile",
    "check_save_target",
    "confined_file",
    "describes_our_checkpoint",
    "owned_files",
    "recover",
]

logger = logging.getLogger(__name__)

#: The description file; its presence makes a directory one of our checkpoints.
DESCRIPTION_NAME = "quantization_config.json"
#: Names this package writes into a checkpoint directory.
WRITTEN_NAME_PATTERN = re.compile(
    r"^(model\.safetensors|model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json|config\.json|"
    r"quantization_map\.json|non_persistent_buffers\.safetensors|" + re.escape(DESCRIPTION_NAME) + r")$")
_STAGING = ".qw-staging-"
_OLD = ".qw-old-"
_LOCK_NAME = ".qw-save.lock"
_thread_lock = threading.RLock()  # flock is per open file; threads of one process share this too


# ------------------------------------------------------------------------------------ ownership
def _our_description(directory: Path) -> dict | None:
    """The description of ``directory`` if it is one this package wrote (a JSON object with
    ``"format": "quantization-wrapper"`` and a ``files`` table), else None: a file of that name
    from another tool, or damaged, makes nothing ours."""
    desc = directory / DESCRIPTION_NAME
    if desc.is_symlink() or not desc.is_file():
        return None
    try:
        info = json.loads(desc.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("format") != "quantization-wrapper" or \
            not isinstance(info.get("files"), dict):
        return None
    return info


def describes_our_checkpoint(directory: Path) -> bool:
    return _our_description(directory) is not None


def owned_files(directory: Path) -> set[str]:
    """Names of the files the package wrote in ``directory``: its description and the files the
    description lists that still have their recorded size (a file replaced since is not ours)."""
    info = _our_description(directory)
    if info is None:
        return set()
    owned = {DESCRIPTION_NAME}
    for name, record in info["files"].items():
        if not isinstance(name, str) or not _plain_name(name) or not isinstance(record, dict):
            continue
        try:
            st = os.lstat(directory / name)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size == record.get("size"):
            owned.add(name)
    return owned


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _listing(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except FileNotFoundError:
        return []


def _source_dirs(model: Any) -> list[Path]:
    """Directories ``model`` was read from (weights that a save there would replace)."""
    out = []
    for value in (getattr(model, "_qw_source_dir", None),
                  getattr(getattr(model, "config", None), "_name_or_path", None)):
        if value and isinstance(value, (str, os.PathLike)) and Path(value).is_dir():
            out.append(Path(value).resolve())
    return out


def check_save_target(path: Path, *, overwrite: bool, model: Any = None, single_file: bool = False) -> None:
    """Refuse a save that could destroy what the package did not write, before any work is done.

    Raises:
        FileExistsError: ``path`` is a non-empty directory (or a file) that is not one of our
            checkpoints and ``overwrite`` is False.
        ValueError: ``path`` is the directory the model's weights were read from, the current
            working directory or one that contains it, or a file where a directory is needed
            (and the other way round).
    """
    resolved = path.resolve()
    for source in _source_dirs(model) if model is not None else []:
        if resolved == source or (single_file and resolved.parent == source):
            raise ValueError(f"{path} is the checkpoint directory the model was read from ({source}); saving "
                             f"there would replace the source weights. Save to another directory")
    if single_file:
        if resolved.is_dir():
            raise ValueError(f"{path} is a directory; single_file=True writes one .safetensors file")
        if resolved.exists() and not overwrite and not _is_our_single_file(resolved):
            raise FileExistsError(f"{path} exists and was not written by quantization-wrapper; pass "
                                  f"overwrite=True to replace it, or choose another path")
        return
    if resolved.exists() and not resolved.is_dir():
        raise ValueError(f"{path} exists and is not a directory; a checkpoint is a directory (or pass "
                         f"single_file=True with a path ending in .safetensors)")
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ValueError(f"{path} is the current working directory or contains it; the atomic replace of a "
                         f"checkpoint would move the directory from under this process. Save into a "
                         f"subdirectory, e.g. {Path(path) / 'checkpoint'}")
    if resolved.is_dir() and not overwrite:
        foreign = _foreign(resolved)
        if foreign:
            kind = "a quantization-wrapper checkpoint with files of other origin that the save would replace" \
                if describes_our_checkpoint(resolved) else "not empty and not a quantization-wrapper checkpoint"
            raise FileExistsError(
                f"{path} is {kind} (it holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}); "
                f"pass overwrite=True (--overwrite) to write the checkpoint into it (files named like the "
                f"checkpoint's are replaced, all others are kept), or choose another path")


def _foreign(directory: Path, written: Iterable[str] | None = None) -> list[str]:
    """Entries of ``directory`` that block a save without ``overwrite``: all of them when it is not
    our checkpoint; in one of ours, the files of other origin that carry a name the save writes."""
    names = [n for n in _listing(directory) if n != _LOCK_NAME]
    if not describes_our_checkpoint(directory):
        return names
    owned = owned_files(directory)
    if written is None:
        return [n for n in names if n not in owned and WRITTEN_NAME_PATTERN.match(n)]
    written = set(written)
    return [n for n in names if n not in owned and n in written]


def _is_our_single_file(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return "quantization_wrapper" in (f.metadata() or {})
    except Exception:  # not a safetensors file at all (safetensors raises its own error type)
        return False


# ---------------------------------------------------------------------------------------- locks
try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def _parent_lock(parent: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``parent`` (a directory fd) for commits and recovery."""
    with _thread_lock:
        if fcntl is None:
            yield
            return
        try:
            fd = os.open(parent, os.O_RDONLY)
        except OSError:
            yield  # cannot open the directory for reading: nothing to lock against
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive lock on ``path``, or None if another process holds it."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


# ------------------------------------------------------------------------------------ exchange
def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically; False where the system cannot."""
    if sys.platform.startswith("linux"):
        libc = _libc()
        fn = getattr(libc, "renameat2", None) if libc is not None else None
        if fn is None:
            return False
        AT_FDCWD, RENAME_EXCHANGE = -100, 2
        if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
            return False  # the file system cannot exchange: rename aside instead
        raise OSError(err, os.strerror(err), str(b))
    if sys.platform == "darwin":
        libc = _libc()
        fn = getattr(libc, "renamex_np", None) if libc is not None else None
        if fn is None:
            return False
        RENAME_SWAP = 0x2
        if fn(os.fsencode(a), os.fsencode(b), RENAME_SWAP) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOTSUP):
            return False
        raise OSError(err, os.strerror(err), str(b))
    return False


_LIBC: list[Any] = []


def _libc() -> Any:
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:  # pragma: no cover
            _LIBC.append(None)
    return _LIBC[0]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ safe removal
def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _remove_ours(leftover: Path, live: Path | None, ours: set[str], pattern_ours: bool) -> list[str]:
    """Delete from ``leftover`` what the package put there: hard links of the files ``live`` keeps,
    the names in ``ours`` and, for a staging directory, names the package writes. Returns what
    was left (files of other origin); ``leftover`` itself is removed when it ends up empty."""
    kept: list[str] = []

    def walk(directory: Path, rel: str) -> None:
        for name in _listing(directory):
            item = directory / name
            sub = f"{rel}{name}"
            try:
                st = os.lstat(item)
            except FileNotFoundError:
                continue
            twin = None
            if live is not None:
                try:
                    twin = os.lstat(live / sub)
                except OSError:
                    twin = None
            if stat.S_ISDIR(st.st_mode):
                walk(item, sub + "/")
                with contextlib.suppress(OSError):
                    item.rmdir()
                if item.exists():
                    kept.append(sub + "/")
                continue
            is_link_copy = twin is not None and (
                _same_file(st, twin) if not stat.S_ISLNK(st.st_mode)
                else stat.S_ISLNK(twin.st_mode) and os.readlink(item) == os.readlink(live / sub))
            if is_link_copy or (not rel and (name in ours or name == _LOCK_NAME
                                              or (pattern_ours and WRITTEN_NAME_PATTERN.match(name)))):
                item.unlink()
            else:
                kept.append(sub)

    walk(leftover, "")
    with contextlib.suppress(OSError):
        leftover.rmdir()
    return kept


def _sibling_leftovers(path: Path) -> tuple[list[Path], list[Path]]:
    """Staging and renamed-aside directories that saves left next to ``path`` (ours by name:
    ``.NAME.qw-staging-*``, ``.NAME.qw-old-*``, and ``.NAME.old-PID`` of versions before them)."""
    staging, old = [], []
    prefix = f".{path.name}"
    for name in _listing(path.parent):
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        full = path.parent / name
        if rest.startswith(_STAGING) and full.is_dir():
            staging.append(full)
        elif (rest.startswith(_OLD) or re.fullmatch(r"\.old-\d+", rest)) and full.is_dir():
            old.append(full)
    return staging, old


def recover(path: str | os.PathLike) -> list[str]:
    """Repair what an interrupted save left next to ``path``; returns what was done, in words.

    * ``path`` missing and the previous directory renamed aside (a crash between the two renames
      of the fallback commit): the newest one is renamed back, whatever it holds (it was at
      ``path`` before the save).
    * Staging directories of saves that died (their lock is free, or gone after the exchange) and
      renamed-aside copies of a replaced checkpoint are removed, file by file: only what the
      package wrote, plus the hard links of files the live directory keeps. Anything else stays,
      with a warning. Where advisory locks do not exist (Windows), staging directories are left.

    Safe to call at any time, from any process: it runs under the same lock as commits. Errors
    (a read-only parent) are logged, not raised.
    """
    path = Path(os.path.abspath(path))
    done: list[str] = []
    if not path.name or not path.parent.is_dir():
        return done
    if not any(_sibling_leftovers(path)):
        return done

    def clean(leftover: Path, pattern_ours: bool) -> None:
        kept = _remove_ours(leftover, path if path.is_dir() else None, owned_files(leftover), pattern_ours)
        done.append(f"removed {leftover.name}" if not kept else f"kept {leftover.name} ({len(kept)} foreign files)")
        if kept:
            warnings.warn(f"{leftover} (left by an interrupted save) holds files quantization-wrapper did not "
                          f"write; left in place: {kept[:5]}", stacklevel=3)

    try:
        with _parent_lock(path.parent):
            staging, old = _sibling_leftovers(path)
            # Newest first: if several saves died, the latest previous directory comes back.
            old.sort(key=lambda p: p.stat().st_mtime if p.exists() else 0, reverse=True)
            for aside in old:
                legacy = _OLD not in aside.name
                if not path.exists() and (not legacy or describes_our_checkpoint(aside)):
                    os.rename(aside, path)
                    _fsync_dir(path.parent)
                    done.append(f"restored the previous directory from {aside.name}")
                    logger.warning("%s: restored the previous directory from %s (a save was interrupted "
                                   "while committing)", path, aside)
                    continue
                clean(aside, False)
            if fcntl is None:
                return done  # no lock tells a dead save from a live one
            for stage in staging:
                lock = stage / _LOCK_NAME
                if lock.exists():
                    fd = _try_lock(lock)
                    if fd is None:
                        continue  # a save in progress
                    try:  # died while writing: everything but the user's links is the package's
                        clean(stage, True)
                    finally:
                        os.close(fd)
                else:  # died after the exchange: the previous checkpoint, owned by its description
                    clean(stage, False)
    except OSError as e:
        logger.warning("%s: could not clean up after an interrupted save (%s)", path, e)
    return done


# ---------------------------------------------------------------------------------- staging
class StagedDirectory:
    """Write a checkpoint directory into a sibling staging directory, then commit it atomically.

    Usage::

        with StagedDirectory(path, overwrite=False) as stage:
            ...write files into stage.path...
            stage.commit()

    Leaving the block without ``commit()`` (an exception) removes the staging directory.
    """

    def __init__(self, path: Path, *, overwrite: bool):
        self.target = Path(os.path.abspath(path))
        if self.target.is_symlink():  # save where it points; the link stays as the user made it
            self.target = self.target.resolve()
        self.overwrite = overwrite
        self.path: Path = self.target  # set in __enter__
        self._lock_fd: int | None = None
        self._committed = False
        self.file_mode = 0o644

    def __enter__(self) -> "StagedDirectory":
        parent = self.target.parent
        parent.mkdir(parents=True, exist_ok=True)
        recover(self.target)
        name = f".{self.target.name}{_STAGING}{os.getpid()}-{secrets.token_hex(4)}"
        with _parent_lock(parent):  # so recovery elsewhere never sees it without its lock held
            self.path = parent / name
            os.mkdir(self.path, 0o777)  # the umask applies: the directory gets the usual permissions
            try:
                if self.target.is_dir():
                    os.chmod(self.path, stat.S_IMODE(os.stat(self.target).st_mode))
                lock = self.path / _LOCK_NAME
                self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
                self.file_mode = stat.S_IMODE(os.fstat(self._lock_fd).st_mode)  # 0o666 less the umask
                if fcntl is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            except BaseException:
                self._cleanup()
                raise
        return self

    def written(self) -> list[str]:
        return [n for n in _listing(self.path) if n != _LOCK_NAME]

    def commit(self) -> None:
        """Make the staged files the checkpoint at the target, keeping the target's other files."""
        written = self.written()
        for name in written:  # some writers (safetensors) create files private to the owner
            os.chmod(self.path / name, self.file_mode)
        with _parent_lock(self.target.parent):
            if self.target.exists() and not self.target.is_dir():
                raise ValueError(f"{self.target} exists and is not a directory")
            exists = self.target.is_dir()
            keep: list[str] = []
            replaced: list[str] = []
            if exists:
                blocking = _foreign(self.target, written)
                if blocking and not self.overwrite:
                    raise FileExistsError(
                        f"{self.target} now holds files quantization-wrapper did not write that the save would "
                        f"replace ({', '.join(blocking[:5])}); pass overwrite=True or choose another path")
                owned = owned_files(self.target)
                keep = [n for n in _listing(self.target)
                        if n not in owned and n not in written and n != _LOCK_NAME]
                for name in keep:
                    _link_tree(self.target / name, self.path / name)
                replaced = [n for n in _listing(self.target) if n in written and n not in owned]
                if replaced:
                    logger.warning("%s: overwrite=True replaces %s, which quantization-wrapper did not write",
                                   self.target, replaced)
            os.unlink(self.path / _LOCK_NAME)  # recovery never runs while we hold the parent lock
            _fsync_dir(self.path)
            if not exists:
                os.rename(self.path, self.target)
                _fsync_dir(self.target.parent)
                self._committed = True
                return
            if _exchange(self.path, self.target):
                _fsync_dir(self.target.parent)
                self._committed = True
                old = self.path  # the previous checkpoint now sits at the staging name
            else:
                old = self.target.parent / f".{self.target.name}{_OLD}{os.getpid()}-{secrets.token_hex(4)}"
                os.rename(self.target, old)
                try:
                    os.rename(self.path, self.target)
                except BaseException:
                    os.rename(old, self.target)
                    raise
                _fsync_dir(self.target.parent)
                self._committed = True
            # With overwrite=True, files of other origin named like ours were replaced: they go too.
            left = _remove_ours(old, self.target, owned_files(old) | set(replaced), False)
            if left:
                warnings.warn(f"{old} keeps files that appeared in {self.target} while it was being saved: "
                              f"{left[:5]}", stacklevel=3)

    def _cleanup(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if not self._committed and self.path != self.target and self.path.exists():
            _remove_ours(self.path, self.target if self.target.is_dir() else None, set(), True)

    def __exit__(self, *exc: Any) -> None:
        self._cleanup()


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link ``src`` (a file, a symlink or a directory tree) at ``dst``: the staged checkpoint
    keeps the user's files without copying them, and nothing is lost if the save dies."""
    st = os.lstat(src)
    try:
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISDIR(st.st_mode):
            os.mkdir(dst, stat.S_IMODE(st.st_mode))
            for name in _listing(src):
                _link_tree(src / name, dst / name)
        elif stat.S_ISREG(st.st_mode):
            os.link(src, dst, follow_symlinks=False)
        else:
            raise OSError(errno.EPERM, "not a regular file, directory or symlink")
    except OSError as e:
        raise OSError(e.errno, f"cannot keep {src} across the atomic replace of the checkpoint ({e.strerror}); "
                               f"nothing was changed. Save to a new directory") from e


class StagedFile:
    """A single file written under a temporary sibling name and renamed over the target."""

    def __init__(self, path: Path):
        self.target = Path(os.path.abspath(path))
        if self.target.is_symlink():
            self.target = self.target.resolve()
        self.path = self.target
        self._fd: int | None = None

    def __enter__(self) -> "StagedFile":
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._recover()
        self.path = self.target.parent / f".{self.target.name}{_STAGING}{os.getpid()}-{secrets.token_hex(4)}.tmp"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        self.file_mode = stat.S_IMODE(os.fstat(self._fd).st_mode)
        if fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def _recover(self) -> None:
        prefix = f".{self.target.name}{_STAGING}"
        for name in _listing(self.target.parent):
            if name.startswith(prefix) and name.endswith(".tmp"):
                fd = _try_lock(self.target.parent / name)
                if fd is not None:
                    try:
                        (self.target.parent / name).unlink()
                    finally:
                        os.close(fd)

    def commit(self) -> None:
        os.chmod(self.path, self.file_mode)
        with open(self.path, "rb+") as f:
            os.fsync(f.fileno())
        with _parent_lock(self.target.parent):
            os.replace(self.path, self.target)
            _fsync_dir(self.target.parent)
        self.path = self.target

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.path != self.target:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


# ------------------------------------------------------------------------------ confined reads
def confined_file(directory: str | os.PathLike, name: Any, what: str) -> Path:
    """``directory / name`` for a file a checkpoint names, refusing names that lead elsewhere.

    Args:
        directory: the checkpoint directory.
        name: the file name as the checkpoint gives it (untrusted).
        what: where the name came from, for the error (``"quantization_config.json 'files'"``).

    Raises:
        UnsafePathError: not a plain file name (absolute, with a separator or ``..``), or a symlink
            that resolves outside ``directory`` (a Hugging Face cache snapshot may point into its
            repository's ``blobs/``).
    """
    directory = Path(directory)
    if not isinstance(name, str) or not _plain_name(name):
        raise UnsafePathError(f"{directory}: {what} names {name!r}, which is not a plain file name in the "
                              f"checkpoint directory; refused (a checkpoint may only name its own files)")
    path = directory / name
    if path.is_symlink():
        root = directory.resolve()
        target = path.resolve()
        allowed = [root]
        if root.parent.name == "snapshots":  # huggingface_hub cache: snapshots/<rev>/f -> ../../blobs/<sha>
            allowed.append(root.parent.parent / "blobs")
        if not any(target == a or a in target.parents for a in allowed):
            raise UnsafePathError(f"{path} is a symlink to {target}, outside the checkpoint directory; refused")
    return path
