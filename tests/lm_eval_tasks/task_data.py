"""The test tasks' documents, read from the jsonl files beside this module (so the tasks load from any working
directory, offline): lm_eval calls these through `custom_dataset: !function task_data.<name>` in the YAMLs."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).parent


def _split(name: str) -> datasets.DatasetDict:
    lines = (HERE / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def multiple_choice(**metadata) -> datasets.DatasetDict:
    return _split("multiple_choice")


def generation(**metadata) -> datasets.DatasetDict:
    return _split("generation")


def perplexity(**metadata) -> datasets.DatasetDict:
    return _split("perplexity")
