"""Framework-neutral core of the OPT library: config, parameter table, checkpoint I/O, hub, inputs, outputs.

Importing `opt_core` never imports torch, tensorflow, keras, jax or flax; the framework packages
(`opt_torch`, `opt_tf`, `opt_flax`) build on it.
"""

from opt_core.config import PRESETS, OPTConfig
from opt_core.errors import (
    CheckpointError,
    ConfigError,
    InputError,
    OPTError,
    UnsafeCheckpointError,
)
from opt_core.generation import GenerationConfig, TextIteratorStreamer, TextStreamer
from opt_core.tokenizer import OPTTokenizer

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "GenerationConfig",
    "InputError",
    "OPTConfig",
    "OPTError",
    "OPTTokenizer",
    "TextIteratorStreamer",
    "TextStreamer",
    "UnsafeCheckpointError",
]
