"""The HTTP side of `opt-lm serve`: a FastAPI app with OpenAI's `POST /v1/completions` (whole or streamed as
server-sent events), `GET /v1/models` and `GET /health`, over one `opt_serve.engine.Engine`.

A request is checked (`opt_serve.protocol`), tokenized, and queued as one `Job`; the engine's thread sends each
completion's updates back through the event loop. A streamed request whose client disconnects, or a whole one whose
client goes away while it waits, cancels its job, and the engine frees its rows at the next step. Every error is
OpenAI's error JSON; a bad request never stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from opt_serve import protocol
from opt_serve.engine import Completion, Engine, EngineBusy, Job, Update
from opt_serve.sampling import draws

DISCONNECT_POLL_S = 0.25  # how often a waiting whole-response request checks that its client is still there


class Server:
    """What the routes share: the engine, the tokenizer, the limits and the generation defaults.

    Args:
        engine: the running engine.
        tokenizer: the model's OPTTokenizer.
        limits: protocol.Limits (model name, vocabulary, positions, rows per request).
        defaults: the model's GenerationConfig.
    """

    def __init__(self, engine: Engine, tokenizer, limits: protocol.Limits, defaults):
        self.engine, self.tokenizer, self.limits, self.defaults = engine, tokenizer, limits, defaults
        self.created = protocol.now()

    def job(self, request: protocol.CompletionRequest, loop: asyncio.AbstractEventLoop):
        """The request's completions (n per prompt, in OpenAI's choice order) as a Job whose updates land in the
        returned asyncio queue; raises RequestError for a prompt too long for the model."""
        params = request.params
        encoded = [protocol.encode_prompt(p, self.tokenizer, self.limits, params.max_tokens) for p in request.prompts]
        uniforms = np.zeros((request.n, params.max_tokens), np.float32) if params.greedy else draws(params, request.n)
        completions = [
            Completion(
                index=i * request.n + j,
                prompt=prompt.ids,
                echo_from=prompt.echo_from,
                echo_text=prompt.text if params.echo else "",
                params=params,
                uniforms=uniforms[j],
            )
            for i, prompt in enumerate(encoded)
            for j in range(request.n)
        ]
        updates: asyncio.Queue[Update] = asyncio.Queue()
        return Job(completions, lambda update: loop.call_soon_threadsafe(updates.put_nowait, update)), updates


def build_app(server: Server) -> FastAPI:
    """The FastAPI app over a Server whose engine the caller starts and stops."""
    app = FastAPI(title="opt-lm serve", docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(protocol.error_body(str(error.detail), param=None), status_code=error.status_code)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return protocol.models_list(server.limits.model_name, server.created)

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model != server.limits.model_name:
            error = protocol.RequestError(f"The model `{model}` does not exist", "model", 404, "model_not_found")
            return JSONResponse(error.body(), status_code=404)
        return protocol.model_card(model, server.created)

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            return await _complete(server, request)
        except protocol.RequestError as error:
            return JSONResponse(error.body(), status_code=error.status)

    return app


async def _complete(server: Server, request: Request):
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise protocol.RequestError("We could not parse the JSON body of your request: it is not valid JSON") from None
    parsed = protocol.parse_completion_request(body, server.limits, server.defaults)
    job, updates = server.job(parsed, asyncio.get_running_loop())
    try:
        server.engine.submit(job)
    except EngineBusy as error:
        raise protocol.RequestError(str(error), status=503, kind="server_error", code="server_busy") from None
    response = _Response(server.limits.model_name, job, parsed)
    if parsed.stream:
        return StreamingResponse(_stream(response, updates), media_type="text/event-stream")
    return await _whole(response, updates, request)


class _Response:
    """One response's id and clock, and the choices' text, logprobs and usage as their updates arrive."""

    def __init__(self, model: str, job: Job, request: protocol.CompletionRequest):
        self.model, self.job, self.request = model, job, request
        self.id, self.created = protocol.completion_id(), protocol.now()
        count = len(job.completions)
        self.texts, self.entries = [""] * count, [[] for _ in range(count)]
        self.finish: list[str | None] = [None] * count
        self.prompt_tokens = self.completion_tokens = 0
        self.with_logprobs = request.params.logprobs is not None

    @property
    def done(self) -> bool:
        return all(reason is not None for reason in self.finish)

    def add(self, update: Update) -> None:
        if update.error is not None:
            self.job.cancel()
            raise _EngineFailed(update.error)
        self.texts[update.index] += update.text
        self.entries[update.index].extend(update.logprobs)
        if update.finish_reason is not None:
            self.finish[update.index] = update.finish_reason
            self.prompt_tokens += update.prompt_tokens
            self.completion_tokens += update.completion_tokens

    def whole(self) -> dict:
        choices = [
            protocol.choice(i, text, self._logprobs(entries), reason)
            for i, (text, entries, reason) in enumerate(zip(self.texts, self.entries, self.finish))
        ]
        usage = protocol.usage(self._prompt_tokens(), self.completion_tokens)
        return protocol.completion_object(self.id, self.created, self.model, choices, usage)

    def chunk(self, update: Update) -> dict:
        item = protocol.choice(update.index, update.text, self._logprobs(update.logprobs), update.finish_reason)
        return protocol.completion_object(self.id, self.created, self.model, [item], None)

    def usage_chunk(self) -> dict:
        usage = protocol.usage(self._prompt_tokens(), self.completion_tokens)
        return protocol.completion_object(self.id, self.created, self.model, [], usage)

    def _prompt_tokens(self) -> int:
        return self.prompt_tokens // self.request.n  # each prompt counts once, not once per choice (as OpenAI)

    def _logprobs(self, entries) -> dict | None:
        return protocol.logprobs_object(entries) if self.with_logprobs else None


class _EngineFailed(Exception):
    pass


async def _whole(response: _Response, updates: asyncio.Queue, request: Request) -> JSONResponse:
    """Waits for every choice to finish; cancels the job if the client goes away meanwhile (checked every
    DISCONNECT_POLL_S, whether updates arrive or not)."""
    loop = asyncio.get_running_loop()
    next_check = loop.time() + DISCONNECT_POLL_S
    try:
        while not response.done:
            with contextlib.suppress(asyncio.TimeoutError):  # no update yet: check the client
                response.add(await asyncio.wait_for(updates.get(), DISCONNECT_POLL_S))
            if loop.time() >= next_check:
                next_check = loop.time() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    response.job.cancel()
                    return JSONResponse(protocol.error_body("client disconnected"), status_code=499)
    except _EngineFailed as error:
        return JSONResponse(protocol.error_body(f"the model failed: {error}", "server_error"), status_code=500)
    return JSONResponse(response.whole())


async def _stream(response: _Response, updates: asyncio.Queue) -> AsyncIterator[str]:
    """Server-sent events: one chunk per update (its text may be empty), then the usage chunk when asked for,
    then `data: [DONE]`. Leaving early (the client disconnected) cancels the job."""
    try:
        while not response.done:
            update = await updates.get()
            try:
                response.add(update)
            except _EngineFailed as error:
                yield _event(protocol.error_body(f"the model failed: {error}", "server_error"))
                return
            if update.text or update.logprobs or update.finish_reason is not None:
                yield _event(response.chunk(update))
        if response.request.include_usage:
            yield _event(response.usage_chunk())
        yield "data: [DONE]\n\n"
    finally:
        response.job.cancel()  # a no-op once every choice has finished; frees the rows otherwise


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_server(framework: str, model, tokenizer, model_name: str, slots: int, max_length: int | None = None,
                  max_waiting: int = 256) -> Server:  # fmt: skip
    """A Server over a loaded causal LM of `framework`: its step model, an engine (warmed up, not started), the
    limits and the model's generation defaults.

    Args:
        framework: "torch", "tf" or "flax".
        model: the framework's loaded causal LM.
        tokenizer: its OPTTokenizer.
        model_name: the name requests give as `model`.
        slots: rows decoded together (the most completions in flight).
        max_length: positions per row (prompt + completion); the model's max_position_embeddings when None.
        max_waiting: completions that may wait for a row before requests are refused with 503.
    """
    from opt_core.generation import GenerationConfig
    from opt_serve.steps import step_model

    config = model.config
    max_length = min(max_length or config.max_position_embeddings, config.max_position_embeddings)
    step = step_model(framework, model, slots, max_length)
    step.prefill(0, np.array([config.bos_token_id or 0]), 1, False)  # compiles (TF, Flax) before the first request
    step.decode(np.zeros(slots, np.int64), np.zeros(slots, np.int64))
    engine = Engine(step, tokenizer, max_waiting)
    limits = protocol.Limits(model_name, config.vocab_size, max_length, slots)
    defaults = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(config)
    return Server(engine, tokenizer, limits, defaults)
