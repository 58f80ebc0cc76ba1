"""Training and fine-tuning a causal OPT on text files, in Flax with optax: `opt-lm train` and `train(TrainConfig)`.

AdamW with linear warmup then cosine decay, gradient clipping by global norm, periodic checkpoints (the model in
HF's layout, the optimizer state and the tokenizer, committed together so that a crash never mixes two steps) and
resume, a progress bar with loss and tokens/s on stderr, held-out perplexity, and a JSON-lines log. The result is
a folder that all three frameworks (and HF transformers) load.

Data: every file's text is tokenized (no special tokens) and the files are joined with `</s>`, OPT's document
separator; the stream is cut into rows of `seq_len` tokens, each starting with `</s>` as OPT's tokenizer starts
every prompt. The held-out set is `eval_files`, or else the last 2% of the stream.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from opt_core.config import OPTConfig
from opt_core.errors import ConfigError
from opt_core.files import complete_interrupted_save
from opt_core.generation import GenerationConfig
from opt_core.pretrained import save_pretrained as save_folder
from opt_core.tokenizer import OPTTokenizer, train_bpe_tokenizer
from opt_flax.modeling import FlaxOPTForCausalLM
from opt_flax.pretrained import params_to_canonical

CHECKPOINT_NAME = "training_state.msgpack"
LOG_NAME = "training_log.jsonl"


@dataclasses.dataclass
class TrainConfig:
    """Options of a training run (the `opt-lm train` flags).

    Args:
        train_files: UTF-8 text files to train on.
        output: the folder written: model, tokenizer, generation config, log and resumable state.
        eval_files: held-out text; None holds out the last 2% of the training stream.
        init_from: fine-tune this folder or hub id; None trains a fresh model.
        config: config.json path or preset name for a fresh model; None uses a small default shape.
        tokenizer: tokenizer folder; None reuses init_from's, or trains a BPE of `vocab_size` on the data.
        steps, batch_size, seq_len: optimisation steps and the rows x tokens of each batch.
        learning_rate, warmup_steps, weight_decay, clip_norm: AdamW with warmup + cosine decay (to 10%).
        eval_every, save_every: steps between held-out evaluations and between checkpoints.
        resume: continue from `output`'s checkpoint.
        save_dtype: dtype of the saved weights.
        seed: seeds initialisation, dropout and data order.
    """

    train_files: list[Path]
    output: Path
    eval_files: list[Path] | None = None
    init_from: str | None = None
    config: str | None = None
    tokenizer: str | None = None
    vocab_size: int = 4096
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    eval_every: int = 200
    save_every: int = 500
    resume: bool = False
    save_dtype: str = "float32"
    seed: int = 0


# A small default shape: ~3.4M parameters with a 4096-token vocabulary (under 7 MB in float16).
SMALL_SHAPE = dict(
    hidden_size=224,
    num_hidden_layers=4,
    num_attention_heads=4,
    ffn_dim=896,
    max_position_embeddings=256,
    dropout=0.0,
)


# ----- data


def token_stream(tokenizer: OPTTokenizer, files: list[Path]) -> np.ndarray:
    """All files' tokens, each file followed by `</s>` (OPT's document separator)."""
    pieces = []
    for file in files:
        text = Path(file).read_text(encoding="utf-8")
        pieces.append(np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int32))
        pieces.append(np.asarray([tokenizer.eos_token_id], dtype=np.int32))
    return np.concatenate(pieces)


def rows(stream: np.ndarray, seq_len: int, bos: int) -> np.ndarray:
    """N x seq_len rows, each `</s>` followed by seq_len - 1 tokens of the stream."""
    body = seq_len - 1
    count = len(stream) // body
    if count == 0:
        raise ConfigError(f"the text has {len(stream)} tokens, fewer than one row of seq_len={seq_len}")
    chunks = stream[: count * body].reshape(count, body)
    return np.concatenate([np.full((count, 1), bos, dtype=np.int32), chunks], axis=1)


def split_data(cfg: TrainConfig, tokenizer: OPTTokenizer) -> tuple[np.ndarray, np.ndarray]:
    stream = token_stream(tokenizer, cfg.train_files)
    if cfg.eval_files:
        held_out = token_stream(tokenizer, cfg.eval_files)
    else:
        cut = int(len(stream) * 0.98)
        stream, held_out = stream[:cut], stream[cut:]
    bos = tokenizer.bos_token_id
    return rows(stream, cfg.seq_len, bos), rows(held_out, cfg.seq_len, bos)


# ----- model, tokenizer, optimizer


def build_tokenizer(cfg: TrainConfig) -> OPTTokenizer:
    if cfg.tokenizer or cfg.init_from:
        return OPTTokenizer.from_pretrained(cfg.tokenizer or cfg.init_from)
    # Trained aside: the output folder gets the tokenizer's files only in a checkpoint's commit, with the weights.
    with tempfile.TemporaryDirectory() as folder:
        return train_bpe_tokenizer([str(f) for f in cfg.train_files], cfg.vocab_size, folder)


def build_model(cfg: TrainConfig, tokenizer: OPTTokenizer) -> FlaxOPTForCausalLM:
    if cfg.init_from:
        return FlaxOPTForCausalLM.from_pretrained(cfg.init_from)
    if cfg.config and Path(cfg.config).is_file():
        config = OPTConfig.from_pretrained(cfg.config)
    elif cfg.config:
        config = OPTConfig.from_preset(cfg.config)
    else:
        config = OPTConfig(**SMALL_SHAPE)
    config = config.replace(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if cfg.seq_len > config.max_position_embeddings:
        raise ConfigError(f"seq_len {cfg.seq_len} exceeds max_position_embeddings {config.max_position_embeddings}")
    return FlaxOPTForCausalLM(config, seed=cfg.seed)


def build_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1), cfg.learning_rate * 0.1
    )
    # Decay matrices only: biases, norm scales and (as usual for LMs) nothing one-dimensional.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


# ----- steps


def causal_lm_loss(model: FlaxOPTForCausalLM, params, batch, dropout_rng=None) -> jax.Array:
    """Mean next-token cross-entropy over every position of the batch (B T int32)."""
    train = dropout_rng is not None
    logits = model(batch, params=params, train=train, dropout_rng=dropout_rng).logits[:, :-1]  # B T-1 V
    targets = batch[:, 1:]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1).mean()


def make_steps(model: FlaxOPTForCausalLM, optimizer: optax.GradientTransformation):
    @jax.jit
    def train_step(params, opt_state, batch, rng):
        dropout_rng = rng if model.config.dropout > 0 else None
        loss, grads = jax.value_and_grad(lambda p: causal_lm_loss(model, p, batch, dropout_rng))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def eval_step(params, batch):
        return causal_lm_loss(model, params, batch)

    return train_step, eval_step


def evaluate(eval_step, params, held_out: np.ndarray, batch_size: int) -> float:
    """Perplexity over the held-out rows (whole batches; the remainder is dropped for static shapes)."""
    batches = max(len(held_out) // batch_size, 1)
    losses = [float(eval_step(params, held_out[i * batch_size : (i + 1) * batch_size])) for i in range(batches)]
    return math.exp(float(np.mean(losses)))


# ----- checkpoints


def save_state(
    cfg: TrainConfig, model, params, opt_state, step: int, tokenizer_files: Mapping[str, bytes] | None = None
) -> None:
    """The model in HF's layout, its generation config, the optimizer state and step to resume from, and the
    tokenizer's files, in one commit (`opt_core.files.FolderCommit`): a crash at any moment leaves the previous
    checkpoint or this one, never the weights of one step beside the optimizer state of another."""
    state = flax.serialization.to_bytes({"step": step, "opt_state": opt_state})
    save_folder(
        cfg.output,
        params_to_canonical(params, model.config, model.head),
        model.config,
        model.head,
        architecture=type(model).__name__.removeprefix("Flax"),  # HF names the torch class
        generation_config=GenerationConfig.from_model_config(model.config),
        fmt="safetensors",
        dtype=cfg.save_dtype,
        extra_files={CHECKPOINT_NAME: state, **(tokenizer_files or {})},
    )


def tokenizer_files(tokenizer: OPTTokenizer) -> dict[str, bytes]:
    """{file name: bytes} of the tokenizer's folder, committed with every checkpoint."""
    with tempfile.TemporaryDirectory() as folder:
        return {Path(path).name: Path(path).read_bytes() for path in tokenizer.save_pretrained(folder)}


def restore_state(cfg: TrainConfig, params, opt_state) -> tuple[Any, Any, int]:
    complete_interrupted_save(cfg.output)  # a checkpoint killed after its commit point is finished first
    path = cfg.output / CHECKPOINT_NAME
    if not path.is_file():
        raise ConfigError(f"--resume: {path} does not exist; train without --resume first")
    params = FlaxOPTForCausalLM.from_pretrained(cfg.output).params
    state = flax.serialization.from_bytes({"step": 0, "opt_state": opt_state}, path.read_bytes())
    return params, state["opt_state"], int(state["step"])


# ----- the loop


def train(cfg: TrainConfig) -> dict:
    """Runs the training described by `cfg`; returns the final metrics. Also written to `output/training_log.jsonl`."""
    cfg = dataclasses.replace(cfg, output=Path(cfg.output), train_files=[Path(f) for f in cfg.train_files])
    cfg.output.mkdir(parents=True, exist_ok=True)
    complete_interrupted_save(cfg.output)
    tokenizer = build_tokenizer(cfg)
    tokenizer_bytes = tokenizer_files(tokenizer)  # written with each checkpoint, never on their own
    train_rows, held_out = split_data(cfg, tokenizer)
    model = build_model(cfg, tokenizer)
    optimizer = build_optimizer(cfg)
    params, opt_state, start = model.params, optimizer.init(model.params), 0
    if cfg.resume:
        params, opt_state, start = restore_state(cfg, params, opt_state)
    train_step, eval_step = make_steps(model, optimizer)
    log = _Log(cfg, resume=cfg.resume)
    log.write(
        event="start",
        train_rows=len(train_rows),
        held_out_rows=len(held_out),
        step=start,
        parameters=sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)),
    )
    order = np.random.default_rng(cfg.seed).permutation(len(train_rows))
    rng = jax.random.PRNGKey(cfg.seed)
    progress = _Progress(cfg.steps, start)
    for step in range(start, cfg.steps):
        picks = order[(np.arange(cfg.batch_size) + step * cfg.batch_size) % len(order)]
        params, opt_state, loss = train_step(params, opt_state, train_rows[picks], jax.random.fold_in(rng, step))
        progress.update(step + 1, float(loss), cfg.batch_size * cfg.seq_len)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            perplexity = evaluate(eval_step, params, held_out, cfg.batch_size)
            log.write(
                event="eval",
                step=step + 1,
                loss=float(loss),
                held_out_perplexity=perplexity,
                tokens_per_s=progress.rate,
            )
        if (step + 1) % cfg.save_every == 0:
            save_state(cfg, model, params, opt_state, step + 1, tokenizer_bytes)
    progress.close()
    save_state(cfg, model, params, opt_state, cfg.steps, tokenizer_bytes)
    final = {"step": cfg.steps, "held_out_perplexity": evaluate(eval_step, params, held_out, cfg.batch_size)}
    log.write(event="end", **final)
    return final


class _Log:
    def __init__(self, cfg: TrainConfig, resume: bool):
        self.path = cfg.output / LOG_NAME
        if not resume:
            self.path.write_text("")

    def write(self, **record) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if record.get("event") == "eval":
            print(
                f"step {record['step']}: loss {record['loss']:.3f}, held-out perplexity "
                f"{record['held_out_perplexity']:.2f}",
                file=sys.stderr,
                flush=True,
            )


class _Progress:
    """A progress bar on stderr with the loss (smoothed) and tokens per second."""

    def __init__(self, total: int, start: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, file=sys.stderr, unit="step", dynamic_ncols=True)
        self.smoothed, self.tokens, self.started, self.rate = None, 0, time.perf_counter(), 0.0

    def update(self, step: int, loss: float, tokens: int) -> None:
        self.smoothed = loss if self.smoothed is None else 0.98 * self.smoothed + 0.02 * loss
        self.tokens += tokens
        self.rate = self.tokens / (time.perf_counter() - self.started)
        self.bar.set_postfix(loss=f"{self.smoothed:.3f}", tok_s=f"{self.rate:,.0f}", refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()
