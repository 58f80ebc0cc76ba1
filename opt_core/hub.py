"""Where a model's files come from: a local folder, the HF cache, or a download through `huggingface_hub`.

`resolve_model("facebook/opt-125m")` returns a local folder holding `config.json` and the weights of one format
(the first of safetensors, pytorch, flax, tf that the repository has, or the one asked for), downloading only
those files. The HF cache (`HF_HOME` / `HF_HUB_CACHE`, or `cache_dir`) is honoured, and so is offline mode
(`HF_HUB_OFFLINE=1` or `local_files_only=True`): then only cached files are used, and a missing one is named in
the error. Nothing here imports a framework.
"""

from __future__ import annotations

import os
from pathlib import Path

from opt_core.errors import CheckpointError
from opt_core.files import read_index
from opt_core.formats import FORMATS, READ_ORDER

_OPTIONAL_FILES = ("generation_config.json",)


def _is_offline(local_files_only: bool | None) -> bool:
    if local_files_only is not None:
        return local_files_only
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _download(repo_id: str, filename: str, **kwargs) -> tuple[Path | None, str]:
    """(local path, "") or (None, why not) for one file of a hub repository."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo_id, filename, **kwargs)), ""
    except LocalEntryNotFoundError:
        # Offline, or the hub could not be reached: only the cache was looked at.
        return None, "not in the local cache (offline or the hub is unreachable)"
    except EntryNotFoundError:
        return None, "not in the repository"
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo_id!r} is neither a local folder nor a model repository on the hub "
            "(or it is private: log in with `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo_id!r} has no revision {kwargs.get('revision')!r}") from None


def _hub_kwargs(revision, cache_dir, local_files_only, token) -> dict:
    return dict(
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=_is_offline(local_files_only),
        token=token,
    )


def resolve_file(
    name_or_path: str | os.PathLike,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> Path:
    """The local path of `filename` in a folder or hub repository; a clear error when it cannot be had."""
    folder = Path(name_or_path)
    if folder.is_dir():
        path = folder / filename
        if not path.is_file():
            raise CheckpointError(f"{folder} has no {filename}")
        return path
    _check_repo_id(name_or_path)
    path, why = _download(str(name_or_path), filename, **_hub_kwargs(revision, cache_dir, local_files_only, token))
    if path is None:
        raise CheckpointError(f"{filename} of {name_or_path!r} is {why}")
    return path


def _check_repo_id(name: str | os.PathLike) -> None:
    text = str(name)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        raise CheckpointError(f"{text} is not an existing folder, nor a hub id like 'facebook/opt-125m'")


def resolve_model(
    name_or_path: str | os.PathLike,
    *,
    formats: tuple[str, ...] | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    extra_files: tuple[str, ...] = (),
) -> Path:
    """A local folder with config.json and the weights of one format, downloading only those files.

    Args:
        name_or_path: a local folder, or a hub id such as "facebook/opt-125m".
        formats: the weight formats acceptable, in order of preference (default: `opt_core.formats.READ_ORDER`).
        revision: branch, tag or commit on the hub.
        cache_dir: the HF cache folder to use instead of the default.
        local_files_only: use the cache only; defaults to the HF_HUB_OFFLINE environment variable.
        token: hub token for private repositories.
        extra_files: other files to fetch when the repository has them (e.g. the tokenizer's).
    """
    folder = Path(name_or_path)
    if folder.is_dir():
        return folder
    _check_repo_id(name_or_path)
    kwargs = _hub_kwargs(revision, cache_dir, local_files_only, token)
    repo = str(name_or_path)
    config, why = _download(repo, "config.json", **kwargs)
    if config is None:
        raise CheckpointError(f"config.json of {repo!r} is {why}")
    for name in (*_OPTIONAL_FILES, *extra_files):
        _download(repo, name, **kwargs)
    tried = []
    for fmt in formats or READ_ORDER:
        weights = FORMATS[fmt].weights_name
        index, _ = _download(repo, FORMATS[fmt].index_name, **kwargs)
        if index is not None:
            _download_shards(repo, index, kwargs)
            return index.parent
        single, why_single = _download(repo, weights, **kwargs)
        if single is not None:
            return single.parent
        tried.append(f"{weights} ({why_single})")
    raise CheckpointError(f"no usable weights for {repo!r}: " + "; ".join(tried))


def _download_shards(repo: str, index: Path, kwargs: dict) -> None:
    for shard in sorted(set(read_index(index).values())):
        path, why = _download(repo, shard, **kwargs)
        if path is None:
            raise CheckpointError(f"shard {shard} of {repo!r} (listed in {index.name}) is {why}")
