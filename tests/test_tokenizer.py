"""Tests of `opt_core.tokenizer` against HF transformers' GPT2TokenizerFast with OPT's configuration.

A small byte-level BPE vocabulary is trained here on Python's own docstrings (nothing is downloaded) and laid out
two ways: as `train_bpe_tokenizer` writes it (with tokenizer.json, `<s>`/`<unk>` registered as special) and as
OPT's Hub repositories hold it (vocab.json, merges.txt and OPT's exact tokenizer_config.json /
special_tokens_map.json, no tokenizer.json). Ids, masks, tensors and decoded text must equal HF's on both.
"""

from __future__ import annotations

import functools
import json
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opt_core.errors import CheckpointError, ConfigError, InputError, OPTError
from opt_core.tokenizer import BatchEncoding, OPTTokenizer, train_bpe_tokenizer

transformers = pytest.importorskip("transformers")
# HF warns when max_length comes with padding=True and no truncation; the tests ask for that case on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:`max_length` is ignored")

VOCAB_SIZE = 700
EDGE_TEXTS = [
    "Hello world",
    "",
    " ",
    "   leading spaces and trailing   ",
    "tabs\tand\nnew\r\nlines\n\n",
    "emoji 🤗🚀👩‍👩‍👧 and flags 🇫🇷",
    "中文字符 日本語 한국어",
    "ｆｕｌｌｗｉｄｔｈ and e\u0301 vs é",
    "zero\u200bwidth\ufeff and \x00 nul \x7f del",
    "special </s> and <pad> in text, <s> and <unk> too",
    "</s></s><pad>",
    "can't won't it's I'm we've they're",
    "a" * 300,
    "RTL שלום עולם مرحبا",
]
# OPT's tokenizer files as on the Hub (facebook/opt-125m): all three roles on </s>, normalized tokens.
_OPT_TOKEN = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True}
OPT_TOKENIZER_CONFIG = {
    "errors": "replace",
    "unk_token": {"content": "</s>", **_OPT_TOKEN, "__type": "AddedToken"},
    "bos_token": {"content": "</s>", **_OPT_TOKEN, "__type": "AddedToken"},
    "eos_token": {"content": "</s>", **_OPT_TOKEN, "__type": "AddedToken"},
    "pad_token": {"content": "<pad>", **_OPT_TOKEN, "__type": "AddedToken"},
    "add_prefix_space": False,
    "add_bos_token": True,
    "special_tokens_map_file": None,
    "name_or_path": "patrickvonplaten/opt-30b",
}
OPT_SPECIAL_TOKENS_MAP = {
    "bos_token": {"content": "</s>", **_OPT_TOKEN},
    "eos_token": {"content": "</s>", **_OPT_TOKEN},
    "unk_token": {"content": "</s>", **_OPT_TOKEN},
    "pad_token": {"content": "<pad>", **_OPT_TOKEN},
}


@functools.cache
def corpus_lines() -> list[str]:
    """Two thousand lines of the builtin types' docstrings plus non-ASCII text, so merges cover multi-byte characters.

    Builtin types only: a module's attributes grow as its submodules get imported, which would change the corpus
    between two calls in one session.
    """
    lines = []
    for kind in (str, bytes, bytearray, dict, list, tuple, set, frozenset, int, float, complex, range, object, type):
        for name in sorted(dir(kind)):
            doc = getattr(getattr(kind, name, None), "__doc__", None)
            if isinstance(doc, str):
                lines.extend(doc.splitlines())
    lines += ["naïve café déjà vu – “quotes” — 中文字符 日本語 🤗 emoji"] * 20
    return lines


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    train_bpe_tokenizer(corpus_lines(), VOCAB_SIZE, folder)
    return folder


@pytest.fixture(scope="session")
def hub_style(trained, tmp_path_factory):
    """The trained vocabulary in the layout of OPT's Hub repositories: no tokenizer.json."""
    folder = tmp_path_factory.mktemp("hub_style")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(trained / name, folder / name)
    (folder / "tokenizer_config.json").write_text(json.dumps(OPT_TOKENIZER_CONFIG))
    (folder / "special_tokens_map.json").write_text(json.dumps(OPT_SPECIAL_TOKENS_MAP))
    return folder


@pytest.fixture(scope="session", params=["trained", "hub_style"])
def pair(request):
    """(ours, HF's) loaded from the same folder."""
    folder = request.getfixturevalue(request.param)
    return OPTTokenizer.from_pretrained(folder), transformers.GPT2TokenizerFast.from_pretrained(folder)


def as_lists(encoding) -> dict:
    return {key: np.asarray(value).tolist() for key, value in dict(encoding).items()}


# ----- encoding equals HF's


def test_single_texts(pair):
    ours, hf = pair
    for text in EDGE_TEXTS:
        for add_special_tokens in (True, False):
            got = ours(text, add_special_tokens=add_special_tokens)
            assert got == dict(hf(text, add_special_tokens=add_special_tokens)), text
        assert ours.encode(text) == hf.encode(text)
        assert ours.tokenize(text) == hf.tokenize(text)
    assert ours("Hello").input_ids[0] == 2  # OPT's quirk: every sequence starts with </s>


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(padding=True),
        dict(padding="longest", padding_side="left"),
        dict(padding="max_length", max_length=40),
        dict(padding=True, pad_to_multiple_of=8),
        dict(truncation=True, max_length=5),
        dict(max_length=3),  # truncates without truncation=True, as HF
        dict(max_length=3, padding=True),  # ... but not when padding
        dict(truncation=True, max_length=2, padding="max_length"),
        dict(truncation="longest_first", max_length=7, padding="max_length", padding_side="left"),
        dict(padding=True, return_attention_mask=False),
    ],
)
def test_batches_and_pairs(pair, options):
    ours, hf = pair
    assert ours(EDGE_TEXTS, **options) == dict(hf(EDGE_TEXTS, **options))
    assert ours(EDGE_TEXTS, EDGE_TEXTS[::-1], **options) == dict(hf(EDGE_TEXTS, EDGE_TEXTS[::-1], **options))
    assert ours("one text", "and its pair", **options) == dict(hf("one text", "and its pair", **options))


def assert_same_or_both_fail(ours, hf, *texts, **options):
    """Equal results, or an InputError from ours where HF fails (e.g. "only_second" with a too short second text)."""
    try:
        want = dict(hf(*texts, **options))
    except Exception:
        with pytest.raises(InputError):
            ours(*texts, **options)
        return False
    assert ours(*texts, **options) == want
    return True


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("strategy", ["longest_first", "only_first", "only_second"])
def test_truncation_sides(pair, side, strategy):
    ours, hf = pair
    ours.truncation_side = hf.truncation_side = side
    pairs = (["short", "a much longer first text", "x"], ["a long second text here", "x", "y"])
    try:
        succeeded = 0
        for max_length in (2, 4, 9):
            options = dict(truncation=strategy, max_length=max_length)
            if strategy == "longest_first":  # the others need pairs
                succeeded += assert_same_or_both_fail(ours, hf, EDGE_TEXTS, **options)
            for first, second in zip(*pairs):
                succeeded += assert_same_or_both_fail(ours, hf, first, second, **options)
        assert succeeded >= 4
    finally:
        ours.truncation_side = hf.truncation_side = "right"


def test_padding_side_attribute(trained):
    ours = OPTTokenizer.from_pretrained(trained, padding_side="left")
    hf = transformers.GPT2TokenizerFast.from_pretrained(trained, padding_side="left")
    assert ours.padding_side == "left"
    assert ours(EDGE_TEXTS, padding=True) == dict(hf(EDGE_TEXTS, padding=True))
    assert ours(["a", "bb cc"], padding=True).attention_mask[0][0] == 0
    ours.padding_side = "right"
    assert ours(["a", "bb cc"], padding=True).attention_mask[0][-1] == 0


@pytest.mark.parametrize("kind", ["np", "pt"])
def test_tensors_like_hf(pair, kind):
    if kind == "pt":
        pytest.importorskip("torch")
    ours, hf = pair
    got, want = ours(EDGE_TEXTS, padding=True, return_tensors=kind), hf(EDGE_TEXTS, padding=True, return_tensors=kind)
    for key in ("input_ids", "attention_mask"):
        assert type(got[key]) is type(want[key]) and got[key].dtype == want[key].dtype  # int64
    assert as_lists(got) == as_lists(want)
    single, single_hf = ours("one text", return_tensors=kind), hf("one text", return_tensors=kind)
    assert tuple(single.input_ids.shape) == tuple(single_hf.input_ids.shape)
    assert single.input_ids.shape[0] == 1
    assert as_lists(single) == as_lists(single_hf)


@pytest.mark.parametrize(
    ("kind", "module"),
    [pytest.param("tf", "tensorflow", marks=pytest.mark.slow), ("jax", "jax")],  # importing tensorflow takes ~6 s
)
def test_tf_and_jax_tensors(pair, kind, module):
    # transformers 5 no longer makes tf/jax tensors; transformers 4 made int32 ones, as these are.
    framework = pytest.importorskip(module)
    ours, hf = pair
    got = ours(EDGE_TEXTS, padding=True, return_tensors=kind)
    want = hf(EDGE_TEXTS, padding=True, return_tensors="np")
    assert as_lists(got) == as_lists(want)
    if kind == "tf":
        assert isinstance(got.input_ids, framework.Tensor) and got.input_ids.dtype == framework.int32
    else:
        assert isinstance(got.input_ids, framework.Array) and got.attention_mask.dtype == np.int32


# ----- decoding equals HF's


def test_decode(pair):
    ours, hf = pair
    batch = ours(EDGE_TEXTS, EDGE_TEXTS[::-1], padding=True).input_ids
    rng = np.random.default_rng(0)
    noise = rng.integers(0, len(ours), size=(20, 15)).tolist()  # lone bytes of multi-byte characters included
    for skip in (False, True):
        for ids in batch + noise + [[], [2], [1, 1, 2], [0, 3]]:
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        assert ours.batch_decode(batch, skip_special_tokens=skip) == hf.batch_decode(batch, skip_special_tokens=skip)
        array = np.asarray(noise)
        assert ours.batch_decode(array, skip_special_tokens=skip) == hf.batch_decode(noise, skip_special_tokens=skip)
        assert ours.decode(array[0], skip_special_tokens=skip) == hf.decode(noise[0], skip_special_tokens=skip)
    assert ours.decode(2) == hf.decode(2) == "</s>"
    assert ours.decode([5, len(ours) + 10, 6]) == hf.decode([5, len(ours) + 10, 6])  # unknown ids dropped, as HF


def test_decode_torch_and_unicode(pair):
    torch = pytest.importorskip("torch")
    ours, hf = pair
    texts = [text for text in EDGE_TEXTS if "<" not in text]  # special tokens in the text would be skipped too
    ids = ours(texts, padding=True, return_tensors="pt").input_ids
    assert ours.batch_decode(ids, skip_special_tokens=True) == texts
    assert ours.decode(ids[5]) == hf.decode(ids[5])
    assert ours.decode(torch.tensor(7)) == hf.decode(7)
    emoji = ours.encode("🤗", add_special_tokens=False)
    assert len(emoji) > 1 and ours.decode(emoji[:1]) == hf.decode(emoji[:1]) == "\ufffd"  # errors="replace"


def test_clean_up_tokenization_spaces(trained):
    ours = OPTTokenizer.from_pretrained(trained)
    ids = ours.encode("Hi , you . I can 't", add_special_tokens=False)
    assert ours.decode(ids) == "Hi , you . I can 't"
    assert ours.decode(ids, clean_up_tokenization_spaces=True) == "Hi, you. I can 't"


def test_vocabulary_and_special_tokens(pair):
    ours, hf = pair
    assert (ours.vocab_size, len(ours)) == (hf.vocab_size, len(hf))
    assert ours.get_vocab() == hf.get_vocab()
    for role in ("bos", "eos", "unk", "pad"):
        assert getattr(ours, f"{role}_token") == getattr(hf, f"{role}_token")
        assert getattr(ours, f"{role}_token_id") == getattr(hf, f"{role}_token_id")
    assert (ours.bos_token_id, ours.pad_token_id) == (2, 1)
    assert ours.all_special_ids == hf.all_special_ids and ours.all_special_tokens == hf.all_special_tokens
    ids = list(range(12)) + [len(ours) - 1, len(ours) + 5]
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids, skip_special_tokens=True) == hf.convert_ids_to_tokens(ids, True)
    assert ours.convert_ids_to_tokens(np.int64(2)) == hf.convert_ids_to_tokens(2) == "</s>"
    tokens = ["</s>", "<pad>", "<s>", "Ġthe", "not-a-token"]
    assert ours.convert_tokens_to_ids(tokens) == hf.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("not-a-token") == hf.unk_token_id == 2
    assert ours.num_special_tokens_to_add() == 1 and ours.num_special_tokens_to_add(pair=True) == 2


def test_trained_layout_is_opt_s(trained):
    ours = OPTTokenizer.from_pretrained(trained)
    assert [ours.convert_tokens_to_ids(token) for token in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert len(ours) == VOCAB_SIZE
    assert ours("a<s>b<unk>c").input_ids[1:] == ours.convert_tokens_to_ids(["a", "<s>", "b", "<unk>", "c"])


# ----- saving, loading, training


def assert_same_tokenizer(a, b):
    for options in ({}, dict(padding=True), dict(truncation=True, max_length=4, padding="max_length")):
        assert dict(a(EDGE_TEXTS, EDGE_TEXTS[::-1], **options)) == dict(b(EDGE_TEXTS, EDGE_TEXTS[::-1], **options))
    ids = a(EDGE_TEXTS, padding=True)["input_ids"]
    for skip in (False, True):
        assert a.batch_decode(ids, skip_special_tokens=skip) == b.batch_decode(ids, skip_special_tokens=skip)
    assert (a.padding_side, a.truncation_side, len(a), a.all_special_ids) == (
        b.padding_side,
        b.truncation_side,
        len(b),
        b.all_special_ids,
    )


@pytest.mark.parametrize("source", ["trained", "hub_style"])
def test_save_pretrained_loads_in_hf(request, tmp_path, source):
    folder = request.getfixturevalue(source)
    hf = transformers.GPT2TokenizerFast.from_pretrained(folder, padding_side="left")
    ours = OPTTokenizer.from_pretrained(folder, padding_side="left")
    written = ours.save_pretrained(tmp_path / "saved")
    names = {path.name for path in written}
    assert names == {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    for key in ("errors", "bos_token", "eos_token", "unk_token", "pad_token", "add_prefix_space", "add_bos_token"):
        assert config[key] == OPT_TOKENIZER_CONFIG[key] or source == "trained"
    special_map = json.loads((tmp_path / "saved" / "special_tokens_map.json").read_text())
    assert {role: entry["content"] for role, entry in special_map.items()} == {
        "bos_token": "</s>",
        "eos_token": "</s>",
        "unk_token": "</s>",
        "pad_token": "<pad>",
    }
    assert (tmp_path / "saved" / "vocab.json").read_bytes() == (folder / "vocab.json").read_bytes()
    assert (tmp_path / "saved" / "merges.txt").read_bytes() == (folder / "merges.txt").read_bytes()
    assert_same_tokenizer(ours, hf)
    reloaded = OPTTokenizer.from_pretrained(tmp_path / "saved")
    assert_same_tokenizer(ours, reloaded)
    reloaded.save_pretrained(tmp_path / "again")
    for path in written:  # saving is a fixed point
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes(), path.name
    assert_same_tokenizer(ours, transformers.AutoTokenizer.from_pretrained(tmp_path / "saved"))
    assert_same_tokenizer(ours, transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "saved"))
    (tmp_path / "saved" / "tokenizer.json").unlink()  # HF rebuilds from vocab/merges + added_tokens_decoder
    assert_same_tokenizer(ours, transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "saved"))


def test_loads_what_hf_saves(trained, tmp_path):
    hf = transformers.GPT2TokenizerFast.from_pretrained(trained)
    hf.save_pretrained(tmp_path)  # transformers 5 writes tokenizer.json and tokenizer_config.json only
    assert_same_tokenizer(OPTTokenizer.from_pretrained(tmp_path), hf)


def test_add_prefix_space_from_config(hub_style, tmp_path):
    shutil.copytree(hub_style, tmp_path, dirs_exist_ok=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**OPT_TOKENIZER_CONFIG, "add_prefix_space": True}))
    ours, hf = OPTTokenizer.from_pretrained(tmp_path), transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    assert ours(EDGE_TEXTS) == dict(hf(EDGE_TEXTS))
    assert ours.tokenize("Hello")[0].startswith("Ġ")


def test_training_is_deterministic(trained, tmp_path):
    lines = corpus_lines()
    again = tmp_path / "again"
    train_bpe_tokenizer(iter(lines[::-1]), VOCAB_SIZE, again)
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("\n".join(lines), encoding="utf-8")
    from_file = tmp_path / "from_file"
    train_bpe_tokenizer([text_file], VOCAB_SIZE, from_file)
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (again / name).read_bytes() == (trained / name).read_bytes(), name
        assert (from_file / name).read_bytes() == (trained / name).read_bytes(), name


def test_no_pad_token_and_overrides(hub_style, tmp_path):
    shutil.copytree(hub_style, tmp_path, dirs_exist_ok=True)
    config = {**OPT_TOKENIZER_CONFIG, "pad_token": None}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").unlink()
    ours = OPTTokenizer.from_pretrained(tmp_path)
    assert ours.pad_token is None and ours.pad_token_id is None
    with pytest.raises(ConfigError, match="no pad token"):
        ours(["a", "bb"], padding=True)
    ours.pad_token = ours.eos_token
    assert ours(["a", "b c"], padding=True).input_ids[0][-1] == 2
    assert OPTTokenizer.from_pretrained(tmp_path, pad_token="<pad>").pad_token_id == 1


# ----- the round-trip property


@settings(
    deadline=None, derandomize=True, max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=60))
def test_decode_inverts_encode(pair, text):
    ours, hf = pair
    ids = ours.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == text
    assert ids == hf.encode(text, add_special_tokens=False)
    if not any(token in text for token in ("<s>", "</s>", "<pad>", "<unk>")):
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == text


# ----- the BatchEncoding


def test_batch_encoding(trained):
    ours = OPTTokenizer.from_pretrained(trained)
    encoding = ours(["a b", "c"], padding=True)
    assert isinstance(encoding, BatchEncoding) and isinstance(encoding, dict)
    assert encoding.input_ids is encoding["input_ids"] and encoding.attention_mask == [[1, 1, 1], [1, 1, 0]]
    assert (lambda input_ids, attention_mask: len(input_ids))(**encoding) == 2
    with pytest.raises(AttributeError, match="token_type_ids"):
        _ = encoding.token_type_ids
    assert pickle.loads(pickle.dumps(encoding)) == encoding
    assert pickle.loads(pickle.dumps(ours))(EDGE_TEXTS) == ours(EDGE_TEXTS)


# ----- errors


def test_missing_and_malformed_files(trained, tmp_path):
    with pytest.raises(CheckpointError, match="vocab.json"):
        OPTTokenizer.from_pretrained(tmp_path)
    shutil.copy(trained / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(CheckpointError, match="merges.txt"):
        OPTTokenizer.from_pretrained(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nthree parts here\n")
    with pytest.raises(CheckpointError, match="line 3"):
        OPTTokenizer.from_pretrained(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nnot_in vocab\n")
    with pytest.raises(CheckpointError, match="do not agree"):
        OPTTokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="vocab.json"):
        OPTTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json is not valid JSON"):
        OPTTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}}))
    with pytest.raises(CheckpointError, match="BPE"):
        OPTTokenizer.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not an existing folder"):
        OPTTokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(TypeError, match="bos_tokn"):
        OPTTokenizer.from_pretrained(trained, bos_tokn="x")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda t: t(["a"], return_tensors="torch"), "return_tensors"),
        (lambda t: t(["a", "b c"], return_tensors="np"), "padding=True"),
        (lambda t: t(["a"], padding="max_length"), "needs max_length"),
        (lambda t: t(["a"], padding="yes"), "padding must be"),
        (lambda t: t(["a"], padding=True, padding_side="up"), "padding_side"),
        (lambda t: t(["a"], truncation="sometimes", max_length=3), "truncation must be"),
        (lambda t: t(["a"], max_length=0), "max_length"),
        (lambda t: t("a", "b", truncation=True, max_length=1), "no room"),
        (lambda t: t("a b c d e f", "x", truncation="only_second", max_length=3), "cannot tokenize"),
        (lambda t: t(3), "str or a list of str"),
        (lambda t: t(["a", 3]), "list of int/str"),
        (lambda t: t([]), "empty list"),
        (lambda t: t(["a", "b"], ["c"]), "2 entries"),
        (lambda t: t("a", ["b"]), "text_pair"),
        (lambda t: t.decode([-1]), ">= 0"),
        (lambda t: t.decode([1.5, 2.0]), "integers"),
        (lambda t: t.decode(np.zeros((2, 2, 2), np.int64)), "sequence of ints"),
        (lambda t: t.encode(["a"]), "one text"),
        (lambda t: setattr(t, "padding_side", "middle"), "padding_side"),
        (lambda t: train_bpe_tokenizer(["x"], 10, "unused"), "vocab_size"),
        (lambda t: train_bpe_tokenizer("no/such/file.txt", 300, "unused"), "does not exist"),
    ],
)
def test_bad_input(trained, call, match):
    with pytest.raises(OPTError, match=match):
        call(OPTTokenizer.from_pretrained(trained))


def test_importing_imports_no_framework():
    code = textwrap.dedent(
        """
        import sys
        import opt_core.tokenizer
        print(sorted(m for m in ("torch", "tensorflow", "jax", "flax", "keras") if m in sys.modules))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


def test_training_files_and_texts_are_not_mixed(tmp_path):
    text_file = tmp_path / "a.txt"
    text_file.write_text("some text\n")
    with pytest.raises(CheckpointError, match="missing.txt"):
        train_bpe_tokenizer([text_file, tmp_path / "missing.txt"], 300, tmp_path / "out")
    with pytest.raises(InputError, match="must be str"):
        train_bpe_tokenizer(iter(["text", 3]), 300, tmp_path / "out")
    tokenizer = train_bpe_tokenizer(str(text_file), 300, tmp_path / "out")
    assert tokenizer.decode(tokenizer.encode("some text"), skip_special_tokens=True) == "some text"
