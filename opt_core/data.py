"""One data pipeline for fine-tuning in every framework: files -> token arrays -> batches -> metrics, numpy only.

Tokenization, blocking or padding, label mapping, the held-out split, the seeded order of batches and the evaluation
are computed here once, so `opt_torch`, `opt_tf` and `opt_flax` train on the same rows in the same order and report
the same numbers. The training loop (`opt_core.training`) consumes this interface:

    TASKS = ("causal-lm", "sequence-classification", "question-answering")
    load_task_data(task, train_files, eval_files, tokenizer, *, seq_len=128, max_length=384, stride=128,
                   eval_fraction=0.02, seed=0, pad_to_multiple_of=8, progress=None) -> TaskData
    batch_indices(num_rows, batch_size, step, seed, shuffle=True) -> np.ndarray      # [batch_size] row numbers
    eval_batches(num_rows, batch_size) -> list[np.ndarray]                           # eval rows, in order
    evaluate(data, outputs) -> dict[str, float]
    postprocess_qa_predictions(data, start_logits, end_logits, n_best_size=20, max_answer_length=30) -> {id: text}

`TaskData.train` / `.eval` hold row-aligned int32 arrays. Model inputs: `input_ids` [N, T] and `attention_mask`
[N, T]. Targets: `labels` (causal LM: the ids themselves, the model shifts them; classification: [N]), or
`start_positions` / `end_positions` [N] (QA, train only). QA eval rows also carry what post-processing needs:
`example_index` [N] (which of `eval_examples` the window is from) and `offset_mapping` [N, T, 2] (the characters of
each context token in its context; -1 for question, special and pad tokens).

Files are read with the `datasets` library, offline: `.csv`, `.json` / `.jsonl` (rows, or SQuAD's
`{"data": [rows]}`) and `.txt`; each file on its own, so that an error names it (and the row, counted from 0).

- causal-lm: column `text`. Each file's text (a `.txt` file is one document; a csv/json row is one) is tokenized
  without special tokens and followed by `</s>`, OPT's document separator; the stream is cut into rows of `seq_len`
  tokens, each `</s>` then `seq_len - 1` tokens of the stream (the Flax trainer's rows, unchanged). Without eval
  files, the last `eval_fraction` of the stream is held out, as that trainer did (0.02 gives its split).
- sequence-classification: columns `text`, optional `text_pair`, `label`. Int labels are kept (num_labels = the
  largest + 1); string labels become ids by sorted unique value, as HF's run_glue does, and `config_updates` carries
  `id2label` (OPTConfig derives `label2id` and writes both to config.json). Rows are truncated at `max_length` and
  right-padded, all to ONE length: the longest row of train and eval, rounded up to `pad_to_multiple_of`, at most
  `max_length`. One length for every batch and every framework keeps shapes static (no jit/XLA retracing per
  batch) without paying for `max_length` when texts are short; right padding because OPT's classifier pools the
  last token that is not pad (`opt_core.heads`).
- question-answering: SQuAD's columns `id`, `question`, `context`, `answers` ({"text": [...], "answer_start":
  [...]}; in csv a JSON string). As HF's run_qa: the question (left-stripped) then the context, only the context
  truncated, at `max_length` tokens, long contexts split into windows overlapping by `stride` tokens, every row
  padded to `max_length`; a training window's positions are those of the first answer's first and last tokens, or
  index 0 when the answer is not inside the window (or the question has none). HF's example points such windows at
  the CLS token, or at the bos where a tokenizer has no CLS; OPT has none, and index 0 always holds the `</s>` its
  tokenizer puts first, so index 0 is that same bos. Predictions are post-processed as HF's
  `postprocess_qa_predictions` (n-best 20, answers of at most 30 tokens); with unanswerable questions among the
  eval examples, the empty answer competes as in SQuAD v2.

Without eval files, classification and QA hold out a seeded `eval_fraction` of the examples (QA: all windows of a
question on the same side; classification labels are then those of all the examples, so a rare label drawn
only into the held-out part is not an unknown one); `eval_fraction=0` means no evaluation. Every error on bad input
is a ConfigError naming the file, the row and the column.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from opt_core import metrics
from opt_core.errors import ConfigError, InputError
from opt_core.scoring import right_padded
from opt_core.tokenizer import OPTTokenizer

TASKS = ("causal-lm", "sequence-classification", "question-answering")
BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".txt": "text"}
COLUMNS = {
    "causal-lm": ("text",),
    "sequence-classification": ("text", "label"),
    "question-answering": ("id", "question", "context", "answers"),
}
N_BEST_SIZE = 20
MAX_ANSWER_LENGTH = 30
_PROGRESS_ROWS = 20_000  # inputs with more rows than this get a progress bar on stderr
_CHUNK = 2_000


@dataclasses.dataclass
class TaskData:
    """A task's token arrays, computed once for every framework.

    Args:
        task: one of TASKS.
        train: row-aligned int32 arrays (see the module docstring for the keys).
        eval: the same keys for the held-out rows (QA: no positions, plus example_index and offset_mapping), or None.
        config_updates: fields for the model's config (classification: num_labels, id2label, problem_type).
        eval_examples: QA only: per eval question {"id", "context", "answers": [gold texts]}, for post-processing
            and the SQuAD metric; None for the other tasks.
        version_2_with_negative: QA only: some eval question has no answer, so the empty answer is a candidate.
    """

    task: str
    train: dict[str, np.ndarray]
    eval: dict[str, np.ndarray] | None
    config_updates: dict = dataclasses.field(default_factory=dict)
    eval_examples: list[dict] | None = None
    version_2_with_negative: bool = False

    @property
    def num_train_rows(self) -> int:
        return len(self.train["input_ids"])

    @property
    def num_eval_rows(self) -> int:
        return 0 if self.eval is None else len(self.eval["input_ids"])


# ----- the entry point


def load_task_data(
    task: str,
    train_files: Sequence[str | os.PathLike],
    eval_files: Sequence[str | os.PathLike] | None,
    tokenizer: OPTTokenizer,
    *,
    seq_len: int = 128,
    max_length: int = 384,
    stride: int = 128,
    eval_fraction: float = 0.02,
    seed: int = 0,
    pad_to_multiple_of: int = 8,
    progress: bool | None = None,
) -> TaskData:
    """Reads, tokenizes and lays out a task's data (see the module docstring for each task's rules).

    Args:
        task: "causal-lm", "sequence-classification" or "question-answering".
        train_files: csv / json / jsonl / txt files, read in order.
        eval_files: held-out files; None or empty holds out `eval_fraction` of the training data.
        tokenizer: the model's tokenizer.
        seq_len: causal LM: tokens per row, the leading `</s>` included.
        max_length: classification and QA: tokens per row at most (QA: exactly), bos included.
        stride: QA: tokens shared by consecutive windows of a long context.
        eval_fraction: the share held out when there are no eval files, in [0, 1).
        seed: seeds the held-out split of classification and QA examples.
        pad_to_multiple_of: classification: the padded length is rounded up to a multiple of this.
        progress: show a progress bar on stderr while tokenizing; None: only for large inputs.
    """
    if task not in TASKS:
        raise ConfigError(f"task must be one of {list(TASKS)}, got {task!r}")
    if not train_files:
        raise ConfigError("train_files is empty: give at least one file to train on")
    for name, value in (("seq_len", seq_len), ("max_length", max_length), ("pad_to_multiple_of", pad_to_multiple_of)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ConfigError(f"{name} must be an int of at least 2, got {value!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 0:
        raise ConfigError(f"stride must be a non-negative int, got {stride!r}")
    if not isinstance(eval_fraction, (int, float)) or not 0 <= eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    train = [read_file(path, task) for path in train_files]
    held_out = [read_file(path, task) for path in eval_files] if eval_files else None
    bar = _progress_factory(progress)
    if task == "causal-lm":
        return _causal_lm(train, held_out, tokenizer, seq_len, eval_fraction, bar)
    split = held_out is None and eval_fraction > 0
    if split:
        train, held_out = _split_examples(train, eval_fraction, seed)
    if task == "sequence-classification":
        return _classification(train, held_out, tokenizer, max_length, pad_to_multiple_of, bar, split)
    return _question_answering(train, held_out, tokenizer, max_length, stride, bar)


# ----- reading files


@dataclasses.dataclass
class _Rows:
    """The rows of one file (or of a held-out part of one): column -> values, and each row's number in the file."""

    path: str
    columns: dict[str, list]
    numbers: list[int]

    def where(self, index: int, column: str | None = None) -> str:
        return f"{self.path}, row {self.numbers[index]}" + (f", column {column!r}" if column else "")


def read_file(path: str | os.PathLike, task: str) -> _Rows:
    """One file's rows through `datasets`, offline; checks that the task's columns are there and the file has rows."""
    path = Path(path)
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ConfigError(f"{path}: cannot read {path.suffix or 'files without an extension'}; use {sorted(BUILDERS)}")
    if not path.is_file():
        raise ConfigError(f"{path} does not exist (or is not a file)")
    if builder == "text" and task != "causal-lm":
        raise ConfigError(f"{path}: a .txt file holds text only; {task} needs the columns {list(COLUMNS[task])}")
    options = {"sample_by": "document"} if builder == "text" else {}
    columns = _load(path, builder, options)
    if builder == "json" and "data" in columns and not set(COLUMNS[task]) & set(columns):
        columns = _load(path, builder, {"field": "data"})  # SQuAD's layout: {"version": ..., "data": [rows]}
    rows = len(next(iter(columns.values()), []))
    if rows == 0 or (builder == "text" and not columns["text"][0]):
        raise ConfigError(f"{path} is empty: it holds no rows")
    missing = [column for column in COLUMNS[task] if column not in columns]
    if missing:
        raise ConfigError(f"{path} has no column {missing[0]!r} ({task} needs {list(COLUMNS[task])}; the file has "
                          f"{sorted(columns)})")  # fmt: skip
    return _Rows(str(path), columns, list(range(rows)))


def _load(path: Path, builder: str, options: dict) -> dict[str, list]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"reading {path} needs the `datasets` library: pip install 'opt-lm[train]'") from None

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    # A fresh cache kept in memory: nothing is written under ~/.cache, and an edited file is never read stale.
    with tempfile.TemporaryDirectory() as cache:
        try:
            table = datasets.load_dataset(
                builder, data_files=[str(path)], split="train", cache_dir=cache, keep_in_memory=True, **options
            )
        except (Exception, StopIteration) as err:  # pyarrow's and pandas' parse errors, or no rows at all
            cause = err.__cause__ or err.__context__ or err
            detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            if isinstance(err, StopIteration) or "No columns to parse" in detail or "EmptyDataError" in detail:
                raise ConfigError(f"{path} is empty: it holds no rows") from None
            raise ConfigError(f"{path} cannot be read as {builder}: {detail}") from None
        return table.to_dict()


def _split_examples(files: list[_Rows], fraction: float, seed: int) -> tuple[list[_Rows], list[_Rows]]:
    """A seeded `fraction` of all the examples held out (at least one), both parts in file order."""
    total = sum(len(rows.numbers) for rows in files)
    held = max(1, round(total * fraction))
    if held >= total:
        raise ConfigError(f"eval_fraction={fraction} of {total} examples leaves none to train on; give --eval-files")
    chosen = np.zeros(total, dtype=bool)
    chosen[np.random.default_rng(seed).permutation(total)[:held]] = True
    train, evaluation, start = [], [], 0
    for rows in files:
        mask = chosen[start : start + len(rows.numbers)]
        start += len(rows.numbers)
        for part, keep in ((train, ~mask), (evaluation, mask)):
            if keep.any():
                picks = np.flatnonzero(keep)
                columns = {name: [values[i] for i in picks] for name, values in rows.columns.items()}
                part.append(_Rows(rows.path, columns, [rows.numbers[i] for i in picks]))
    return train, evaluation


def _progress_factory(progress: bool | None) -> Callable[[int, str], Any]:
    def bar(total: int, desc: str):
        show = progress if progress is not None else total > _PROGRESS_ROWS
        if not show:
            return None
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm comes with the [cli] extra; without it, no bar
            return None
        return tqdm(total=total, desc=desc, unit="row", file=sys.stderr, dynamic_ncols=True)

    return bar


def _tokenize(tokenizer: OPTTokenizer, bar, desc: str, texts: list[str], pairs: list[str] | None = None, **options):
    """The tokenizer over `texts` (and `pairs`) in chunks, so that large inputs show progress; outputs concatenated."""
    progress = bar(len(texts), desc)
    merged: dict[str, list] = {}
    for start in range(0, len(texts), _CHUNK):
        chunk_pairs = None if pairs is None else pairs[start : start + _CHUNK]
        encoding = tokenizer(texts[start : start + _CHUNK], chunk_pairs, **options)
        if "overflow_to_sample_mapping" in encoding:
            encoding["overflow_to_sample_mapping"] = [i + start for i in encoding["overflow_to_sample_mapping"]]
            encoding["sequence_ids"] = [encoding.sequence_ids(i) for i in range(len(encoding["input_ids"]))]
        for key, values in encoding.items():
            merged.setdefault(key, []).extend(values)
        if progress is not None:
            progress.update(len(texts[start : start + _CHUNK]))
    if progress is not None:
        progress.close()
    return merged


# ----- causal LM


def _causal_lm(train, held_out, tokenizer, seq_len, eval_fraction, bar) -> TaskData:
    stream = _token_stream(tokenizer, train, bar)
    if held_out:
        evaluation = _token_stream(tokenizer, held_out, bar)
    elif eval_fraction > 0:
        cut = int(len(stream) * (1 - eval_fraction))
        stream, evaluation = stream[:cut], stream[cut:]
    else:
        evaluation = None
    bos = tokenizer.bos_token_id
    train_ids = _blocks(stream, seq_len, bos, "the training text")
    eval_ids = None if evaluation is None else _blocks(evaluation, seq_len, bos, "the held-out text")
    return TaskData("causal-lm", _lm_features(train_ids), None if eval_ids is None else _lm_features(eval_ids))


def _token_stream(tokenizer: OPTTokenizer, files: list[_Rows], bar) -> np.ndarray:
    """Every document's tokens (no special tokens), each followed by `</s>` (OPT's document separator)."""
    pieces = []
    for rows in files:
        texts = _strings(rows, "text")
        for ids in _tokenize(tokenizer, bar, f"tokenizing {rows.path}", texts, add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(ids, dtype=np.int32))
            pieces.append(np.asarray([tokenizer.eos_token_id], dtype=np.int32))
    return np.concatenate(pieces)


def _blocks(stream: np.ndarray, seq_len: int, bos: int, what: str) -> np.ndarray:
    """N x seq_len rows, each `</s>` followed by seq_len - 1 tokens of the stream; the remainder is dropped."""
    body = seq_len - 1
    count = len(stream) // body
    if count == 0:
        raise ConfigError(f"{what} has {len(stream)} tokens, fewer than one row of seq_len={seq_len}")
    chunks = stream[: count * body].reshape(count, body)
    return np.concatenate([np.full((count, 1), bos, dtype=np.int32), chunks], axis=1)


def _lm_features(ids: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}


def _strings(rows: _Rows, column: str) -> list[str]:
    values = rows.columns[column]
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise ConfigError(f"{rows.where(index, column)}: expected a string, got {value!r}")
    return values


# ----- sequence classification


def _classification(train, held_out, tokenizer, max_length, multiple, bar, split: bool) -> TaskData:
    if tokenizer.pad_token_id is None:
        raise ConfigError("the tokenizer has no pad token; classification rows are padded (load it with pad_token=...)")
    train_labels = [(rows, index, _whole(label)) for rows in train for index, label in enumerate(rows.columns["label"])]
    eval_labels = [
        (rows, index, _whole(label)) for rows in held_out or [] for index, label in enumerate(rows.columns["label"])
    ]
    # A split of the training files is one label set: a rare label drawn only into the held-out part is no error.
    to_id, config_updates = _label_mapping(train_labels + eval_labels if split else train_labels, eval_labels)
    train_ids = _classification_ids(train, tokenizer, max_length, bar)
    eval_ids = None if held_out is None else _classification_ids(held_out, tokenizer, max_length, bar)
    longest = max(len(ids) for ids in train_ids + (eval_ids or []))
    length = min(max_length, -(-longest // multiple) * multiple)

    def features(ids: list[list[int]], labels: list) -> dict[str, np.ndarray]:
        input_ids, mask = right_padded(ids, tokenizer.pad_token_id, length, dtype=np.int32)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": np.asarray(labels, dtype=np.int32)}

    train_features = features(train_ids, [to_id(*item) for item in train_labels])
    eval_features = None if held_out is None else features(eval_ids, [to_id(*item) for item in eval_labels])
    return TaskData("sequence-classification", train_features, eval_features, config_updates)


def _whole(label: Any) -> Any:
    """1.0 -> 1: pyarrow reads a whole-number column as floats when another row holds 1.5 (refused then, by row)."""
    return int(label) if isinstance(label, float) and label.is_integer() else label


def _label_mapping(train_labels: list, eval_labels: list) -> tuple[Callable, dict]:
    """(rows, index, label) -> id, and the config fields: ints kept, strings by sorted unique value (run_glue);
    the labels are those of `train_labels`, which `eval_labels` must keep to."""
    kinds = set()
    for rows, index, label in train_labels + eval_labels:
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise ConfigError(f"{rows.where(index, 'label')}: a label must be an int or a string, got {label!r}")
        if isinstance(label, int) and label < 0:
            raise ConfigError(f"{rows.where(index, 'label')}: int labels are class ids, >= 0; got {label}")
        kinds.add(type(label))
    if len(kinds) > 1:
        rows, index, label = next(item for item in train_labels + eval_labels if not isinstance(item[2], str))
        raise ConfigError(f"labels mix ints and strings (e.g. {label!r} at {rows.where(index, 'label')}); use one kind")
    known = sorted({label for _, _, label in train_labels})
    if kinds == {int}:
        num_labels = known[-1] + 1
        unknown = sorted({label for _, _, label in eval_labels if label >= num_labels})
        label_ids = {label: label for label in range(num_labels)}
        updates = {"num_labels": num_labels}
    else:
        label_ids = {label: i for i, label in enumerate(known)}
        unknown = sorted({label for _, _, label in eval_labels if label not in label_ids})
        updates = {"num_labels": len(known), "id2label": dict(enumerate(known))}
    if unknown:
        raise ConfigError(f"the eval data has labels the training data lacks: {unknown[:10]} (known: {known[:10]})")
    updates["problem_type"] = "single_label_classification"
    return (lambda rows, index, label: label_ids[label]), updates


def _classification_ids(files: list[_Rows], tokenizer, max_length: int, bar) -> list[list[int]]:
    ids = []
    for rows in files:
        pairs = _strings(rows, "text_pair") if "text_pair" in rows.columns else None
        encoding = _tokenize(
            tokenizer, bar, f"tokenizing {rows.path}", _strings(rows, "text"), pairs, truncation=True,
            max_length=max_length,
        )  # fmt: skip
        ids.extend(encoding["input_ids"])
    return ids


# ----- question answering


def _question_answering(train, held_out, tokenizer, max_length, stride, bar) -> TaskData:
    train_examples = _qa_examples(train)
    train_features = _qa_features(train_examples, tokenizer, max_length, stride, bar, training=True)
    if held_out is None:
        return TaskData("question-answering", train_features, None)
    eval_examples = _qa_examples(held_out)
    ids = [example["id"] for example in eval_examples]
    if len(set(ids)) != len(ids):
        repeated = sorted({key for key in ids if ids.count(key) > 1})[:5]
        raise ConfigError(f"the eval questions' ids must be unique (predictions are keyed by id); repeated: {repeated}")
    eval_features = _qa_features(eval_examples, tokenizer, max_length, stride, bar, training=False)
    kept = [{key: example[key] for key in ("id", "context")} | {"answers": example["answers"]["text"]}
            for example in eval_examples]  # fmt: skip
    negative = any(not example["answers"] for example in kept)
    return TaskData("question-answering", train_features, eval_features, {}, kept, negative)


def _qa_examples(files: list[_Rows]) -> list[dict]:
    """Each row as {"id", "question", "context", "answers", "where"}, checked: every answer is at its answer_start."""
    examples = []
    for rows in files:
        questions, contexts = _strings(rows, "question"), _strings(rows, "context")
        for index, (key, answers) in enumerate(zip(rows.columns["id"], rows.columns["answers"])):
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise ConfigError(f"{rows.where(index, 'id')}: an id must be a string or an int, got {key!r}")
            answers = _answers(rows, index, answers, contexts[index])
            examples.append(dict(id=str(key), question=questions[index], context=contexts[index], answers=answers,
                                 where=rows.where(index)))  # fmt: skip
    return examples


def _answers(rows: _Rows, index: int, answers: Any, context: str) -> dict:
    where = rows.where(index, "answers")
    if isinstance(answers, str):  # csv holds the dict as JSON text
        try:
            answers = json.loads(answers)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"{where}: not JSON ({err}); SQuAD's answers are {{'text': [...], 'answer_start': [...]}}"
            ) from None
    if not isinstance(answers, dict) or not {"text", "answer_start"} <= set(answers):
        raise ConfigError(f"{where}: expected {{'text': [...], 'answer_start': [...]}}, got {answers!r:.200}")
    texts, starts = answers["text"], answers["answer_start"]
    if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
        raise ConfigError(f"{where}: 'text' and 'answer_start' must be lists of one length, got {answers!r:.200}")
    for text, start in zip(texts, starts):
        if not isinstance(text, str) or isinstance(start, bool) or not isinstance(start, int):
            raise ConfigError(f"{where}: an answer is a string with an int answer_start, got {text!r} at {start!r}")
        if start < 0 or context[start : start + len(text)] != text:
            found = context[max(start, 0) : max(start, 0) + len(text)]
            raise ConfigError(f"{where}: the answer {text!r} is not at answer_start {start} of the context "
                              f"(which has {found!r} there)")  # fmt: skip
    return {"text": texts, "answer_start": starts}


def _qa_features(examples, tokenizer, max_length, stride, bar, training: bool) -> dict[str, np.ndarray]:
    """HF run_qa's prepare_train_features / prepare_validation_features, with OPT's tokenizer."""
    questions = [example["question"].lstrip() for example in examples]  # as run_qa: leading spaces waste tokens
    contexts = [example["context"] for example in examples]
    _check_room(tokenizer, examples, questions, contexts, max_length, stride)
    encoding = _tokenize(
        tokenizer, bar, "tokenizing questions", questions, contexts, truncation="only_second", max_length=max_length,
        stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length",
    )  # fmt: skip
    samples = np.asarray(encoding["overflow_to_sample_mapping"], dtype=np.int32)
    features = {
        "input_ids": np.asarray(encoding["input_ids"], dtype=np.int32),
        "attention_mask": np.asarray(encoding["attention_mask"], dtype=np.int32),
    }
    offsets = np.asarray(encoding["offset_mapping"], dtype=np.int32).reshape(len(samples), max_length, 2)
    in_context = np.asarray([[sid == 1 for sid in row] for row in encoding["sequence_ids"]], dtype=bool)
    if not training:
        features["example_index"] = samples
        features["offset_mapping"] = np.where(in_context[..., None], offsets, -1).astype(np.int32)
        return features
    positions = [_answer_positions(examples[s]["answers"], offsets[i], in_context[i]) for i, s in enumerate(samples)]
    features["start_positions"] = np.asarray([start for start, _ in positions], dtype=np.int32).reshape(-1)
    features["end_positions"] = np.asarray([end for _, end in positions], dtype=np.int32).reshape(-1)
    return features


def _check_room(tokenizer, examples, questions, contexts, max_length: int, stride: int) -> None:
    """A question must leave the context more than `stride` tokens per window, or the windows cannot advance."""
    for i, ids in enumerate(tokenizer(questions, add_special_tokens=False)["input_ids"]):
        room = max_length - tokenizer.num_special_tokens_to_add(pair=True) - len(ids)
        if room > stride:
            continue
        context = len(tokenizer.encode(contexts[i], add_special_tokens=False))
        if room < context:  # only a context that has to be split needs the room
            raise ConfigError(
                f"{examples[i]['where']}: the question takes {len(ids)} tokens, leaving {room} of max_length="
                f"{max_length} for the context, not more than stride={stride}: raise max_length or lower stride"
            )


def _answer_positions(answers: dict, offsets: np.ndarray, in_context: np.ndarray) -> tuple[int, int]:
    """The window's first and last tokens of the first answer; (0, 0), the `</s>` bos, when it is not inside."""
    if not answers["answer_start"]:
        return 0, 0
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    context = np.flatnonzero(in_context)
    first, last = context[0], context[-1]
    if not (offsets[first, 0] <= start_char and offsets[last, 1] >= end_char):
        return 0, 0
    start = first
    while start < len(offsets) and offsets[start, 0] <= start_char:
        start += 1
    end = last
    while offsets[end, 1] >= end_char:
        end -= 1
    return int(start - 1), int(end + 1)


def postprocess_qa_predictions(
    data: TaskData,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best_size: int = N_BEST_SIZE,
    max_answer_length: int = MAX_ANSWER_LENGTH,
) -> dict[str, str]:
    """Answer texts from the eval windows' logits, as HF's `postprocess_qa_predictions`: per question the best
    scoring span (start + end logit) over its windows among each window's n-best starts and ends, inside the
    context, at most `max_answer_length` tokens; with `version_2_with_negative`, "" when the windows' best
    no-answer score (index 0) beats it.

    Args:
        data: a question-answering TaskData with eval rows.
        start_logits, end_logits: [N, T] for the N eval rows, in order.
        n_best_size: candidates per window for the start and for the end.
        max_answer_length: the longest answer, in tokens.

    Returns:
        question id -> answer text.
    """
    offsets, samples = data.eval["offset_mapping"], data.eval["example_index"]
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    windows: dict[int, list[int]] = {}
    for feature, sample in enumerate(samples):
        windows.setdefault(int(sample), []).append(feature)
    predictions = {}
    for index, example in enumerate(data.eval_examples):
        candidates, null = [], None
        for feature in windows.get(index, []):
            starts, ends, spans = start_logits[feature], end_logits[feature], offsets[feature]
            score = starts[0] + ends[0]
            if null is None or null > score:
                null = score
            best_starts = np.argsort(starts)[-1 : -n_best_size - 1 : -1]
            best_ends = np.argsort(ends)[-1 : -n_best_size - 1 : -1]
            for start in best_starts:
                for end in best_ends:
                    if spans[start, 0] < 0 or spans[end, 0] < 0 or end < start or end - start + 1 > max_answer_length:
                        continue
                    candidates.append((starts[start] + ends[end], int(spans[start, 0]), int(spans[end, 1])))
        predictions[example["id"]] = _best_answer(
            example["context"], candidates, null, data.version_2_with_negative, n_best_size
        )
    return predictions


def _best_answer(context: str, candidates: list, null: float | None, with_negative: bool, n_best_size: int) -> str:
    """HF's choice: the n-best of the spans (and, for SQuAD v2, the no-answer) by score, sorted stably as HF does
    (ties keep the earlier candidate); "empty" as HF's placeholder when nothing else is left."""
    entries = [(score, context[start:end]) for score, start, end in candidates]
    if with_negative and null is not None:
        entries.append((null, ""))
    entries = sorted(entries, key=lambda entry: entry[0], reverse=True)[:n_best_size]
    if not entries or (len(entries) == 1 and entries[0][1] == ""):
        entries.insert(0, (0.0, "empty"))
    if not with_negative:
        return entries[0][1]
    best = next((entry for entry in entries if entry[1] != ""), None)
    if best is None or null is None:
        return ""
    return "" if null - best[0] > 0 else best[1]  # the no-answer wins when it scores higher (threshold 0)


# ----- batches and evaluation


def batch_indices(num_rows: int, batch_size: int, step: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """The rows of training batch `step` (counted from 0): a pure function of its arguments.

    The batches walk through epochs back to back: epoch e is a permutation of all rows drawn from
    `default_rng([seed, e])` (or file order with `shuffle=False`), and batch `step` holds positions
    `step * batch_size ...` of that endless sequence, so every batch is full (static shapes) and a run resumed at
    step k sees exactly the batches an uninterrupted one does. A batch at an epoch boundary takes the end of one
    epoch and the start of the next.

    Args:
        num_rows: rows of training data.
        batch_size: rows per batch.
        step: the optimisation step.
        seed: the run's seed.
        shuffle: False keeps file order (`--no-shuffle`).
    """
    for name, value, low in (("num_rows", num_rows, 1), ("batch_size", batch_size, 1), ("step", step, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise InputError(f"{name} must be an int >= {low}, got {value!r}")
    positions = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    epochs, places = positions // num_rows, positions % num_rows
    if not shuffle:
        return places
    rows = np.empty_like(places)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([int(seed), int(epoch)]).permutation(num_rows)
        rows[epochs == epoch] = order[places[epochs == epoch]]
    return rows


def eval_batches(num_rows: int, batch_size: int) -> list[np.ndarray]:
    """The eval rows in order, `batch_size` at a time; the last batch may be shorter (pad it to keep shapes static,
    and drop the padded rows' outputs before `evaluate`)."""
    return [np.arange(start, min(start + batch_size, num_rows)) for start in range(0, num_rows, batch_size)]


def evaluate(data: TaskData, outputs: dict[str, Any]) -> dict[str, float]:
    """The task's metrics from the model's outputs over `data.eval`, rows in order.

    Args:
        data: the TaskData the outputs are of.
        outputs: causal-lm: {"loss": per-batch mean losses over equal batches} or {"loss_sum", "token_count"};
            sequence-classification: {"logits": [N, C]}; question-answering: {"start_logits", "end_logits": [N, T]}.
            A "loss" beside the logits is reported as eval_loss.

    Returns:
        causal-lm {"eval_loss", "perplexity"}; classification {"accuracy", "macro_f1"} (0..1); QA {"exact_match",
        "f1"} (percent, as SQuAD's script).
    """
    if data.eval is None:
        raise ConfigError("this TaskData has no eval rows (no eval files and eval_fraction=0)")
    result = {}
    if "loss" in outputs or "loss_sum" in outputs:
        result["eval_loss"] = _mean_loss(outputs)
    if data.task == "causal-lm":
        if "eval_loss" not in result:
            raise InputError("causal-lm evaluation needs outputs['loss'] or outputs['loss_sum'] and ['token_count']")
        return result | {"perplexity": metrics.perplexity(result["eval_loss"])}
    if data.task == "sequence-classification":
        logits = _rows_of(outputs, "logits", data.num_eval_rows, ndim=2)
        predictions = np.argmax(logits, axis=-1)
        labels = data.eval["labels"]
        return result | {
            "accuracy": metrics.accuracy(predictions, labels),
            "macro_f1": metrics.macro_f1(predictions, labels),
        }
    starts = _rows_of(outputs, "start_logits", data.num_eval_rows, ndim=2)
    ends = _rows_of(outputs, "end_logits", data.num_eval_rows, ndim=2)
    predictions = postprocess_qa_predictions(data, starts, ends)
    references = {example["id"]: example["answers"] for example in data.eval_examples}
    return result | metrics.squad_scores(predictions, references)


def _mean_loss(outputs: dict) -> float:
    if "loss_sum" in outputs:
        count = float(outputs.get("token_count", 0))
        if count <= 0:
            raise InputError("outputs['loss_sum'] needs a positive outputs['token_count']")
        return float(outputs["loss_sum"]) / count
    losses = np.asarray(outputs["loss"], dtype=np.float64).reshape(-1)
    if losses.size == 0:
        raise InputError("outputs['loss'] is empty")
    return float(losses.mean())


def _rows_of(outputs: dict, key: str, rows: int, ndim: int) -> np.ndarray:
    if key not in outputs:
        raise InputError(f"evaluation needs outputs[{key!r}]; got {sorted(outputs)}")
    value = np.asarray(outputs[key], dtype=np.float32)
    if value.ndim != ndim or len(value) != rows:
        raise InputError(f"outputs[{key!r}] has shape {value.shape}; expected {rows} rows (the eval rows), {ndim}-D")
    return value
