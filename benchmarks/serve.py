"""Serving throughput and latency of `opt-lm serve` under 1, 4, 8 and 16 concurrent clients.

    python benchmarks/serve.py [--framework torch] [--model M | --preset opt-125m] [--clients 1 4 8 16]
                               [--requests 8] [--max-tokens 64] [--slots 16] [--max-length 256] [--threads N]
                               [--json out.json]

Starts `opt-lm serve` in a subprocess on a free loopback port (the embedded model unless --model; `--preset`
serves seeded random weights of a preset's shape with the embedded tokenizer, for a model whose decode step is
bound by reading its weights, as real OPT sizes are, rather than by the embedded model's tiny matmuls), waits for
`/health`, sends one warm-up request, then for each number of clients C runs C clients in a closed loop: each sends
`--requests` completions one after another (`POST /v1/completions`, greedy, `max_tokens` new tokens with eos banned
through `logit_bias`, so every request decodes the same number of tokens). Reported per C: requests/s and completion
tokens/s over the wall time of the whole round, the p50 and p99 of the request latencies, and the tokens/s ratio to
one client (continuous batching should make 8 clients' aggregate several times one client's). The machine's load
average before and after is printed beside the table: on a shared machine the numbers move with it, and torch's
intra-op threads spinning for busy cores can make a batched step many times slower (`--threads 1` avoids that).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "opt_cli" / "default_model"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
MODEL_NAME = "bench"
PROMPTS = [
    "The function returns",
    "Python is a programming language that",
    "import os\n",
    "class Foo:",
    "The list of arguments",
    "Return the value of",
    "def main():",
    "A string that holds",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "opt_cli.main", "serve", "--port", str(port), "--slots", str(args.slots)]
    command += ["--framework", args.framework, "--max-length", str(args.max_length)]
    command += ["--model", args.model, "--model-name", MODEL_NAME] if args.model else []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return subprocess.Popen(command, cwd=ROOT, env=env)


def write_random_model(preset: str, folder: Path) -> None:
    """Random fp32 weights in a preset's shape (seeded), with the embedded model's tokenizer files beside them:
    its ids are a subset of every preset's vocabulary, and only the speed matters here."""
    import torch

    from opt_core import OPTConfig
    from opt_torch import OPTForCausalLM

    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig.from_preset(preset)).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(EMBEDDED / name, folder / name)


def wait_healthy(url: str, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"opt-lm serve exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"opt-lm serve did not answer /health within {seconds} s")


def request_body(args, model_name: str, index: int) -> dict:
    return {
        "model": model_name,
        "prompt": PROMPTS[index % len(PROMPTS)],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "logit_bias": {"2": -100},  # no eos: every request decodes max_tokens tokens
    }


async def run_round(url: str, args, model_name: str, clients: int) -> dict:
    """C clients, each sending args.requests completions in turn; returns the round's measurements."""
    latencies, tokens = [], 0

    async def client(number: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for i in range(args.requests):
            body = request_body(args, model_name, number * args.requests + i)
            start = time.perf_counter()
            response = await http.post("/v1/completions", json=body)
            latencies.append(time.perf_counter() - start)
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(n, http) for n in range(clients)))
        wall = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": len(latencies),
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": tokens / wall,
        "p50_latency_s": float(np.percentile(latencies, 50)),
        "p99_latency_s": float(np.percentile(latencies, 99)),
    }


def table(rows: list[dict]) -> str:
    single = next((r["tokens_per_s"] for r in rows if r["clients"] == 1), rows[0]["tokens_per_s"])
    lines = [
        "| clients | requests | requests/s | tokens/s | x 1 client | p50 latency (s) | p99 latency (s) |",
        "|--------:|---------:|-----------:|---------:|-----------:|----------------:|----------------:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_s'] / single:.2f} | {r['p50_latency_s']:.3f} | {r['p99_latency_s']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=("torch", "tf", "flax"), default="torch")
    parser.add_argument("--model", default=None, help="folder or hub id (default: the embedded model)")
    parser.add_argument("--preset", default=None, help="serve random weights of this shape instead (e.g. opt-125m)")
    parser.add_argument("--max-length", type=int, default=256, help="the server's positions per row")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=8, help="requests per client per round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=16, help="the server's batch rows")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one request may take")
    threads_help = "the server's OMP_NUM_THREADS (torch's intra-op threads); default: the environment's"
    parser.add_argument("--threads", type=int, default=None, help=threads_help)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.preset:
            args.model = str(Path(tmp) / args.preset)
            write_random_model(args.preset, Path(args.model))
        rows, loads = serve_and_measure(args)
    shown = args.preset or args.model or "the embedded model"
    print(table(rows))
    print(
        f"\n{args.framework}, {shown}, {args.slots} slots, {args.max_tokens} new tokens per request, "
        f"{args.requests} requests per client, OMP_NUM_THREADS={args.threads or os.environ.get('OMP_NUM_THREADS')}; "
        f"load average before {loads[0][0]:.2f}, after {loads[1][0]:.2f} on {os.cpu_count()} CPUs"
    )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "load": loads, **vars(args)}, default=str))


def serve_and_measure(args) -> tuple[list[dict], tuple]:
    """Starts the server, warms it up, runs a round per number of clients; the rows and the load averages."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    model_name = MODEL_NAME if args.model else "default"
    process = start_server(args, port)
    try:
        wait_healthy(url, process)
        load_before = os.getloadavg()
        asyncio.run(run_round(url, argparse.Namespace(**{**vars(args), "requests": 1}), model_name, 1))  # warm-up
        rows = [asyncio.run(run_round(url, args, model_name, clients)) for clients in args.clients]
        load_after = os.getloadavg()
    finally:
        process.terminate()
        process.wait(timeout=60)
    return rows, (load_before, load_after)


if __name__ == "__main__":
    main()
