"""Tests of `opt_core.data` (the fine-tuning data pipeline), `opt_core.metrics` and the tokenizer's QA options.

Oracles: HF transformers' GPT2TokenizerFast loaded from the same vocabulary files, run through HF run_qa's
preparation and utils_qa's post-processing (copied below, trimmed to what OPT uses); a frozen copy of the Flax
trainer's causal-LM rows; hand-computed metric values. The files are tiny and written by the tests.
"""

from __future__ import annotations

import collections
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import transformers

from opt_core import data, metrics
from opt_core.errors import ConfigError, InputError
from opt_core.tokenizer import OPTTokenizer

MODEL = Path(__file__).resolve().parents[1] / "opt_cli" / "default_model"

CONTEXTS = [
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
    "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, under their "
    "leader Rollo, agreed to swear fealty to King Charles III of West Francia. Through generations of assimilation "
    "and mixing with the native Frankish and Roman-Gaulish populations, their descendants would gradually merge "
    "with the Carolingian-based cultures of West Francia.",
    "Ünïcode text – with “quotes” and emoji 😀 sits here. The treaty was signed in 1648 at Münster, ending the "
    "Thirty Years' War; the delegates had met for five years before the final signature was made.",
]
QUESTIONS = [
    ("n1", "In what country is Normandy located?", 0, "France"),
    ("n2", "  Who was the Norse leader?", 0, "Rollo"),
    ("n3", "What cultures did they merge with?", 0, "Carolingian-based cultures of West Francia"),
    ("u1", "Where was the treaty signed?", 1, "Münster"),
    ("u2", "How long did the delegates meet?", 1, "five years"),
]


@pytest.fixture(scope="session")
def tokenizer() -> OPTTokenizer:
    return OPTTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory):
    """HF's tokenizer from the same vocab.json / merges.txt (no tokenizer.json, as OPT's Hub repositories)."""
    folder = tmp_path_factory.mktemp("hub_style")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(MODEL / name, folder / name)
    return transformers.GPT2TokenizerFast.from_pretrained(folder)


def squad_rows(questions=QUESTIONS) -> list[dict]:
    rows = []
    for key, question, context, answer in questions:
        text = CONTEXTS[context]
        rows.append(
            dict(
                id=key,
                question=question,
                context=text,
                answers={"text": [answer], "answer_start": [text.index(answer)]},
            )
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# ----- the tokenizer's windows, offsets and sequence ids


def as_lists(value):
    """Nested lists of ints from arrays, lists and tuples (offsets are tuples in HF's lists)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return [as_lists(item) for item in value] if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize(("padding", "return_tensors"), [(False, None), ("max_length", None), ("max_length", "np")])
def test_tokenizer_windows_match_hf(tokenizer, hf_tokenizer, padding, return_tensors):
    questions = [question.lstrip() for _, question, _, _ in QUESTIONS]
    contexts = [CONTEXTS[context] for _, _, context, _ in QUESTIONS]
    options = dict(
        truncation="only_second", max_length=40, stride=12, return_overflowing_tokens=True,
        return_offsets_mapping=True, padding=padding, return_tensors=return_tensors,
    )  # fmt: skip
    ours, hf = tokenizer(questions, contexts, **options), hf_tokenizer(questions, contexts, **options)
    assert sorted(ours) == sorted(hf)
    for key in hf:
        assert as_lists(ours[key]) == as_lists(hf[key]), key
    assert len(hf["input_ids"]) > 2 * len(questions)  # several windows per context
    assert [ours.sequence_ids(i) for i in range(len(hf["input_ids"]))] == [
        hf.sequence_ids(i) for i in range(len(hf["input_ids"]))
    ]


def test_tokenizer_single_text_overflow_and_stride_errors(tokenizer, hf_tokenizer):
    options = dict(truncation=True, max_length=8, stride=3, return_overflowing_tokens=True)
    assert dict(tokenizer(CONTEXTS[1], **options)) == dict(hf_tokenizer(CONTEXTS[1], **options))
    assert tokenizer("a b", "c d")["input_ids"] == hf_tokenizer("a b", "c d")["input_ids"]  # unchanged default
    with pytest.raises(InputError, match="stride"):
        tokenizer(CONTEXTS[1], truncation=True, max_length=8, stride=7, return_overflowing_tokens=True)
    with pytest.raises(InputError, match="stride"):
        tokenizer("x", stride=-1)


# ----- causal LM: the Flax trainer's rows


def trainer_rows(tokenizer, train_files, eval_files, seq_len):
    """A frozen copy of opt_flax/train.py's split_data (token_stream + rows) as of 7d0a07c."""

    def token_stream(files):
        pieces = []
        for file in files:
            text = Path(file).read_text(encoding="utf-8")
            pieces.append(np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int32))
            pieces.append(np.asarray([tokenizer.eos_token_id], dtype=np.int32))
        return np.concatenate(pieces)

    def rows(stream):
        body = seq_len - 1
        count = len(stream) // body
        chunks = stream[: count * body].reshape(count, body)
        return np.concatenate([np.full((count, 1), tokenizer.bos_token_id, dtype=np.int32), chunks], axis=1)

    stream = token_stream(train_files)
    if eval_files:
        held_out = token_stream(eval_files)
    else:
        cut = int(len(stream) * 0.98)
        stream, held_out = stream[:cut], stream[cut:]
    return rows(stream), rows(held_out)


@pytest.mark.parametrize("with_eval_files", [False, True])
def test_causal_lm_blocks_equal_the_trainers(tokenizer, tmp_path, with_eval_files):
    texts = [" ".join(CONTEXTS) * 6, "Line one.\r\nLine two.\n\n  indented line\n" * 20, CONTEXTS[1] * 5]
    files = [tmp_path / f"doc{i}.txt" for i in range(3)]
    for file, text in zip(files, texts):
        file.write_bytes(text.encode("utf-8"))
    train_files, eval_files = (files[:2], files[2:]) if with_eval_files else (files, None)
    got = data.load_task_data("causal-lm", train_files, eval_files, tokenizer, seq_len=16)
    train, held_out = trainer_rows(tokenizer, train_files, eval_files, 16)
    assert np.array_equal(got.train["input_ids"], train) and np.array_equal(got.eval["input_ids"], held_out)
    assert np.array_equal(got.train["labels"], train) and got.train["attention_mask"].all()
    assert got.train["input_ids"].dtype == np.int32 and got.config_updates == {}


def test_causal_lm_rows_of_csv_and_json_are_documents(tokenizer, tmp_path):
    rows = [{"text": CONTEXTS[0]}, {"text": CONTEXTS[1]}]
    for path in (write_csv(tmp_path / "a.csv", rows), write_jsonl(tmp_path / "a.jsonl", rows)):
        got = data.load_task_data("causal-lm", [path], None, tokenizer, seq_len=8, eval_fraction=0)
        stream = []
        for row in rows:
            stream += tokenizer.encode(row["text"], add_special_tokens=False) + [2]
        count = len(stream) // 7
        expected = np.concatenate([np.full((count, 1), 2), np.asarray(stream[: count * 7]).reshape(count, 7)], 1)
        assert np.array_equal(got.train["input_ids"], expected) and got.eval is None


# ----- sequence classification


def test_string_labels_are_mapped_by_sorted_value(tokenizer, tmp_path):
    train = [
        {"text": "a fine film", "text_pair": "yes", "label": "positive"},
        {"text": "dull", "text_pair": "no", "label": "negative"},
        {"text": "so-so " * 3, "text_pair": "maybe", "label": "neutral"},
        {"text": "great", "text_pair": "yes", "label": "positive"},
    ]
    evaluation = [{"text": "bad", "text_pair": "no", "label": "negative"}]
    got = data.load_task_data(
        "sequence-classification", [write_csv(tmp_path / "t.csv", train)],
        [write_jsonl(tmp_path / "e.jsonl", evaluation)], tokenizer, max_length=64,
    )  # fmt: skip
    assert got.config_updates == {
        "num_labels": 3,
        "id2label": {0: "negative", 1: "neutral", 2: "positive"},
        "problem_type": "single_label_classification",
    }
    assert got.train["labels"].tolist() == [2, 0, 1, 2] and got.eval["labels"].tolist() == [0]
    ids = tokenizer([r["text"] for r in train], [r["text_pair"] for r in train])["input_ids"]
    length = max(map(len, ids))
    assert got.train["input_ids"].shape == (4, -(-length // 8) * 8) == got.train["attention_mask"].shape
    for row, expected in zip(got.train["input_ids"], ids):  # right padding with <pad>
        assert row[: len(expected)].tolist() == expected and (row[len(expected) :] == tokenizer.pad_token_id).all()
    assert got.train["attention_mask"].sum(1).tolist() == [len(i) for i in ids]
    assert got.eval["input_ids"].shape[1] == got.train["input_ids"].shape[1]  # one length for every batch


def test_int_labels_kept_truncation_and_split(tokenizer, tmp_path):
    rows = [{"text": f"text number {i} " * (i % 7 + 1), "label": i % 3} for i in range(40)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    got = data.load_task_data("sequence-classification", [path], None, tokenizer, max_length=12, eval_fraction=0.25)
    again = data.load_task_data("sequence-classification", [path], None, tokenizer, max_length=12, eval_fraction=0.25)
    other = data.load_task_data(
        "sequence-classification", [path], None, tokenizer, max_length=12, eval_fraction=0.25, seed=1
    )
    assert got.config_updates == {"num_labels": 3, "problem_type": "single_label_classification"}
    assert got.train["input_ids"].shape == (30, 12) and got.eval["input_ids"].shape == (10, 12)
    assert all(np.array_equal(got.eval[k], again.eval[k]) for k in got.eval)
    assert not np.array_equal(got.eval["input_ids"], other.eval["input_ids"])
    assert sorted(got.train["labels"].tolist() + got.eval["labels"].tolist()) == sorted(r["label"] for r in rows)


def test_label_errors_name_file_row_and_labels(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    unknown = write_jsonl(tmp_path / "e.jsonl", [{"text": "a", "label": "z"}])
    with pytest.raises(ConfigError, match=r"labels the training data lacks: \['z'\]"):
        data.load_task_data("sequence-classification", [train], [unknown], tokenizer)
    floats = write_jsonl(tmp_path / "f.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 1.5}])
    assert data.load_task_data(  # pyarrow reads the column as floats: whole ones are ids still
        "sequence-classification", [write_jsonl(tmp_path / "w.jsonl", [{"text": "a", "label": 1.0}])], None,
        tokenizer, eval_fraction=0,
    ).train["labels"].tolist() == [1]  # fmt: skip
    with pytest.raises(ConfigError, match=r"f.jsonl, row 1, column 'label'.*1.5"):
        data.load_task_data("sequence-classification", [floats], None, tokenizer, eval_fraction=0)
    booleans = write_jsonl(tmp_path / "b.jsonl", [{"text": "a", "label": True}])
    with pytest.raises(ConfigError, match=r"b.jsonl, row 0, column 'label'.*True"):
        data.load_task_data("sequence-classification", [booleans], None, tokenizer, eval_fraction=0)
    ints = write_jsonl(tmp_path / "i.jsonl", [{"text": "a", "label": 0}])
    with pytest.raises(ConfigError, match="mix ints and strings"):
        data.load_task_data("sequence-classification", [train], [ints], tokenizer)


# ----- question answering against HF's run_qa


def hf_prepare(hf_tokenizer, rows, max_length, stride, training):
    """HF run_qa's prepare_train_features / prepare_validation_features (padding to max_length, pad on right)."""
    examples = {key: [row[key] for row in rows] for key in rows[0]}
    examples["question"] = [q.lstrip() for q in examples["question"]]
    tokenized = hf_tokenizer(
        examples["question"], examples["context"], truncation="only_second", max_length=max_length, stride=stride,
        return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length",
    )  # fmt: skip
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    offset_mapping = tokenized.pop("offset_mapping")
    if not training:
        tokenized["example_id"] = []
        for i in range(len(tokenized["input_ids"])):
            sequence_ids = tokenized.sequence_ids(i)
            tokenized["example_id"].append(examples["id"][sample_mapping[i]])
            offset_mapping[i] = [o if sequence_ids[k] == 1 else None for k, o in enumerate(offset_mapping[i])]
        tokenized["offset_mapping"] = offset_mapping
        return tokenized
    tokenized["start_positions"], tokenized["end_positions"] = [], []
    for i, offsets in enumerate(offset_mapping):
        input_ids = tokenized["input_ids"][i]
        cls_index = input_ids.index(hf_tokenizer.bos_token_id)  # no cls_token_id: the bos, as run_qa
        sequence_ids = tokenized.sequence_ids(i)
        answers = examples["answers"][sample_mapping[i]]
        if len(answers["answer_start"]) == 0:
            tokenized["start_positions"].append(cls_index)
            tokenized["end_positions"].append(cls_index)
            continue
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        token_start_index = 0
        while sequence_ids[token_start_index] != 1:
            token_start_index += 1
        token_end_index = len(input_ids) - 1
        while sequence_ids[token_end_index] != 1:
            token_end_index -= 1
        if not (offsets[token_start_index][0] <= start_char and offsets[token_end_index][1] >= end_char):
            tokenized["start_positions"].append(cls_index)
            tokenized["end_positions"].append(cls_index)
        else:
            while token_start_index < len(offsets) and offsets[token_start_index][0] <= start_char:
                token_start_index += 1
            tokenized["start_positions"].append(token_start_index - 1)
            while offsets[token_end_index][1] >= end_char:
                token_end_index -= 1
            tokenized["end_positions"].append(token_end_index + 1)
    return tokenized


def hf_postprocess(rows, features, start_logits, end_logits, v2=False, n_best_size=20, max_answer_length=30):
    """utils_qa.postprocess_qa_predictions (null_score_diff_threshold=0), trimmed to the predicted texts."""
    feature_per_example = collections.defaultdict(list)
    index_of = {row["id"]: i for i, row in enumerate(rows)}
    for i, example_id in enumerate(features["example_id"]):
        feature_per_example[index_of[example_id]].append(i)
    predictions = {}
    for example_index, example in enumerate(rows):
        prelim, null = [], None
        for feature_index in feature_per_example[example_index]:
            starts, ends = start_logits[feature_index], end_logits[feature_index]
            offset_mapping = features["offset_mapping"][feature_index]
            if null is None or null["score"] > starts[0] + ends[0]:
                null = {"offsets": (0, 0), "score": starts[0] + ends[0], "start_logit": starts[0], "end_logit": ends[0]}
            for start_index in np.argsort(starts)[-1 : -n_best_size - 1 : -1].tolist():
                for end_index in np.argsort(ends)[-1 : -n_best_size - 1 : -1].tolist():
                    if offset_mapping[start_index] is None or offset_mapping[end_index] is None:
                        continue
                    if end_index < start_index or end_index - start_index + 1 > max_answer_length:
                        continue
                    offsets = (offset_mapping[start_index][0], offset_mapping[end_index][1])
                    score = starts[start_index] + ends[end_index]
                    prelim.append(
                        dict(offsets=offsets, score=score, start_logit=starts[start_index], end_logit=ends[end_index])
                    )
        if v2:
            prelim.append(null)
        best = sorted(prelim, key=lambda x: x["score"], reverse=True)[:n_best_size]
        for p in best:
            p["text"] = example["context"][p["offsets"][0] : p["offsets"][1]]
        if not best or (len(best) == 1 and best[0]["text"] == ""):
            best.insert(0, {"text": "empty", "start_logit": 0.0, "end_logit": 0.0, "score": 0.0})
        if not v2:
            predictions[example["id"]] = best[0]["text"]
            continue
        i = 0
        while best[i]["text"] == "":
            i += 1
        score_diff = null["score"] - best[i]["start_logit"] - best[i]["end_logit"]
        predictions[example["id"]] = "" if score_diff > 0.0 else best[i]["text"]
    return predictions


@pytest.fixture(scope="module")
def squad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("squad")
    rows = squad_rows()
    csv_rows = [dict(row, answers=json.dumps(row["answers"])) for row in rows]
    return {
        "jsonl": write_jsonl(folder / "train.jsonl", rows),
        "json": _write(folder / "squad.json", json.dumps({"version": "1.1", "data": rows})),
        "csv": write_csv(folder / "train.csv", csv_rows),
    }


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
def test_qa_features_equal_run_qa(tokenizer, hf_tokenizer, squad_files, kind):
    path = squad_files[kind]
    got = data.load_task_data("question-answering", [path], [path], tokenizer, max_length=48, stride=16)
    train = hf_prepare(hf_tokenizer, squad_rows(), 48, 16, training=True)
    for key in ("input_ids", "attention_mask", "start_positions", "end_positions"):
        assert got.train[key].tolist() == train[key], key
    assert len(train["input_ids"]) > 3 * len(QUESTIONS)  # long contexts: several windows each
    assert (got.train["start_positions"] > 0).sum() >= len(QUESTIONS)  # and the answers are found
    for i in np.flatnonzero(got.train["start_positions"]):  # the positions point at the answer's tokens
        start, end = got.train["start_positions"][i], got.train["end_positions"][i]
        answer = tokenizer.decode(got.train["input_ids"][i][start : end + 1]).strip()
        assert answer in {answer for *_, answer in QUESTIONS}
    evaluation = hf_prepare(hf_tokenizer, squad_rows(), 48, 16, training=False)
    assert got.eval["input_ids"].tolist() == evaluation["input_ids"]
    assert [got.eval_examples[i]["id"] for i in got.eval["example_index"]] == evaluation["example_id"]
    ours = [[None if s < 0 else (s, e) for s, e in row] for row in got.eval["offset_mapping"].tolist()]
    assert ours == [[None if o is None else tuple(o) for o in row] for row in evaluation["offset_mapping"]]
    assert set(got.eval) == {"input_ids", "attention_mask", "example_index", "offset_mapping"}


def test_qa_postprocessing_recovers_gold_and_matches_utils_qa(tokenizer, hf_tokenizer, squad_files):
    path = squad_files["jsonl"]
    got = data.load_task_data("question-answering", [path], [path], tokenizer, max_length=48, stride=16)
    rows, length = got.num_eval_rows, 48
    starts, ends = np.zeros((rows, length), np.float32), np.zeros((rows, length), np.float32)
    for i in range(rows):  # one-hot logits at the gold positions of every window holding the answer
        if got.train["start_positions"][i] > 0:
            starts[i, got.train["start_positions"][i]] = 10
            ends[i, got.train["end_positions"][i]] = 10
    predictions = data.postprocess_qa_predictions(got, starts, ends)
    assert {k: v.strip() for k, v in predictions.items()} == {key: answer for key, *_, answer in QUESTIONS}
    assert data.evaluate(got, {"start_logits": starts, "end_logits": ends}) == {"exact_match": 100.0, "f1": 100.0}
    features = hf_prepare(hf_tokenizer, squad_rows(), 48, 16, training=False)
    rng = np.random.default_rng(0)
    for _ in range(3):
        starts, ends = rng.normal(size=(2, rows, length)).astype(np.float32)
        assert data.postprocess_qa_predictions(got, starts, ends) == hf_postprocess(
            squad_rows(), features, starts, ends
        )


def test_qa_unanswerable_questions(tokenizer, hf_tokenizer, tmp_path):
    rows = squad_rows()[:2] + [
        dict(id="none", question="Why?", context=CONTEXTS[1], answers={"text": [], "answer_start": []})
    ]
    path = write_jsonl(tmp_path / "v2.jsonl", rows)
    got = data.load_task_data("question-answering", [path], [path], tokenizer, max_length=48, stride=16)
    assert got.version_2_with_negative
    windows = got.eval["example_index"] == 2
    assert (got.train["start_positions"][windows] == 0).all() and (got.train["end_positions"][windows] == 0).all()
    starts = np.zeros((got.num_eval_rows, 48), np.float32)
    starts[:, 0] = 5.0  # the no-answer score wins everywhere
    predictions = data.postprocess_qa_predictions(got, starts, starts)
    assert predictions == {"n1": "", "n2": "", "none": ""}
    assert data.evaluate(got, {"start_logits": starts, "end_logits": starts}) == pytest.approx(
        {"exact_match": 100 / 3, "f1": 100 / 3}
    )
    features = hf_prepare(hf_tokenizer, rows, 48, 16, training=False)
    rng, answered = np.random.default_rng(1), []
    for shift in (0.0, 1.5, 3.0, 4.5, 6.0):  # raising index 0's logits makes the no-answer win more often
        starts, ends = rng.normal(size=(2, got.num_eval_rows, 48)).astype(np.float32)
        starts[:, 0] += shift
        ends[:, 0] += shift
        expected = hf_postprocess(rows, features, starts, ends, v2=True)
        assert data.postprocess_qa_predictions(got, starts, ends) == expected
        answered += [text != "" for text in expected.values()]
    assert any(answered) and not all(answered)  # the no-answer won for some questions and lost for others


def test_qa_errors_name_file_and_row(tokenizer, tmp_path):
    bad = squad_rows()[:2]
    bad[1]["answers"] = {"text": ["Rollo"], "answer_start": [3]}
    with pytest.raises(ConfigError, match=r"bad.jsonl, row 1, column 'answers'.*'Rollo' is not at answer_start 3"):
        data.load_task_data("question-answering", [write_jsonl(tmp_path / "bad.jsonl", bad)], None, tokenizer)
    long_question = [dict(squad_rows()[0], question="why " * 40)]
    with pytest.raises(ConfigError, match=r"long.jsonl, row 0: the question takes .* stride=16"):
        data.load_task_data(
            "question-answering", [write_jsonl(tmp_path / "long.jsonl", long_question)], None, tokenizer,
            max_length=48, stride=16, eval_fraction=0,
        )  # fmt: skip
    twice = squad_rows()[:1] * 2
    path = write_jsonl(tmp_path / "twice.jsonl", twice)
    with pytest.raises(ConfigError, match=r"unique.*'n1'"):
        data.load_task_data("question-answering", [path], [path], tokenizer)


# ----- files


def test_bad_files_are_named(tokenizer, tmp_path):
    load = lambda task, *paths: data.load_task_data(task, list(paths), None, tokenizer, eval_fraction=0)  # noqa: E731
    with pytest.raises(ConfigError, match=r"x.parquet: cannot read .parquet"):
        load("causal-lm", _write(tmp_path / "x.parquet", "a"))
    with pytest.raises(ConfigError, match=r"missing.txt does not exist"):
        load("causal-lm", tmp_path / "missing.txt")
    for name in ("empty.txt", "empty.csv", "empty.jsonl", "empty.json"):
        with pytest.raises(ConfigError, match=rf"{name} is empty"):
            load("causal-lm", _write(tmp_path / name, ""))
    nolabel = write_csv(tmp_path / "nolabel.csv", [{"text": "a", "y": 1}])
    with pytest.raises(ConfigError, match=r"nolabel.csv has no column 'label'"):
        load("sequence-classification", nolabel)
    with pytest.raises(ConfigError, match=r"notes.txt: a .txt file holds text only"):
        load("sequence-classification", _write(tmp_path / "notes.txt", "hello"))
    with pytest.raises(ConfigError, match=r"broken.jsonl cannot be read as json"):
        load("causal-lm", _write(tmp_path / "broken.jsonl", '{"text": "a"}\n{"text": '))
    numbers = write_jsonl(tmp_path / "numbers.jsonl", [{"text": "a"}, {"text": 5}])
    with pytest.raises(ConfigError, match=r"numbers.jsonl"):
        load("causal-lm", numbers)
    with pytest.raises(ConfigError, match="task must be one of"):
        load("translation", nolabel)
    with pytest.raises(ConfigError, match="fewer than one row"):
        data.load_task_data("causal-lm", [_write(tmp_path / "short.txt", "hi")], None, tokenizer, seq_len=64)


# ----- batches


def test_batch_indices_are_resumable_permutations():
    rows, batch, seed = 10, 4, 7
    run = [data.batch_indices(rows, batch, step, seed) for step in range(15)]
    assert all(np.array_equal(a, b) for a, b in zip(run, [data.batch_indices(rows, batch, s, seed) for s in range(15)]))
    resumed = [data.batch_indices(rows, batch, step, seed) for step in range(6, 15)]  # a run restarted at step 6
    assert all(np.array_equal(a, b) for a, b in zip(run[6:], resumed))
    flat = np.concatenate(run)  # 60 positions: 6 epochs, each a permutation, each shuffled differently
    epochs = flat.reshape(6, rows)
    assert all(sorted(epoch) == list(range(rows)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 6
    assert not np.array_equal(np.concatenate([data.batch_indices(rows, batch, s, seed + 1) for s in range(15)]), flat)
    in_order = np.concatenate([data.batch_indices(rows, batch, s, seed, shuffle=False) for s in range(5)])
    assert in_order.tolist() == list(range(10)) * 2
    assert data.batch_indices(3, 8, 0, 0).shape == (8,)  # a batch larger than the data spans epochs
    with pytest.raises(InputError, match="batch_size"):
        data.batch_indices(10, 0, 0, 0)
    assert [b.tolist() for b in data.eval_batches(5, 2)] == [[0, 1], [2, 3], [4]]


# ----- evaluation and metrics


def test_evaluate_classification_and_causal_lm(tokenizer, tmp_path):
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c", "label": "y"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    got = data.load_task_data("sequence-classification", [path], [path], tokenizer)
    logits = np.asarray([[2.0, 1.0], [3.0, 0.0], [0.0, 1.0]])  # predicts x, x, y for x, y, y
    result = data.evaluate(got, {"logits": logits, "loss": [0.5, 0.7]})
    assert result == pytest.approx({"eval_loss": 0.6, "accuracy": 2 / 3, "macro_f1": (2 / 3 + 2 / 3) / 2})
    with pytest.raises(InputError, match="3 rows"):
        data.evaluate(got, {"logits": logits[:2]})
    text = _write(tmp_path / "t.txt", CONTEXTS[0])
    lm = data.load_task_data("causal-lm", [text], None, tokenizer, seq_len=8, eval_fraction=0.3)
    assert data.evaluate(lm, {"loss": [1.0, 2.0]}) == pytest.approx({"eval_loss": 1.5, "perplexity": np.exp(1.5)})
    assert data.evaluate(lm, {"loss_sum": 30.0, "token_count": 10})["perplexity"] == pytest.approx(np.exp(3.0))


def test_metrics_by_hand():
    assert metrics.normalize_answer("  The Cat,  sat on A mat!") == "cat sat on mat"
    assert metrics.normalize_answer("An apple. THE END") == "apple end"
    assert metrics.squad_exact_match("the Cat sat.", "cat sat") == 1.0
    assert metrics.squad_f1("the cat sat", "cat sat on the mat") == pytest.approx(2 * 1 * 0.5 / 1.5)  # P 2/2, R 2/4
    assert metrics.squad_f1("dog", "cat") == 0.0
    assert metrics.squad_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # multiset: one cat in common
    scores = metrics.squad_scores(
        {"a": "Denver Broncos", "b": "in 1990", "c": "", "d": "something"},
        {"a": ["Broncos", "Denver Broncos"], "b": ["1990", "the year 1990"], "c": [], "d": []},
    )
    # a: EM 1, F1 1; b: EM 0, F1 max(2/3, 2*.5*.5) = 2/3; c: no-answer right; d: no-answer wrong
    assert scores == pytest.approx({"exact_match": 50.0, "f1": 100 * (1 + 2 / 3 + 1 + 0) / 4})
    with pytest.raises(InputError, match="no prediction"):
        metrics.squad_scores({}, {"a": ["x"]})
    predictions, labels = np.asarray([0, 0, 1, 2]), np.asarray([0, 1, 1, 1])
    assert metrics.accuracy(predictions, labels) == 0.5
    assert metrics.macro_f1(predictions, labels) == pytest.approx((2 / 3 + 2 / 4 + 0) / 3)
    assert metrics.perplexity(0.0) == 1.0 and metrics.perplexity(1e6) == float("inf")


def test_the_pipeline_imports_no_framework(tmp_path):
    """opt_core stays framework-free: reading files through `datasets` and tokenizing imports no torch/tf/jax."""
    import subprocess
    import sys

    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a b c", "label": "x"}, {"text": "d", "label": "y"}])
    code = (
        "import sys; from opt_core import data; from opt_core.tokenizer import OPTTokenizer; "
        f"data.load_task_data('sequence-classification', [{str(path)!r}], None, OPTTokenizer.from_pretrained("
        f"{str(MODEL)!r}), eval_fraction=0.5); "
        "print(sorted(m for m in ('torch', 'tensorflow', 'jax', 'flax', 'keras') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
