"""`opt-lm serve`: OpenAI's completions API with continuous batching, driven by the official `openai` client and by
concurrent `httpx` clients on loopback, over the embedded model.

The servers run in this process (uvicorn in a thread, on a free port, stopped at teardown) except the CLI test,
which starts `opt-lm serve` as a user does. Every wait is bounded. Greedy completions are compared with the same
framework's `generate` for the same prompt: torch carries the whole matrix (client, streaming, n, stop, logprobs,
echo, concurrency, cancellation, bad requests); Keras and Flax check greedy equality under concurrency.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "opt_cli" / "default_model"
SLOTS = 4
PROMPTS = ["The function returns", "Python is a programming language that", "import os\n", "class Foo:"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Running:
    """A Server behind uvicorn in a thread, on a free loopback port."""

    def __init__(self, server):
        import uvicorn

        from opt_serve.app import build_app

        self.server, self.port = server, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(build_app(server), host="127.0.0.1", port=self.port, log_level="warning")
        self.web = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.web.run, daemon=True)

    def __enter__(self):
        self.server.engine.start()
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.web.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.web.should_exit = True
        self.thread.join(timeout=10)
        self.server.engine.stop()

    def client(self):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)


class Model:
    """The embedded model in one framework, its tokenizer, and greedy references from its `generate`."""

    def __init__(self, framework: str):
        from opt_cli.frameworks import load_causal_lm
        from opt_core.tokenizer import OPTTokenizer

        self.framework = framework
        self.lm = load_causal_lm(framework, MODEL)
        self.tokenizer = OPTTokenizer.from_pretrained(MODEL)

    def server(self, slots: int = SLOTS):
        from opt_serve.app import create_server

        return create_server(self.framework, self.lm.model, self.tokenizer, "default", slots)

    def generated_ids(self, prompt: str, max_new_tokens: int, **options) -> list[int]:
        ids = np.array([self.tokenizer.encode(prompt)])
        out = self.lm.generate(ids, np.ones_like(ids), max_new_tokens=max_new_tokens, **options)
        return [int(i) for i in out[0, ids.shape[1] :]]

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def greedy(self, prompt: str, max_new_tokens: int) -> str:
        return self.text(self.generated_ids(prompt, max_new_tokens))


@pytest.fixture(scope="module")
def torch_model():
    pytest.importorskip("torch")
    return Model("torch")


@pytest.fixture(scope="module")
def torch_server(torch_model):
    with Running(torch_model.server()) as running:
        yield running


def wait_until(condition, seconds: float = 30.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ----- the official client


def test_completion_matches_generate(torch_server, torch_model):
    completion = torch_server.client().completions.create(
        model="default", prompt=PROMPTS[0], max_tokens=12, temperature=0
    )
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.model == "default" and abs(completion.created - time.time()) < 60
    (choice,) = completion.choices
    assert choice.index == 0 and choice.logprobs is None
    assert choice.text == torch_model.greedy(PROMPTS[0], 12)
    prompt_tokens = len(torch_model.tokenizer.encode(PROMPTS[0]))
    assert completion.usage.prompt_tokens == prompt_tokens
    assert choice.finish_reason == "length" and completion.usage.completion_tokens == 12
    assert completion.usage.total_tokens == prompt_tokens + 12


def test_streaming_gives_the_same_text(torch_server, torch_model):
    chunks = list(
        torch_server.client().completions.create(
            model="default",
            prompt=PROMPTS[1],
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *texts, usage = chunks
    assert all(c.object == "text_completion" and c.id == chunks[0].id and c.usage is None for c in texts)
    assert "".join(c.choices[0].text for c in texts) == torch_model.greedy(PROMPTS[1], 20)
    assert [c.choices[0].finish_reason for c in texts][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in texts[:-1]) and len(texts) > 5
    assert usage.choices == [] and usage.usage.completion_tokens == 20


def test_n_and_a_list_of_prompts(torch_server, torch_model):
    """n choices per prompt, indexed prompt by prompt; with a seed, choice j samples as row j of generate's
    num_return_sequences=n call (the same draws), and the request repeats itself."""
    client = torch_server.client()
    options = dict(model="default", prompt=PROMPTS[:2], max_tokens=10, temperature=0.8, n=2, seed=7)
    first, again = client.completions.create(**options), client.completions.create(**options)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    for i, prompt in enumerate(PROMPTS[:2]):
        ids = np.array([torch_model.tokenizer.encode(prompt)])
        rows = torch_model.lm.generate(
            ids, np.ones_like(ids), max_new_tokens=10, do_sample=True, temperature=0.8, seed=7, num_return_sequences=2
        )
        expected = [torch_model.text(row[ids.shape[1] :]) for row in rows]
        assert [c.text for c in first.choices[2 * i : 2 * i + 2]] == expected
    assert first.usage.prompt_tokens == sum(len(torch_model.tokenizer.encode(p)) for p in PROMPTS[:2])


def test_stop_strings_whole_and_streamed(torch_server, torch_model):
    full = torch_model.greedy(PROMPTS[0], 24)
    stop = full[len(full) // 3 : len(full) // 3 + 3]
    expected = full[: full.index(stop)]
    client = torch_server.client()
    whole = client.completions.create(model="default", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop])
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens < 24
    stream = client.completions.create(
        model="default", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=stop, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected and chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_and_echo(torch_server, torch_model):
    """logprobs are the model's log-softmax: the chosen token's and the top alternatives (the chosen one always
    among them); with echo the prompt comes back first, each token scored by the position before it."""
    import torch

    completion = torch_server.client().completions.create(
        model="default", prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=3, echo=True
    )
    choice, logprobs = completion.choices[0], completion.choices[0].logprobs
    assert choice.text == PROMPTS[0] + torch_model.greedy(PROMPTS[0], 5)
    ids = torch_model.tokenizer.encode(PROMPTS[0]) + torch_model.generated_ids(PROMPTS[0], 5)
    with torch.no_grad():
        logits = torch_model.lm.model(torch.tensor([ids])).logits[0].double()
    expected = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    np.testing.assert_allclose(logprobs.token_logprobs, expected, atol=1e-4)
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert top[token] == logprob and 3 <= len(top) <= 4
    generated = logprobs.top_logprobs[-5:]  # greedy: the chosen token is the most likely
    assert all(max(top, key=top.get) == token for top, token in zip(generated, logprobs.tokens[-5:]))


def test_token_id_prompts(torch_server, torch_model):
    ids = torch_model.tokenizer.encode(PROMPTS[2])
    completion = torch_server.client().completions.create(
        model="default", prompt=[ids, ids[1:]], max_tokens=8, temperature=0, echo=True, logprobs=0
    )
    first, second = completion.choices
    assert first.text == PROMPTS[2] + torch_model.greedy(PROMPTS[2], 8)
    assert first.logprobs.tokens[0] == "</s>" and first.logprobs.token_logprobs[0] is None
    assert second.logprobs.token_logprobs[0] is None and second.text.startswith(PROMPTS[2])


def test_health_and_models(torch_server):
    assert httpx.get(f"{torch_server.url}/health", timeout=10).json() == {"status": "ok"}
    models = torch_server.client().models.list()
    assert [m.id for m in models.data] == ["default"] and models.data[0].object == "model"


# ----- continuous batching


async def _staggered_requests(url: str, requests: list[tuple[float, dict]]) -> list[dict]:
    """Sends each body after its delay, all at once over one connection pool; returns the JSON answers."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def send(delay: float, body: dict) -> dict:
            await asyncio.sleep(delay)
            response = await client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            return response.json()

        return await asyncio.gather(*(send(delay, body) for delay, body in requests))


def test_concurrent_greedy_requests_equal_generate(torch_server, torch_model):
    """Eight clients (twice the rows) with prompts and lengths of their own, joining at different times: each
    text equals generate's for its prompt alone, and the engine ran far fewer steps than tokens."""
    prompts = [*PROMPTS, "def main():", "The list", "Return the", "A"]
    lengths = [30, 7, 19, 25, 3, 16, 11, 22]
    bodies = [
        (0.03 * i, dict(model="default", prompt=p, max_tokens=n, temperature=0))
        for i, (p, n) in enumerate(zip(prompts, lengths))
    ]
    steps_before = torch_server.server.engine.steps
    answers = asyncio.run(_staggered_requests(torch_server.url, bodies))
    steps = torch_server.server.engine.steps - steps_before
    for answer, prompt, length in zip(answers, prompts, lengths):
        assert answer["choices"][0]["text"] == torch_model.greedy(prompt, length), prompt
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    assert steps < 0.6 * tokens, f"{steps} decode steps for {tokens} tokens: the requests did not share steps"
    assert not torch_server.server.engine.active


def test_cancelled_stream_frees_its_row(torch_server):
    engine = torch_server.server.engine
    body = dict(model="default", prompt=PROMPTS[3], max_tokens=200, temperature=0, stream=True)
    with httpx.stream("POST", f"{torch_server.url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        received = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
        assert received and engine.active
        (completion,) = [c for _, c in engine.active.values()]
    wait_until(lambda: not engine.active, what="the engine to free the cancelled row")
    assert len(completion.output) < 200 and completion.finish_reason is None
    answer = torch_server.client().completions.create(model="default", prompt="A", max_tokens=2)
    assert answer.choices[0].finish_reason == "length"


def test_a_whole_request_whose_client_leaves_frees_its_row(torch_server):
    engine = torch_server.server.engine
    body = dict(model="default", prompt="A", max_tokens=250, temperature=0, logit_bias={"2": -100})
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{torch_server.url}/v1/completions", json=body, timeout=0.3)
    (completion,) = [c for _, c in engine.active.values()] or [None]
    wait_until(lambda: not engine.active, what="the engine to free the abandoned row")
    assert completion is None or len(completion.output) < 250


# ----- bad requests


TOO_LONG = list(range(3, 300))
BAD_REQUESTS = [  # (what the body changes, the param named, HTTP status)
    (dict(prompt=TOO_LONG), "prompt", 400),
    (dict(prompt=TOO_LONG[:250], max_tokens=10), "max_tokens", 400),
    (dict(max_tokens=0), "max_tokens", 400),
    (dict(max_tokens=-3), "max_tokens", 400),
    (dict(max_tokens="ten"), "max_tokens", 400),
    (dict(temperature="hot"), "temperature", 400),
    (dict(temperature=2.5), "temperature", 400),
    (dict(top_p=0), "top_p", 400),
    (dict(n=SLOTS + 1), "n", 400),
    (dict(prompt=["a"] * (SLOTS + 1)), "prompt", 400),
    (dict(n=0), "n", 400),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop", 400),
    (dict(stop=7), "stop", 400),
    (dict(logprobs=6), "logprobs", 400),
    (dict(echo="yes"), "echo", 400),
    (dict(stream="yes"), "stream", 400),
    (dict(seed=1.5), "seed", 400),
    (dict(presence_penalty=3), "presence_penalty", 400),
    (dict(logit_bias={"99999": 1}), "logit_bias", 400),
    (dict(best_of=3), "best_of", 400),
    (dict(prompt=[]), "prompt", 400),
    (dict(prompt=[5, 4096]), "prompt", 400),
    (dict(prompt=[1, "a"]), "prompt", 400),
    (dict(prompt=None), "prompt", 400),
    (dict(stream_options={"include_usage": True}), "stream_options", 400),
    (dict(frobnicate=1), "frobnicate", 400),
    (dict(model="gpt-4"), "model", 404),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(torch_server):
    for change, param, status in BAD_REQUESTS:
        body = {"model": "default", "prompt": "Hello", **change}
        response = httpx.post(f"{torch_server.url}/v1/completions", json=body, timeout=30)
        assert response.status_code == status, (change, response.text)
        error = response.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", (change, error)
        assert set(error) == {"message", "type", "param", "code"} and param in error["message"], (change, error)
    for raw in (b"{not json", b"[1, 2]"):
        response = httpx.post(f"{torch_server.url}/v1/completions", content=raw, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as raised:
        torch_server.client().completions.create(model="default", prompt="Hello", max_tokens=0)
    assert raised.value.param == "max_tokens"
    assert torch_server.client().completions.create(model="default", prompt="Hello", max_tokens=3).choices


def test_a_full_queue_answers_503(torch_server):
    engine = torch_server.server.engine
    engine.max_waiting, limit = 0, engine.max_waiting
    try:
        with pytest.raises(openai.APIStatusError) as raised:
            torch_server.client().completions.create(model="default", prompt="Hello", max_tokens=3)
        assert raised.value.status_code == 503
    finally:
        engine.max_waiting = limit


# ----- Keras and Flax: greedy equality under concurrency


@pytest.mark.parametrize("framework", ["tf", "flax"])
def test_concurrent_greedy_equals_generate_in(framework):
    """Three clients joining at different times with different lengths. The prompts have one token length and
    the reference is one generate call each, so each framework compiles generate once; a shorter completion is
    the first tokens of the longest."""
    pytest.importorskip({"tf": "tensorflow", "flax": "flax"}[framework])
    model = Model(framework)
    prompts = ["The function returns", "The method returns", "The file is"]
    assert len({len(model.tokenizer.encode(p)) for p in prompts}) == 1
    lengths = [14, 6, 10]
    references = [model.generated_ids(p, max(lengths)) for p in prompts]
    bodies = [
        (0.2 * i, dict(model="default", prompt=p, max_tokens=n, temperature=0))
        for i, (p, n) in enumerate(zip(prompts, lengths))
    ]
    with Running(model.server(slots=3)) as running:
        answers = asyncio.run(_staggered_requests(running.url, bodies))
    for answer, reference, length in zip(answers, references, lengths):
        assert answer["choices"][0]["text"] == model.text(reference[:length])


# ----- the command line


def test_cli_serves_and_refuses_a_missing_model(tmp_path):
    missing = subprocess.run(
        [sys.executable, "-m", "opt_cli.main", "serve", "--model", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert missing.returncode == 2 and "--model" in missing.stderr


@pytest.mark.slow
def test_cli_serve_end_to_end():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "opt_cli.main", "serve", "--port", str(port), "--slots", "2"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: _healthy(port) or process.poll() is not None, 120, "opt-lm serve to answer")
        assert process.poll() is None, process.stderr.read()
        body = {"model": "default", "prompt": "The function returns", "max_tokens": 5}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).json()
        assert answer["choices"][0]["finish_reason"] == "length", json.dumps(answer)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "serving `default`" in process.stderr.read()


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
