"""File mechanics every checkpoint format shares: atomic writes, HF's shard plans, names and index files.

Siblings: `opt_core.formats` (the format registry, built on these) and the per-format modules
(`safetensors_file`, `torch_pickle`, `keras_h5`, `flax_msgpack`), which read and write one file each.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from opt_core.errors import CheckpointError

LFS_POINTER = b"version https://git-lfs"
TEMPORARY_SUFFIX = ".partial"


def temporary_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: hidden, and never a name a reader looks for."""
    return path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write; on success it replaces `path` in one rename, on failure it is removed.

    So a crash or an error never leaves a truncated file under the real name: readers see the old file or the
    new one.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


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
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index_path}: not a valid JSON index ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index_path} is not a shard index: no 'weight_map' of tensor name -> shard file")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index_path}: shard {shard!r} is not a file name in the folder")
    return weight_map
