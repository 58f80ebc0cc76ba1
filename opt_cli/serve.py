"""`opt-lm serve`: OpenAI's completions API (FastAPI + uvicorn) over one model in any of the three frameworks.

    opt-lm serve --model facebook/opt-125m --framework torch --host 127.0.0.1 --port 8000

The server is `opt_serve`; this module holds the options, their checks before anything loads, and the run.
"""

from __future__ import annotations

import os
import sys

from opt_cli.common import DEFAULT_MODEL, integer
from opt_core.errors import ConfigError, OPTError

MAX_DEFAULT_LENGTH = 2048  # positions per row unless --max-length says otherwise


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve OpenAI's completions API (continuous batching)")
    p.add_argument("--model", default=None, help="folder or hub id (default: the embedded model)")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder or hub id to apply to --model")
    p.add_argument("--framework", choices=("torch", "tf", "flax"), default="torch")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=integer(1, 65535), default=8000)
    p.add_argument("--model-name", default=None, help="the `model` requests name (default: --model as given)")
    p.add_argument("--slots", type=integer(1), default=8, help="completions decoded together (batch rows)")
    p.add_argument("--max-length", type=integer(2), default=None, help="positions per row, prompt included")
    p.add_argument("--max-waiting", type=integer(1), default=256, help="completions queued before 503s")
    p.set_defaults(run=run_serve, check=check_serve)


def check_serve(args) -> None:
    """The model and the adapter resolve and --max-length fits the model, before anything is loaded."""
    from opt_core.adapters import CONFIG_NAME, LoraConfig
    from opt_core.config import OPTConfig
    from opt_core.hub import resolve_file, resolve_model

    try:
        config = OPTConfig.from_pretrained(resolve_model(args.model or DEFAULT_MODEL))
    except OPTError as error:
        raise type(error)(f"--model: {error}") from None
    if args.max_length is not None and args.max_length > config.max_position_embeddings:
        raise ConfigError(
            f"--max-length {args.max_length} is more than the model's max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    if args.adapter is not None:
        try:
            LoraConfig.from_json_file(resolve_file(args.adapter, CONFIG_NAME))
        except OPTError as error:
            raise type(error)(f"--adapter: {error}") from None
    for module in ("fastapi", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(f"opt-lm serve needs {module}: pip install 'opt-lm[serve]'") from None


def run_serve(args) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import uvicorn

    from opt_cli.frameworks import load_causal_lm
    from opt_core.tokenizer import OPTTokenizer
    from opt_serve.app import build_app, create_server

    name = args.model or DEFAULT_MODEL
    model_name = args.model_name or args.model or "default"
    _status(f"loading {name}{f' with the adapter {args.adapter}' if args.adapter else ''} ({args.framework})")
    options = {"adapter": args.adapter} if args.adapter else {}
    model = load_causal_lm(args.framework, name, **options).model
    max_length = args.max_length or min(model.config.max_position_embeddings, MAX_DEFAULT_LENGTH)
    server = create_server(
        args.framework, model, OPTTokenizer.from_pretrained(name), model_name, args.slots, max_length, args.max_waiting
    )
    config = uvicorn.Config(build_app(server), host=args.host, port=args.port, log_level="warning", access_log=False)
    web = uvicorn.Server(config)
    server.engine.start()
    _status(
        f"serving `{model_name}` ({args.framework}, {args.slots} rows x {server.limits.max_length} positions) "
        f"on http://{args.host}:{args.port}/v1"
    )
    try:
        web.run()
    finally:
        server.engine.stop()
    return 0


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
