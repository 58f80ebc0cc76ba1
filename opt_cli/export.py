"""`opt-lm export MODEL OUT --to {onnx,saved-model,tflite,stablehlo}`: a folder that the target's own runtime runs.

    opt-lm export default opt-onnx --to onnx                   # ONNX Runtime; Optimum's decoder-with-past names
    opt-lm export facebook/opt-125m opt-sm --to saved-model     # tf.saved_model.load / TF Serving
    opt-lm export default opt-tflite --to tflite --sequence-length 64   # LiteRT, fixed 1 x 64
    opt-lm export default opt-jax --to stablehlo               # jax.export.deserialize

Everything is checked before a framework is imported (`opt_export.folder.check_export`); the export is written
beside OUT and renamed into place (`opt_export`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from opt_cli.common import DEFAULT_MODEL, integer
from opt_export.folder import TARGETS


def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a causal LM for ONNX Runtime, TF Serving, LiteRT or JAX")
    p.add_argument("model", help="folder or hub id; 'default': the embedded model")
    p.add_argument("out", type=Path, help="the folder to create (or an empty one to fill)")
    p.add_argument("--to", required=True, choices=TARGETS, help="the runtime's format")
    p.add_argument("--opset", type=integer(1), default=None, help="onnx: the ONNX opset (default 18)")
    p.add_argument("--batch-size", type=integer(1), default=None, help="tflite: the fixed batch size (default 1)")
    length_help = "tflite: the fixed sequence length (default 128, or the model's maximum when smaller)"
    p.add_argument("--sequence-length", type=integer(1), default=None, help=length_help)
    p.set_defaults(run=run_export, check=check_export)


def _options(args) -> dict:
    names = ("opset", "batch_size", "sequence_length")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def check_export(args) -> None:
    from opt_export.folder import check_export as check

    if args.model == "default":
        args.model = str(DEFAULT_MODEL)
    check(args.model, args.out, args.to, _options(args))


def run_export(args) -> int:
    from opt_export.folder import export

    print(f"exporting {args.model} to {args.to} in {args.out}", file=sys.stderr, flush=True)
    export(args.model, args.out, args.to, **_options(args))
    print(f"wrote {args.out} (see {args.out / 'export.json'})", file=sys.stderr, flush=True)
    return 0
