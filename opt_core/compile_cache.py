"""Where compiled programs are kept between processes, so that a second process's first `generate` skips the XLA
compilation the first process paid for: JAX's persistent compilation cache (`opt_flax`) and TensorFlow's XLA
persistent cache (`opt_tf`), in one folder. PyTorch's inductor keeps its own FX-graph cache already.

    OPT_LM_COMPILE_CACHE=/path/to/folder   # where (default: $XDG_CACHE_HOME/opt-lm/compiled, else ~/.cache/...)
    OPT_LM_COMPILE_CACHE=0                 # keep nothing on disk

JAX's cache is on by default. TensorFlow's only when OPT_LM_COMPILE_CACHE names a folder: TensorFlow 2.21 reads
each entry as a text proto before the binary one and logs the failure as an ERROR line ("Error parsing text-format
tensorflow.XlaSerializedCacheEntry") on every warm start, and it saves only part of the first `generate`: the trace
of the program, which it does not keep, is 1.5-2.6 s of it (opt-125m: 6.4-9.2 s of compiling cold, 4.2-4.9 s warm,
`benchmarks/first_call.py`; BENCHMARKS.md).

A user's own setting wins: `jax.config.jax_compilation_cache_dir` already set, or `--tf_xla_persistent_cache_directory`
already in TF_XLA_FLAGS, is left as it is. Entries are keyed by the compiled program and the compiler's version, so
a stale entry is never used; deleting the folder is always safe.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "OPT_LM_COMPILE_CACHE"
_OFF = {"0", "off", "false", "no", ""}


def cache_folder(kind: str) -> Path | None:
    """The folder for `kind` ("jax", "tf"), or None when the cache is turned off."""
    setting = os.environ.get(ENV)
    if setting is not None and setting.strip().lower() in _OFF:
        return None
    if setting:
        root = Path(setting).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(base) / "opt-lm" / "compiled"
    return root / kind


def tf_xla_flags(flags: str) -> str:
    """TF_XLA_FLAGS with the persistent cache folder added (before TensorFlow starts, which reads them once), when
    OPT_LM_COMPILE_CACHE names one (see above)."""
    folder = cache_folder("tf") if os.environ.get(ENV) else None
    if folder is None or "--tf_xla_persistent_cache_directory" in flags:
        return flags
    return f"{flags} --tf_xla_persistent_cache_directory={folder}".strip()
