"""Converting OPT checkpoints: any of HF's formats (safetensors, `pytorch_model.bin`, `tf_model.h5`,
`flax_model.msgpack`, sharded or not) or Meta's original metaseq files, to any HF format, in any dtype.

    python -m conversion SRC DST --to safetensors|pytorch|tf|flax [--dtype float16] [--max-shard-size 2GB]
        [--config CONFIG_JSON_OR_PRESET] [--from safetensors|pytorch|tf|flax|metaseq] [--force]

    from conversion import convert
    convert("opt-125m-metaseq/", "opt-125m-hf/", to="safetensors", dtype="float16")

No framework is imported: reading and writing go through `opt_core`. Modules: `converter` (the entry points and the
all-or-nothing output), `formats` (HF layouts), `metaseq` (Meta's originals); lazy per-tensor values come
from `opt_core.lazy`.
"""

from conversion.converter import ConversionError, ConversionResult, add_arguments, convert, run

__all__ = ["ConversionError", "ConversionResult", "add_arguments", "convert", "run"]
