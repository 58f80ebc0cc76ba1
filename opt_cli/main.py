"""`opt-lm`: generate, convert, info, score and train from the command line, in any of the three frameworks.

    opt-lm generate "Plants create energy through a process known as photosynthesis." --framework torch
    opt-lm info facebook/opt-125m
    opt-lm score notes.txt --framework flax
    opt-lm convert SRC DST --to flax
    opt-lm train --framework torch --task sequence-classification --model default --train-files reviews.csv --output out

Text goes to stdout, status and progress to stderr. Without --model, the embedded default model is used (a small
OPT trained by `opt-lm train`; see MODEL_CARD.md), so everything works offline on a fresh machine.

A bad option or value is refused before any model is loaded or file written, with one line on stderr naming it and
exit status 2:

    opt-lm generate: error: argument --top-p: must be in (0, 1], got 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np

from opt_cli.common import DEFAULT_MODEL
from opt_cli.common import integer as _integer
from opt_core.errors import ConfigError, OPTError

FRAMEWORK_CHOICES = ("torch", "tf", "flax")


def status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----- argument checks: each option's values at parse time, what needs several options or the disk before any work


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: `opt-lm <command>: error: <message>` on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(allowed, rule: str):
    """An argparse type: a finite float for which `allowed(value)` holds, `rule` in words."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not (math.isfinite(value) and allowed(value)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    return parse


POSITIVE = _number(lambda x: x > 0, "> 0")
NON_NEGATIVE = _number(lambda x: x >= 0, ">= 0")
PROBABILITY = _number(lambda x: 0 < x <= 1, "in (0, 1]")
UNIT_INTERVAL = _number(lambda x: 0 <= x <= 1, "in [0, 1]")


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give module names, comma-separated (e.g. q_proj,v_proj), or all-linear")
    return names


def _check_files(option: str, paths) -> None:
    for path in paths or ():
        if not Path(path).is_file():
            raise ConfigError(f"{option} {path}: no such file")


def _check_model(args) -> None:
    """--model: a folder, or a hub id (resolved now, so a missing one is named before anything is loaded)."""
    if args.model is None:
        return
    from opt_core.hub import resolve_model

    try:
        resolve_model(args.model)
    except OPTError as error:
        raise type(error)(f"--model: {error}") from None


def _check_adapter(adapter) -> None:
    """--adapter: its adapter_config.json read now, so a missing or unusable adapter is named before loading."""
    if adapter is None:
        return
    from opt_core.adapters import CONFIG_NAME, LoraConfig
    from opt_core.hub import resolve_file

    try:
        LoraConfig.from_json_file(resolve_file(adapter, CONFIG_NAME))
    except OPTError as error:
        raise type(error)(f"--adapter: {error}") from None


# ----- generate


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming the text to stdout")
    p.add_argument("prompt", help="the text to continue")
    _model_arguments(p)
    p.add_argument("--max-new-tokens", type=_integer(1), default=50)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=NON_NEGATIVE, default=1.0, help="> 0 with --do-sample")
    p.add_argument("--top-k", type=_integer(0), default=50, help="0: off")
    p.add_argument("--top-p", type=PROBABILITY, default=1.0)
    p.add_argument("--num-beams", type=_integer(1), default=1)
    p.add_argument("--penalty-alpha", type=UNIT_INTERVAL, default=None, help="contrastive search (with --top-k > 1)")
    p.add_argument("--repetition-penalty", type=POSITIVE, default=1.0)
    p.add_argument("--no-repeat-ngram-size", type=_integer(0), default=3, help="forbid repeating n-grams (0: off)")
    p.add_argument("--seed", type=_integer(0), default=None, help="seed for sampling")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder or hub id to apply to --model")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the weights before decoding")
    p.set_defaults(run=run_generate, check=check_generate)


def _model_arguments(p) -> None:
    p.add_argument("--model", default=None, help="folder or hub id (default: the embedded model)")
    p.add_argument("--framework", choices=FRAMEWORK_CHOICES, default="torch")
    p.add_argument(
        "--quantize", choices=("int8",), default=None, help="int8 weight-only quantization (torch only so far)"
    )


def _load(args):
    from opt_cli.frameworks import load_causal_lm
    from opt_core.tokenizer import OPTTokenizer

    name = args.model or DEFAULT_MODEL
    adapter = getattr(args, "adapter", None)
    merge = bool(adapter and args.merge)
    quantize = getattr(args, "quantize", None)
    options = {"adapter": adapter} if adapter else {}
    if quantize and not merge:
        options["quantize"] = quantize  # an unmerged adapter acts over the int8 base
    shown = (f" with the adapter {adapter}" if adapter else "") + (f", {quantize}" if quantize else "")
    status(f"loading {name}{shown} ({args.framework})")
    model = load_causal_lm(args.framework, name, **options)
    if merge and quantize:  # int8 weights cannot take a merge: merge in float, then quantize the merged weights
        model.model.merge_and_unload().quantize(quantize)
    elif merge:
        model.model.merge_adapter()
    return model, OPTTokenizer.from_pretrained(name)


def _check_quantize(args) -> None:
    if args.quantize and args.framework != "torch":
        raise ConfigError(
            f"--quantize {args.quantize} is implemented for --framework torch only so far, not {args.framework}"
        )


def _generation_options(args) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_beams=args.num_beams,
        penalty_alpha=args.penalty_alpha,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
    )


def check_generate(args) -> None:
    """Options that cannot go together (GenerationConfig's rules), named as the options; then the model."""
    from opt_core.generation import GenerationConfig

    options = _generation_options(args)
    try:
        GenerationConfig(**options).validate()
    except ConfigError as error:
        names = "|".join(options)
        message = re.sub(rf"\b({names})\b", lambda m: "--" + m.group(1).replace("_", "-"), str(error))
        for said, flag in (("set --do-sample=False", "leave out --do-sample"), ("--do-sample=True", "--do-sample")):
            message = message.replace(said, flag)  # --do-sample is a switch
        raise ConfigError(message) from None
    if args.merge and not args.adapter:
        raise ConfigError("--merge merges an adapter: pass --adapter too")
    _check_quantize(args)
    _check_model(args)
    _check_adapter(args.adapter)


def run_generate(args) -> int:
    from opt_core.generation import TextStreamer

    model, tokenizer = _load(args)
    encoded = tokenizer([args.prompt], return_tensors="np")
    options = _generation_options(args)
    if args.seed is not None:
        options["seed"] = args.seed
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    if args.num_beams == 1:
        options["streamer"] = streamer  # beam search settles its text only at the end
    ids = model.generate(encoded["input_ids"], encoded["attention_mask"], **options)
    if args.num_beams > 1:
        print(tokenizer.decode(ids[0], skip_special_tokens=True), flush=True)
    return 0


# ----- info


def add_info(sub) -> None:
    p = sub.add_parser("info", help="config, parameter count, formats and dtypes of a model")
    p.add_argument("model", nargs="?", default=None, help="folder or hub id (default: the embedded model)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=run_info)


def run_info(args) -> int:
    from opt_core.config import OPTConfig
    from opt_core.errors import CheckpointError
    from opt_core.formats import READ_ORDER, detect_format, read_checkpoint
    from opt_core.hub import resolve_model
    from opt_core.weights import parameter_specs

    folder = resolve_model(args.model or DEFAULT_MODEL)
    config = OPTConfig.from_pretrained(folder)
    formats = {}
    for fmt in READ_ORDER:
        try:
            _, file = detect_format(folder, fmt)
        except CheckpointError:
            continue
        _, tensors = read_checkpoint(folder, fmt)
        dtypes = sorted({str(t.dtype) for t in tensors.values()})
        formats[fmt] = {"file": file.name, "tensors": len(tensors), "dtypes": dtypes}
    parameters = sum(int(np.prod(s.shape)) for s in parameter_specs(config, "causal_lm"))
    info = {
        "model": str(args.model or "embedded default model"),
        "folder": str(folder),
        "parameters": parameters,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "heads": config.num_attention_heads,
        "ffn_dim": config.ffn_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "word_embed_proj_dim": config.word_embed_proj_dim,
        "pre_layer_norm": config.do_layer_norm_before,
        "tied_lm_head": config.tie_word_embeddings,
        "stored_dtype": config.dtype,
        "formats": formats,
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            if key == "formats":
                for fmt, details in value.items():
                    print(
                        f"{'format ' + fmt:<26}{details['file']} ({details['tensors']} tensors, "
                        f"{', '.join(details['dtypes'])})"
                    )
            else:
                print(
                    f"{key:<26}{value:,}"
                    if isinstance(value, int) and not isinstance(value, bool)
                    else f"{key:<26}{value}"
                )
    return 0


# ----- score


def add_score(sub) -> None:
    p = sub.add_parser(
        "score",
        help="log-likelihood and perplexity of a text file (lm_eval's rolling windows)",
        description="Scores the file as lm-evaluation-harness' HF backend scores a document (loglikelihood_rolling): "
        "the text's tokens with the `</s>` OPT's tokenizer puts in front, each predicted once, in rolling windows of "
        "--window tokens that give every prediction as much context as the window holds.",
    )
    p.add_argument("file", type=Path, help="a UTF-8 text file")
    _model_arguments(p)
    p.add_argument(
        "--window", type=_integer(2), default=None, help="tokens per forward pass (default: the model's max)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run_score, check=check_score)


def check_score(args) -> None:
    """The file is read (and kept in args.text) before the model is loaded."""
    if not args.file.is_file():
        raise ConfigError(f"file {args.file}: no such file")
    try:
        args.text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"file {args.file} cannot be read as UTF-8 text: {error}") from None
    if not args.text:
        raise ConfigError(f"file {args.file} holds no text: nothing to score")
    _check_quantize(args)
    _check_model(args)


def run_score(args) -> int:
    model, tokenizer = _load(args)
    text = args.text if hasattr(args, "text") else args.file.read_text(encoding="utf-8")
    result = score_text(model, tokenizer, text, args.window)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"tokens scored      {result['tokens']} (the leading </s> included, as lm_eval scores it)")
        print(f"log-likelihood     {result['log_likelihood']:.3f} nats")
        print(f"mean NLL / token   {result['mean_nll']:.4f}")
        print(f"perplexity         {result['perplexity']:.3f}")
        print(f"windows            {result['windows']} rolling windows of {result['window']} tokens (lm_eval's rule)")
    return 0


SCORE_BATCH = 8  # windows per forward pass


def score_text(model, tokenizer, text: str, window: int | None = None) -> dict:
    """The text's log-likelihood as lm_eval's HF backend computes it for one document (`loglikelihood_rolling`):
    its ids with OPT's leading `</s>`, each predicted once in rolling windows of `window` tokens
    (`opt_core.scoring.rolling_windows`); `opt-lm eval` and the `opt-lm` lm_eval backend use the same rule."""
    from opt_core import scoring

    positions = model.config.max_position_embeddings
    window = min(window or positions, positions)
    ids = tokenizer.encode(text)
    if len(ids) <= 1:
        raise OPTError("nothing to score: the text tokenizes to no tokens")
    windows = scoring.rolling_windows(ids, tokenizer.bos_token_id, window)
    total = 0.0
    for start in range(0, len(windows), SCORE_BATCH):
        batch = windows[start : start + SCORE_BATCH]
        inputs = [scoring.model_input(context, continuation, window) for context, continuation in batch]
        batch_ids, mask = scoring.right_padded(inputs, tokenizer.pad_token_id)
        logits = model.logits(batch_ids, mask)  # B T V
        for row, fed, (_, continuation) in zip(logits, inputs, batch):
            total += scoring.continuation_score(row, len(fed), continuation)[0]
    return {
        "tokens": len(ids),
        "log_likelihood": total,
        "mean_nll": -total / len(ids),
        "perplexity": math.exp(-total / len(ids)),
        "windows": len(windows),
        "window": window,
    }


# ----- convert and train (their modules own the options)


def add_convert(sub) -> None:
    from conversion import add_arguments, run

    p = sub.add_parser("convert", help="convert a checkpoint to another format (no framework needed)")
    add_arguments(p)
    p.set_defaults(run=run, check=check_convert)


def check_convert(args) -> None:
    """What `conversion` checks first too, here so that its error reads like every other command's."""
    from opt_core.files import parse_size

    if not Path(args.src).exists():
        raise ConfigError(f"src {args.src}: no such file or folder")
    try:
        size = parse_size(args.max_shard_size)
    except ValueError as error:
        raise ConfigError(f"--max-shard-size {args.max_shard_size!r}: {error}") from None
    if size <= 0:
        raise ConfigError(f"--max-shard-size must be positive, got {args.max_shard_size!r}")


TRAIN_FRAMEWORKS = ("torch", "tf", "flax")


def add_train(sub) -> None:
    from opt_core.data import TASKS

    p = sub.add_parser("train", help="fine-tune (or train from scratch) for a task, in any of the three frameworks")
    p.add_argument("--framework", choices=TRAIN_FRAMEWORKS, default="torch")
    p.add_argument("--task", choices=TASKS, default="causal-lm")
    p.add_argument("--train-files", nargs="+", type=Path, required=True, help=".txt, .csv, .json or .jsonl files")
    p.add_argument("--eval-files", nargs="*", type=Path, default=None, help="held-out data (default: a split of train)")
    p.add_argument("--output", type=Path, required=True, help="folder to write (checkpoints go in it too)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--model", default=None, help="fine-tune this folder or hub id ('default': the embedded model)")
    start.add_argument("--init-from", default=None, help=argparse.SUPPRESS)  # the older name of --model
    p.add_argument("--config", default=None, help="config.json or preset for a fresh causal LM (no --model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's, or train one)")
    vocab_help = "vocabulary of a freshly trained tokenizer (at least 4 special tokens + 256 bytes)"
    p.add_argument("--vocab-size", type=_integer(260), default=4096, help=vocab_help)
    p.add_argument("--steps", type=_integer(1), default=1000)
    p.add_argument("--batch-size", type=_integer(1), default=16)
    p.add_argument("--grad-accum", type=_integer(1), default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=_integer(2), default=128, help="causal LM: tokens per row, </s> included")
    p.add_argument("--max-length", type=_integer(2), default=256, help="classification and QA: tokens per row")
    p.add_argument("--stride", type=_integer(0), default=64, help="QA: tokens shared by a long context's windows")
    p.add_argument("--eval-fraction", type=_number(lambda x: 0 <= x < 1, "in [0, 1)"), default=0.02)
    p.add_argument("--learning-rate", type=POSITIVE, default=1e-3)
    p.add_argument("--warmup-steps", type=_integer(0), default=100)
    p.add_argument("--schedule", choices=("linear", "cosine"), default="cosine")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.1)
    p.add_argument("--clip-norm", type=POSITIVE, default=1.0)
    p.add_argument("--adam-beta1", type=_number(lambda x: 0 <= x < 1, "in [0, 1)"), default=0.9)
    p.add_argument("--adam-beta2", type=_number(lambda x: 0 <= x < 1, "in [0, 1)"), default=0.999)
    p.add_argument("--adam-epsilon", type=POSITIVE, default=1e-8)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="bfloat16: mixed precision")
    p.add_argument("--no-dropout", dest="dropout", action="store_false", help="train without the config's dropout")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="batches in file order")
    p.add_argument("--eval-every", type=_integer(1), default=200)
    p.add_argument("--save-every", type=_integer(1), default=500)
    p.add_argument("--log-every", type=_integer(1), default=10)
    p.add_argument("--resume", action="store_true", help="continue from the output folder's checkpoint")
    p.add_argument("--save-dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--seed", type=_integer(0), default=0)
    dp_help = "torch under torchrun: FSDP2 (fully_shard per decoder layer) or DistributedDataParallel"
    p.add_argument("--data-parallel", choices=("fsdp", "ddp"), default="fsdp", help=dp_help)
    mesh_help = "devices: flax 'data=4,model=2' (a device mesh, tensor parallel over model), tf 'data=2' (mirrored)"
    p.add_argument("--mesh", default=None, help=mesh_help)
    lora = p.add_argument_group("LoRA (train a PEFT adapter on the frozen --model instead of every weight)")
    lora.add_argument("--lora-r", type=_integer(1), default=None, help="the adapter's rank; turns LoRA on")
    lora.add_argument("--lora-alpha", type=POSITIVE, default=8, help="scaling numerator (scaling = alpha / r)")
    lora.add_argument("--lora-dropout", type=_number(lambda x: 0 <= x < 1, "in [0, 1)"), default=0.0)
    lora.add_argument(
        "--lora-target", type=_names, default="q_proj,v_proj", help="modules, comma-separated, or all-linear"
    )
    p.set_defaults(run=run_train, check=check_train)


def check_train(args) -> None:
    """The data files and the model exist, before the output folder is made or a tokenizer trained."""
    _check_files("--train-files", args.train_files)
    _check_files("--eval-files", args.eval_files)
    if args.model == "default":
        args.model = str(DEFAULT_MODEL)
    _check_model(args)
    if args.task != "causal-lm" and args.model is None and args.init_from is None:
        raise ConfigError(f"--task {args.task} fine-tunes a model: pass --model (a folder, a hub id, or 'default')")
    if args.lora_r is not None and args.model is None and args.init_from is None:
        raise ConfigError("--lora-r trains an adapter on a model: pass --model (a folder, a hub id, or 'default')")
    if args.mesh is not None and args.framework == "torch":
        raise ConfigError("--mesh is for --framework flax and tf; torch trains data parallel under torchrun")


def run_train(args) -> int:
    import importlib

    from opt_core.training import TrainOptions

    options = {k: v for k, v in vars(args).items() if k not in ("run", "check", "command", "framework", "model")}
    options["init_from"] = args.model or args.init_from
    train = importlib.import_module(f"opt_{args.framework}.train").train
    status(f"training ({args.framework}, {args.task}) into {args.output}")
    train(TrainOptions(**options))
    return 0


# ----- merge


def add_merge(sub) -> None:
    p = sub.add_parser("merge", help="write a model with a LoRA adapter merged in (no framework needed)")
    p.add_argument("--model", required=True, help="the base model: folder, hub id, or 'default'")
    p.add_argument("--adapter", required=True, help="a PEFT LoRA adapter folder or hub id")
    p.add_argument("--output", type=Path, required=True, help="the folder to write")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None, help="default: the base's")
    p.set_defaults(run=run_merge, check=check_merge)


def check_merge(args) -> None:
    if args.model == "default":
        args.model = str(DEFAULT_MODEL)
    _check_model(args)
    _check_adapter(args.adapter)


def run_merge(args) -> int:
    from opt_core.adapters import merge_checkpoint

    status(f"merging {args.adapter} into {args.model}")
    files = merge_checkpoint(args.model, args.adapter, args.output, dtype=args.dtype)
    status(f"wrote {', '.join(str(f) for f in files)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="opt-lm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    from opt_cli.evaluate import add_eval
    from opt_cli.export import add_export
    from opt_cli.serve import add_serve

    for add in (add_generate, add_convert, add_info, add_score, add_train, add_merge, add_export, add_serve, add_eval):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "check", None) is not None:
            args.check(args)  # before any model is loaded or file written
        return args.run(args)
    except OPTError as error:
        print(f"opt-lm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
