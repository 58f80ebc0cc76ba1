"""Continuous batching over a static cache, framework-free: the scheduler the server runs in one background thread.

The model side is a `StepModel` (one per framework: `opt_serve.torch_step`, `opt_serve.tf_step`,
`opt_serve.flax_step`) that owns a static cache of `slots` rows of `max_length` positions and does two things:
prefill one prompt into one row, and run one decode step for every row at once, each row at its own position.
Everything else happens here, in numpy, between steps: a waiting completion takes a free row at the next step,
picks its tokens (`opt_serve.sampling`), tracks its text (`opt_serve.text`), and gives its row back the step it
stops (eos, a stop string, max_tokens) or its client goes away. Rows are packed from position 0, so a row's next
slot is its position, and a greedy completion reads the same cache a batch of one would.

Updates go to each request's `sink` from the engine thread; the server hands them to its event loop.
Everything is bounded: the rows, the completions waiting for a row, and each wait of the thread.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import heapq
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Protocol

import numpy as np

from opt_serve import sampling
from opt_serve.text import TextTracker, token_string


class StepModel(Protocol):
    """What the engine needs from a framework: a static cache of `slots` rows x `max_length` positions."""

    slots: int
    max_length: int

    def prefill(self, slot: int, prompt: np.ndarray, new_tokens: int, all_logits: bool) -> np.ndarray:
        """Writes the T0 prompt ids into row `slot` (positions 0 .. T0-1); returns float32 logits, T0 V when
        all_logits else 1 V (the last position's). `new_tokens` is how many may follow (a hint for the size)."""

    def decode(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One token for each of the rows 0 .. B-1 (B <= slots ids) written at its row's position (B); returns
        B V float32 logits. Each row attends to its positions 0 .. position; rows nobody uses get any token at
        position 0. A step model may run all its slots whatever B is (compiled programs keep one shape)."""


def prompt_bucket(length: int, max_length: int, smallest: int = 16) -> int:
    """A prompt's padded length for compiled prefills (one program per bucket, not per length): the next power of
    two from `smallest`, at most max_length."""
    size = smallest
    while size < length:
        size *= 2
    return min(size, max_length)


def padded_prompt(prompt: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids 1 x bucket, mask 1 x max_length) of one prompt for a compiled prefill: the ids right-padded to their
    `prompt_bucket`, the mask over every cache slot with ones on the prompt's."""
    length = len(prompt)
    padded = np.zeros((1, prompt_bucket(length, max_length)), np.int32)
    padded[0, :length] = prompt
    mask = np.zeros((1, max_length), np.int32)
    mask[0, :length] = 1
    return padded, mask


def pad_to_slots(values: np.ndarray, slots: int) -> np.ndarray:
    """B per-row values padded with zeros to every slot (unused rows: token 0 at position 0), for step models
    whose compiled decode keeps one shape."""
    return np.pad(values, (0, slots - len(values)))


class EngineBusy(Exception):
    """More completions are waiting than the engine accepts; the request should be retried later."""


@dataclasses.dataclass
class TokenLogprob:
    """One token of OpenAI's `logprobs` object: its text, log-probability, alternatives and character offset."""

    token: str
    logprob: float | None
    top: dict[str, float] | None
    offset: int


@dataclasses.dataclass
class Update:
    """What one completion produced since its last update."""

    index: int  # the choice's index in the response
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None  # "stop" or "length" on its last update
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # the engine failed on this completion (its last update)


@dataclasses.dataclass
class Completion:
    """One choice: a prompt (as the model sees it), how to sample, and what it has produced.

    Args:
        index: the choice's index in the response.
        prompt: the prompt ids the model runs (a string prompt starts with `</s>`, as generate's).
        echo_from: the first prompt position echoed back (1 skips the `</s>` the server added).
        echo_text: the prompt's text as echoed.
        params: sampling and stopping.
        uniforms: max_tokens draws for sampling.
    """

    index: int
    prompt: list[int]
    echo_from: int
    echo_text: str
    params: sampling.SamplingParams
    uniforms: np.ndarray
    output: list[int] = dataclasses.field(default_factory=list)
    slot: int | None = None
    finish_reason: str | None = None
    tracker: TextTracker | None = None


class Job:
    """One request's completions, where their updates go, and whether its client has gone.

    Args:
        completions: the request's choices.
        sink: called with each `Update`, from the engine thread.
    """

    def __init__(self, completions: list[Completion], sink: Callable[[Update], None]):
        self.completions, self.sink = completions, sink
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    """The scheduler: admits waiting completions into free rows, steps the batch, routes updates.

    Args:
        model: the framework's StepModel.
        tokenizer: decodes the text and the logprobs' token strings.
        max_waiting: completions allowed to wait for a row; `submit` raises EngineBusy beyond it.
    """

    def __init__(self, model: StepModel, tokenizer, max_waiting: int = 256):
        self.model, self.tokenizer, self.max_waiting = model, tokenizer, max_waiting
        self.waiting: collections.deque[tuple[Job, Completion]] = collections.deque()
        self.active: dict[int, tuple[Job, Completion]] = {}  # slot -> its completion
        self.free = list(range(model.slots))  # a heap: completions take the lowest free row
        self.lock = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.steps = 0  # decode steps run (tests and benchmarks read it)

    # ----- the server's side

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="opt-serve-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queues a request's completions; raises EngineBusy when too many wait already."""
        with self.lock:
            if len(self.waiting) + len(job.completions) > self.max_waiting:
                raise EngineBusy(f"{len(self.waiting)} completions are waiting for a batch row; try again later")
            self.waiting.extend((job, completion) for completion in job.completions)
            self.lock.notify()

    # ----- the engine thread

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.stopping and not self.waiting and not self.active:
                    self.lock.wait(timeout=1.0)
                if self.stopping:
                    return
            try:
                self._drop_cancelled()
                self._admit()
                if self.active:
                    self._step()
            except Exception as error:  # a bug in the bookkeeping: end what is in flight, keep serving
                for slot in list(self.active):
                    self._fail(slot, error)

    def _drop_cancelled(self) -> None:
        for slot, (job, _) in list(self.active.items()):
            if job.cancelled.is_set():
                self._release(slot)

    def _admit(self) -> None:
        """Prefills waiting completions into free rows; each picks its first token from its prompt's logits."""
        while self.free:
            with self.lock:
                if not self.waiting:
                    return
                job, completion = self.waiting.popleft()
            if job.cancelled.is_set():
                continue
            slot = heapq.heappop(self.free)
            completion.slot = slot
            self.active[slot] = (job, completion)
            try:
                self._prefill(job, completion)
            except Exception as error:  # the model failed on this prompt: tell its client, keep serving
                self._fail(slot, error)

    def _prefill(self, job: Job, completion: Completion) -> None:
        params = completion.params
        prompt_logprobs = params.echo and params.logprobs is not None
        logits = self.model.prefill(
            completion.slot, np.asarray(completion.prompt, np.int64), params.max_tokens, prompt_logprobs
        )
        completion.tracker = TextTracker(self.tokenizer, params.stop)
        echoed = self._echo_logprobs(completion, logits) if prompt_logprobs else []
        self._advance(job, completion, logits[-1], echoed)

    def _step(self) -> None:
        """One decode step for the rows up to the highest in use; then each active completion picks its next token."""
        rows = max(self.active) + 1
        tokens, positions = np.zeros(rows, np.int64), np.zeros(rows, np.int64)
        for slot, (_, completion) in self.active.items():
            tokens[slot] = completion.output[-1]
            positions[slot] = len(completion.prompt) + len(completion.output) - 1
        try:
            logits = self.model.decode(tokens, positions)
        except Exception as error:  # every active completion ends with the error; the engine goes on
            for slot in list(self.active):
                self._fail(slot, error)
            return
        self.steps += 1
        for slot, (job, completion) in list(self.active.items()):
            try:
                self._advance(job, completion, logits[slot], [])
            except Exception as error:  # this completion ends with the error; the others go on
                self._fail(slot, error)

    def _advance(self, job: Job, completion: Completion, logits: np.ndarray, logprobs: list[TokenLogprob]) -> None:
        """Picks the completion's next token, updates its text and state, and sends what it produced."""
        params, tracker = completion.params, completion.tracker
        scores = sampling.process_logits(logits, completion.prompt, completion.output, params)
        token = sampling.choose(scores, params, float(completion.uniforms[len(completion.output)]))
        completion.output.append(token)
        if token in params.eos_ids:
            completion.finish_reason = "stop"
        else:
            offset = tracker.add(token)
            if params.logprobs is not None:
                logprobs.append(self._token_logprob(token, logits, params.logprobs, offset, completion))
            if tracker.stopped:
                completion.finish_reason = "stop"
        if completion.finish_reason is None and len(completion.output) >= params.max_tokens:
            completion.finish_reason = "length"
        text = tracker.release(final=completion.finish_reason is not None)
        if completion.echo_text and len(completion.output) == 1:
            text = completion.echo_text + text
        self._send(job, completion, text, logprobs)
        if completion.finish_reason is not None:
            self._release(completion.slot)

    def _token_logprob(self, token, logits, count, offset, completion: Completion) -> TokenLogprob:
        log_probs = sampling.log_softmax(logits)
        return self._entry(token, log_probs, count, offset + len(completion.echo_text))

    def _entry(self, token: int, log_probs: np.ndarray, count: int, offset: int) -> TokenLogprob:
        top = {token_string(self.tokenizer, t): lp for t, lp in sampling.top_alternatives(log_probs, count)}
        text = token_string(self.tokenizer, token)
        top.setdefault(text, float(log_probs[token]))  # OpenAI always reports the chosen token too
        return TokenLogprob(text, float(log_probs[token]), top, offset)

    def _echo_logprobs(self, completion: Completion, logits: np.ndarray) -> list[TokenLogprob]:
        """The echoed prompt tokens' entries: each scored by the logits of the position before it (None for a
        first token, which nothing predicts)."""
        prompt, count = completion.prompt, completion.params.logprobs
        entries = []
        for position in range(completion.echo_from, len(prompt)):
            offset = len(self.tokenizer.decode(prompt[completion.echo_from : position], skip_special_tokens=True))
            if position == 0:
                entries.append(TokenLogprob(token_string(self.tokenizer, prompt[0]), None, None, offset))
            else:
                entries.append(self._entry(prompt[position], sampling.log_softmax(logits[position - 1]), count, offset))
        return entries

    def _send(self, job: Job, completion: Completion, text: str, logprobs: list[TokenLogprob]) -> None:
        update = Update(completion.index, text, logprobs, completion.finish_reason)
        if completion.finish_reason is not None:
            update.prompt_tokens, update.completion_tokens = len(completion.prompt), len(completion.output)
        job.sink(update)

    def _release(self, slot: int) -> None:
        del self.active[slot]
        heapq.heappush(self.free, slot)

    def _fail(self, slot: int, error: Exception) -> None:
        """Ends the completion in `slot` with the error (its client hears of it, if still there)."""
        job, completion = self.active[slot]
        print(f"opt-lm serve: the model failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        traceback.print_exc(file=sys.stderr)
        self._release(slot)
        with contextlib.suppress(Exception):  # e.g. the server's event loop has closed
            job.sink(Update(completion.index, "", [], "stop", error=f"{type(error).__name__}: {error}"))
