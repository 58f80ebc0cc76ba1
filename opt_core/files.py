"""File mechanics every checkpoint format shares: crash-safe commits, HF's shard plans, names and index files.

Siblings: `opt_core.formats` (the format registry, built on these) and the per-format modules
(`safetensors_file`, `torch_pickle`, `keras_h5`, `flax_msgpack`), which read and write one file each.

A save of several files is one commit (`FolderCommit`): every file is written under a temporary name and synced to
the disk; then a journal naming the renames (temporary -> final) and the removals (an earlier save's files) is
written atomically, which is the commit point; then the journal is carried out and deleted. A process killed at
any moment leaves either the previous checkpoint (journal not yet written: only temporary files, which a later
load or save deletes) or the new one (journal written: the next load or save finishes it,
`complete_interrupted_save`), never a mix. Commits and roll-forwards in one folder are serialised by a lock on
the folder (flock), so a reader never finishes the journal of a save that is still running.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from opt_core.errors import CheckpointError, CheckpointWriteError

try:
    import fcntl
except ImportError:  # not POSIX: commits are still journaled, only not locked against a second process
    fcntl = None

LFS_POINTER = b"version https://git-lfs"
TEMPORARY_SUFFIX = ".partial"
JOURNAL_NAME = ".opt-save-journal.json"
JOURNAL_VERSION = 1
LOCK_TIMEOUT_S = 60.0
# `.NAME.PID.partial`: a file (or a conversion's staging folder) that process PID is writing.
_PARTIAL = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)" + re.escape(TEMPORARY_SUFFIX))
_WHY_WRITE_FAILED = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file is larger than the file-size limit allows (ulimit -f, or the filesystem's maximum)",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EIO: "an I/O error",
}


def temporary_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: hidden, and never a name a reader looks for."""
    return path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write; on success it is synced and replaces `path` in one rename, on failure
    it is removed.

    So a crash or an error never leaves a truncated file under the real name: readers see the old file or the
    new one.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ----- syncing and locking


def fsync_file(path: Path) -> None:
    """Flushes a written file's data to the disk, so that a commit never names a file a power cut emptied."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(folder: Path) -> None:
    """Makes the renames and removals in `folder` durable (POSIX; elsewhere a rename is as durable as it gets)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):  # filesystems that cannot sync a folder
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Holds an exclusive lock on `folder` (flock on the folder itself: no lock file) while committing or
    finishing a save in it, so two processes never carry out one journal, nor a journal while it is written.

    The kernel drops the lock when its holder dies, so a killed save never leaves the folder locked. Where the
    filesystem has no flock (some network filesystems), the commit goes on unlocked.
    """
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CheckpointError(
                        f"{folder}: another process has been committing a save into this folder for {timeout:.0f} s "
                        "(it holds the folder's lock); try again when it has finished"
                    ) from None
                time.sleep(0.005)
            except OSError:
                break
        yield
    finally:
        os.close(fd)  # releases the lock


def _process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine and has not exited (a zombie has)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] not in (["Z"], ["X"])


# ----- committing several files at once


def write_failure(folder: Path, name: str | None, error: OSError, committed: bool = False) -> CheckpointWriteError:
    """A CheckpointWriteError naming the folder, the file and why the write failed (disk full, size limit, ...)."""
    why = _WHY_WRITE_FAILED.get(error.errno, "the write failed")
    what = f"writing {name}" if name else "the save"
    state = (
        "the new checkpoint is committed; loading or saving the folder again finishes putting it in place"
        if committed
        else "the folder still holds its previous checkpoint, unchanged"
    )
    return CheckpointWriteError(f"cannot save into {folder}: {what} failed: {why} ({error}); {state}", error.errno)


class FolderCommit:
    """Files written into `folder` under temporary names, then committed together: after a crash at any moment,
    the folder holds the previous files or all the new ones, never a mix (see the module docstring).

    Use as a context manager: write each file at `path(name)` (or `write(name, data)`), then call `commit()`. On
    an error before the commit point the temporary files are removed and the folder is as it was; an OSError
    becomes a CheckpointWriteError naming the file and the cause.

    Args:
        folder: an existing folder.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.staged: dict[str, Path] = {}  # final name -> temporary path
        self.current: str | None = None
        self.committed = False

    def path(self, name: str) -> Path:
        """The temporary path to write the file `name` at."""
        _check_plain_name(name, self.folder)
        self.staged[name] = temporary_path(self.folder / name)
        self.current = name
        return self.staged[name]

    def write(self, name: str, data: bytes | str) -> None:
        """Stages a file of these bytes (a str is written as UTF-8)."""
        self.path(name).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)

    def commit(self, removals: Callable[[], Iterable[str]] = tuple) -> list[str]:
        """Puts every staged file in place and removes the files `removals()` names (called under the folder's
        lock, so it sees the folder as it is then; staged names are never removed). Returns what was removed."""
        for name, tmp in self.staged.items():
            self.current = name
            fsync_file(tmp)
        self.current = None
        with folder_lock(self.folder):
            _roll_forward(self.folder)  # an interrupted earlier save first, so `removals` sees a whole folder
            removed = sorted({name for name in removals() if name not in self.staged})
            renames = [(tmp.name, name) for name, tmp in self.staged.items()]
            if len(renames) == 1 and not removed:  # one rename is atomic by itself
                os.replace(self.folder / renames[0][0], self.folder / renames[0][1])
                self.committed = True
                fsync_directory(self.folder)
                return []
            self.current = JOURNAL_NAME
            _write_journal(self.folder, {"version": JOURNAL_VERSION, "renames": renames, "removals": removed})
            self.current = None
            self.committed = True  # the commit point: from here on, the journal owns the temporary files
            try:
                _carry_out(self.folder, renames, removed)
            except OSError as error:
                raise write_failure(self.folder, None, error, committed=True) from error
        return removed

    def __enter__(self) -> FolderCommit:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if not self.committed:
            for tmp in self.staged.values():
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, CheckpointError):
            raise write_failure(self.folder, self.current, error, committed=self.committed) from error


def _check_plain_name(name: str, folder: Path) -> None:
    if not isinstance(name, str) or name in ("", ".", "..", JOURNAL_NAME) or "/" in name or "\\" in name:
        raise CheckpointError(f"{folder}: {name!r} is not a file name a save may write or remove")


def _write_journal(folder: Path, journal: dict) -> None:
    path = folder / JOURNAL_NAME
    tmp = temporary_path(path)
    try:
        tmp.write_text(json.dumps(journal, indent=1) + "\n", encoding="utf-8")
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(folder)


def _carry_out(folder: Path, renames: list[tuple[str, str]], removals: list[str]) -> None:
    """Does what a journal says; idempotent, so a roll-forward killed midway can simply run again."""
    for tmp, final in renames:
        if os.path.lexists(folder / tmp):
            os.replace(folder / tmp, folder / final)
        elif not os.path.lexists(folder / final):
            raise CheckpointError(
                f"{folder}: the interrupted save recorded in {JOURNAL_NAME} lost {tmp} before it became {final}; "
                "the folder is incomplete: save the checkpoint into it again"
            )
    for name in removals:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    fsync_directory(folder)
    (folder / JOURNAL_NAME).unlink()
    fsync_directory(folder)


def _read_journal(folder: Path) -> tuple[list[tuple[str, str]], list[str]] | None:
    path = folder / JOURNAL_NAME
    try:
        journal = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot read this interrupted save's journal ({error})") from None
    try:
        if journal["version"] != JOURNAL_VERSION:
            raise ValueError(f"version {journal['version']!r}, this library reads {JOURNAL_VERSION}")
        renames = [(str(tmp), str(final)) for tmp, final in journal["renames"]]
        removals = [str(name) for name in journal["removals"]]
        for tmp, final in renames:
            _check_plain_name(final, folder)
            match = _PARTIAL.fullmatch(tmp)
            if match is None or match["name"] != final:
                raise ValueError(f"{tmp!r} is not a temporary name of {final!r}")
        for name in removals:
            _check_plain_name(name, folder)
    except (KeyError, TypeError, ValueError, CheckpointError) as error:
        raise CheckpointError(f"{path}: not a journal this library wrote ({error}); remove it by hand") from None
    return renames, removals


def _roll_forward(folder: Path) -> bool:
    """Finishes the save a journal in `folder` records (the caller holds the folder's lock). True if there was one."""
    recorded = _read_journal(folder)
    if recorded is None:
        return False
    try:
        _carry_out(folder, *recorded)
    except OSError as error:
        raise CheckpointError(
            f"{folder} holds a save that was interrupted after it was committed ({folder / JOURNAL_NAME}), and it "
            f"cannot be finished here ({error}): open the folder once with write access (any load or save "
            f"finishes it), or save the checkpoint again"
        ) from None
    return True


def is_temporary_name(name: str) -> bool:
    """Whether `name` is a temporary file's or staging folder's (`.NAME.PID.partial`)."""
    return _PARTIAL.fullmatch(name) is not None


def stale_partials(folder: Path, prefix: str = ".") -> list[Path]:
    """Temporary files (and conversion staging folders) in `folder`, named from `prefix` on, whose writing
    process is gone."""
    stale = []
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            match = _PARTIAL.fullmatch(entry.name)
            if match and entry.name.startswith(prefix) and not _process_alive(int(match["pid"])):
                stale.append(Path(entry.path))
    return stale


def remove_partials(paths: Iterable[Path]) -> None:
    """Removes temporary files and staging folders; one that cannot be removed (a read-only folder) stays."""
    for path in paths:
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def complete_interrupted_save(path: str | os.PathLike) -> None:
    """Finishes a save into `path` (a folder, or a file in one) that was killed after its commit point, and
    removes temporary files of saves killed before it; a no-op for a folder without either.

    Called before a local folder is read or saved into. Idempotent: a roll-forward that is itself killed is
    finished by the next call.

    Raises:
        CheckpointError: the folder holds a committed save that cannot be finished (read-only), naming the
            journal and what to do.
    """
    folder = Path(path)
    if not folder.is_dir():
        folder = folder.parent
        if not folder.is_dir():
            return
    if not (folder / JOURNAL_NAME).exists() and not stale_partials(folder):
        return  # the usual case: one stat and one listing, no lock
    with folder_lock(folder):
        _roll_forward(folder)
        remove_partials(stale_partials(folder))


def check_not_lfs_pointer(path: Path, head: bytes) -> None:
    """A git-lfs pointer in place of the weights (a clone without `git lfs pull`) gets an error saying so."""
    if head.startswith(LFS_POINTER):
        raise CheckpointError(f"{path}: is a git-lfs pointer, not the weights; run `git lfs pull` in its repository")


def read_head(path: Path, size: int = len(LFS_POINTER)) -> bytes:
    """The first bytes of a checkpoint file, with a CheckpointError naming it when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None


# ----- shards


def parse_size(size: int | str) -> int:
    """Bytes in "5GB" (10**9), "5GiB" (2**30), "200MB", "100KB", or an int, as HF's max_shard_size."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read the size {size!r}; write it like '5GB', '500MB' or a byte count")
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(float(match.group(1)) * units.get((match.group(2) or "B").upper(), 1))


def plan_shards(sizes: Mapping[str, int], max_shard_size: int, *, close_empty: bool) -> list[list[str]]:
    """Splits names, in order, into shards of at most `max_shard_size` bytes (a bigger tensor gets its own).

    Greedy, as HF's savers: a tensor that would push the current shard past the limit starts a new one.
    HF's TF and Flax savers close the current shard even when it is still empty (a first tensor over the
    limit), its PyTorch saver does not; `close_empty` picks the rule so file names and counts match HF's.
    """
    shards: list[list[str]] = [[]]
    current = 0
    for name, size in sizes.items():
        if current + size > max_shard_size and (shards[-1] or close_empty):
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += size
    return shards


def shard_file_name(base: str, index: int, count: int) -> str:
    """`model.safetensors`, 0, 3 -> `model-00001-of-00003.safetensors` (HF's naming, 1-based, 5 digits)."""
    stem, ext = os.path.splitext(base)
    return f"{stem}-{index + 1:05d}-of-{count:05d}{ext}"


def is_shard_of(name: str, base: str) -> bool:
    """Whether `name` is a shard file of `base` under HF's naming (any count)."""
    stem, ext = os.path.splitext(base)
    return re.fullmatch(re.escape(stem) + r"-\d{5}-of-\d{5}" + re.escape(ext), name) is not None


def index_json_text(total_size: int, weight_map: Mapping[str, str]) -> str:
    """A shard index's text, formatted exactly as HF's `save_pretrained` writes it."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(weight_map)}
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


def read_index(index_path: Path) -> dict[str, str]:
    """The `weight_map` of an HF `*.index.json`: tensor name -> shard file name in the same folder."""
    try:
        index = json.loads(index_path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{index_path}: file not found") from None
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise CheckpointError(f"{index_path}: not a valid JSON index ({type(e).__name__}: {e})"[:500]) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index_path} is not a shard index: no 'weight_map' of tensor name -> shard file")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or shard in ("", ".", "..") or "\0" in shard:  # NUL: no file has it
            raise CheckpointError(f"{index_path}: shard {shard!r} is not a file name in the folder")
    return weight_map
