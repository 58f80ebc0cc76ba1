"""The three modeling files stay parallel: same classes, functions, argument order and OPT-quirk comments
(STYLE.md: "a diff of two of them should show framework idioms, nothing else")."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
FILES = {"torch": "opt_torch/modeling.py", "tf": "opt_tf/modeling.py", "flax": "opt_flax/modeling.py"}
PREFIX = {"torch": "", "tf": "TF", "flax": "Flax"}
SHARED_CLASSES = ("OPTLearnedPositionalEmbedding", "OPTAttention", "OPTDecoderLayer", "OPTDecoder")
PUBLIC_CLASSES = ("OPTModel", "OPTForCausalLM", "OPTForSequenceClassification", "OPTForQuestionAnswering")
SHARED_FUNCTIONS = ("make_position_ids", "make_attention_mask", "last_non_pad_index", "masked_softmax")
CALL_METHODS = {"torch": "forward", "tf": "call", "flax": "__call__"}


def parse(framework: str) -> ast.Module:
    return ast.parse((ROOT / FILES[framework]).read_text())


def top_level(tree: ast.Module, kind) -> dict[str, ast.AST]:
    return {node.name: node for node in tree.body if isinstance(node, kind)}


def call_arguments(cls: ast.ClassDef, framework: str) -> list[str]:
    method = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == CALL_METHODS[framework])
    return [a.arg for a in method.args.args[1:]]


@pytest.mark.parametrize("framework", FILES)
def test_same_classes_and_functions(framework):
    tree = parse(framework)
    classes, functions = top_level(tree, ast.ClassDef), top_level(tree, ast.FunctionDef)
    for name in SHARED_CLASSES:
        assert name in classes, f"{FILES[framework]} lacks class {name}"
    for name in PUBLIC_CLASSES:
        assert PREFIX[framework] + name in classes, f"{FILES[framework]} lacks class {PREFIX[framework] + name}"
    for name in SHARED_FUNCTIONS:
        assert name in functions, f"{FILES[framework]} lacks function {name}"


@pytest.mark.parametrize("framework", ["tf", "flax"])
@pytest.mark.parametrize("name", ["OPTAttention", "OPTDecoderLayer"])
def test_layers_take_the_same_leading_arguments(framework, name):
    """The layers' call arguments start like torch's; a framework may add its own after them (caches, dropout)."""
    expected = call_arguments(top_level(parse("torch"), ast.ClassDef)[name], "torch")
    actual = call_arguments(top_level(parse(framework), ast.ClassDef)[name], framework)
    assert actual[:2] == expected[:2] and set(expected) - {"past_key_value"} <= set(actual), (actual, expected)


def quirk_comments(framework: str) -> list[str]:
    text = (ROOT / FILES[framework]).read_text()
    return sorted(re.sub(r"\s+", " ", m) for m in re.findall(r"# OPT quirk:[^\n]*", text))


@pytest.mark.parametrize("framework", ["tf", "flax"])
def test_quirk_comments_are_the_same_words(framework):
    assert quirk_comments(framework) == quirk_comments("torch")
    assert len(quirk_comments("torch")) >= 6
