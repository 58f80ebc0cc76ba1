"""`opt-lm eval`: lm-evaluation-harness' `simple_evaluate` over the `opt-lm` backend (`opt_eval`), printing lm_eval's
results table.

    opt-lm eval facebook/opt-125m --framework flax --tasks lambada_openai,hellaswag --limit 100
    opt-lm eval ./my-model --framework tf --tasks my_task --include-path ./my_tasks

The options, the model and the task names are checked before anything is loaded; the table goes to stdout, lm_eval's
progress and warnings to stderr. The same run on lm_eval's own command line is
`python -m opt_eval --model opt-lm --model_args pretrained=...,framework=... --tasks ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from opt_cli.common import DEFAULT_MODEL, integer
from opt_core.errors import ConfigError, OPTError


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate with lm-evaluation-harness (the opt-lm backend)")
    p.add_argument("model", nargs="?", default=None, help="folder or hub id (default: the embedded model)")
    p.add_argument("--framework", choices=("torch", "tf", "flax"), default="torch")
    p.add_argument("--tasks", type=_task_names, required=True, help="lm_eval task names, comma-separated")
    p.add_argument("--limit", type=_limit, default=None, help="documents per task (a fraction if below 1)")
    p.add_argument("--num-fewshot", type=integer(0), default=None)
    p.add_argument("--batch-size", type=integer(1), default=1)
    p.add_argument("--max-length", type=integer(2), default=None, help="tokens per window (default: the model's max)")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default=None)
    p.add_argument("--quantize", choices=("int8",), default=None, help="int8 weight-only (torch only so far)")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder or hub id")
    p.add_argument("--include-path", type=Path, default=None, help="a folder of task YAMLs of your own")
    p.add_argument("--seed", type=integer(0), default=1234, help="for tasks that sample")
    p.add_argument("--json", action="store_true", help="print lm_eval's results as JSON instead of the table")
    p.set_defaults(run=run_eval, check=check_eval)


def _limit(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"must be a whole number of documents or a fraction in (0, 1), got {text}")
    return int(value) if value >= 1 else value


def _task_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give lm_eval task names, comma-separated (e.g. hellaswag,arc_easy)")
    return names


def check_eval(args) -> None:
    """lm_eval installed, the options, the model, the adapter and every task name, before any model is loaded."""
    if args.quantize and args.framework != "torch":
        raise ConfigError(f"--quantize {args.quantize} is implemented for --framework torch only, not {args.framework}")
    if args.include_path is not None and not args.include_path.is_dir():
        raise ConfigError(f"--include-path {args.include_path}: no such folder")
    if args.model == "default":
        args.model = None
    _check_source("--model", args.model, None)
    _check_source("--adapter", args.adapter, "adapter_config.json")
    args.task_manager = _task_manager(args.tasks, args.include_path)


def _check_source(option: str, name: str | None, file: str | None) -> None:
    if name is None:
        return
    from opt_core.hub import resolve_file, resolve_model

    try:
        resolve_file(name, file) if file else resolve_model(name)
    except OPTError as error:
        raise type(error)(f"{option}: {error}") from None


def _task_manager(tasks: list[str], include_path: Path | None):
    """lm_eval's TaskManager that knows every task asked for. Tasks of --include-path are looked for there first:
    indexing lm_eval's own thousands of task files takes seconds."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ConfigError(f"opt-lm eval needs lm-evaluation-harness: pip install 'opt-lm[eval]' ({error})") from None
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if not _unknown(local, tasks):
            return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = _unknown(manager, tasks)
    if unknown:
        raise ConfigError(
            f"--tasks: unknown task(s) {', '.join(unknown)} (`lm-eval ls tasks` lists them; "
            "--include-path adds a folder of your own YAMLs)"
        )
    return manager


def _unknown(manager, tasks: list[str]) -> list[str]:
    return [name for name in tasks if not manager.match_tasks([name])]


def run_eval(args) -> int:
    import lm_eval

    import opt_eval  # noqa: F401  registers the `opt-lm` model

    model_args = {
        "pretrained": str(args.model or DEFAULT_MODEL),
        "framework": args.framework,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    for key in ("dtype", "quantize", "adapter", "max_length"):
        if getattr(args, key) is not None:
            model_args[key] = getattr(args, key)
    print(f"evaluating {model_args['pretrained']} ({args.framework}) on {', '.join(args.tasks)}", file=sys.stderr)
    results = lm_eval.simple_evaluate(
        model="opt-lm",
        model_args=model_args,
        tasks=args.tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        task_manager=args.task_manager,
        log_samples=False,
        random_seed=args.seed,
    )
    _print(results, args.json)
    return 0


def _print(results: dict, as_json: bool) -> None:
    from lm_eval.utils import handle_non_serializable, make_table

    if as_json:
        shown = {key: results[key] for key in ("results", "groups", "n-shot", "versions") if key in results}
        print(json.dumps(shown, indent=2, default=handle_non_serializable))
        return
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
