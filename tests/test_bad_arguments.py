"""Bad arguments at every public entry point, one table row each (issue 17): forward, `generate` and the
text-generation pipeline in each framework, and every `opt-lm` subcommand.

Each row names an entry point, the argument, the bad value, the error class expected and the substrings the message
must hold (the argument's name and the value). Every row is also refused before any work is done: the error is
raised by the shared set-up in `opt_core` (`validate_inputs`, `prepare_generation`, the pipeline's checks) and never
from inside a framework op or a decoding loop; a CLI row prints one line, `opt-lm <command>: error: ...`, exits
non-zero, and loads no model, writes no file.

The rules follow HF transformers' `GenerationConfig.validate`, its logits processors and `_validate_generated_length`,
where HF raises; where HF only warns or silently ignores a value, this library refuses it (its choice, each noted):
`max_new_tokens` must be >= 1 and `max_length` must leave room after the prompt (HF raises for both); `temperature`
0 is refused only with `do_sample=True` (HF raises there too; greedy ignores it), negative or nan always; `top_p`
must be in (0, 1] (HF accepts 0); `top_k=0` turns top-k off (as HF), negative is refused; a negative
`no_repeat_ngram_size` is refused (HF ignores it); `min_new_tokens > max_new_tokens` and `min_length > max_length`
are refused (HF warns); special token ids must be in [0, vocab_size) (HF warns on negative ids); beam sampling
(`do_sample` with `num_beams > 1`), contrastive search with sampling or beams, and a streamer with beam search are
not supported and are refused naming both options (HF runs the first, silently drops the second's `penalty_alpha`,
and raises for the third). An unknown `generate` keyword stays a TypeError, as for an unknown `from_pretrained`
keyword (Python's convention; HF raises a ValueError).

`from_pretrained` refuses a keyword that is neither one of its options nor a config field, naming it, in all three
frameworks (`opt_core.pretrained.UnknownArgumentError`, a ConfigError and a TypeError): HF keeps such a keyword as a
config attribute and loads as if it had not been given, which is how `tp_plan="auto"` once loaded the whole model in
one process here. `tp_plan` is PyTorch's (tensor parallelism under torchrun, `opt_torch.distributed`); Keras and
Flax refuse it, and PyTorch refuses a plan other than "auto", a process that torchrun did not start, and tp_plan
with int8 quantization or an adapter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import sample_batch

from opt_core.errors import ConfigError, InputError
from opt_core.pipeline import pipeline
from opt_core.pretrained import UnknownArgumentError

NAN = float("nan")


def row(id_, kwargs, error, *names, marks=()):
    """One table row: the call's keyword arguments, the error class, the substrings its message must hold."""
    return pytest.param(kwargs, error, names, id=id_, marks=marks)


# ----- the models (one tiny causal LM per framework, loaded once)


@pytest.fixture(scope="module")
def model(framework, hf_checkpoint):
    folder, _ = hf_checkpoint("pre_ln")
    return framework.load(folder)


def assert_refused(call, error, names, setup):
    """`call()` raises `error` naming every one of `names`, from the shared set-up: the traceback passes through
    one of the functions `setup` and the error is raised in `opt_core` (never inside a framework or a loop)."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"
    functions = {entry.name for entry in info.traceback}
    assert functions & set(setup), f"not raised by {setup} but from {[e.name for e in info.traceback]}"
    innermost = Path(info.traceback[-1].path)
    assert innermost.parent.name == "opt_core", f"raised in {innermost}, not in the shared core: {message}"


# ----- forward / __call__


FORWARD = [
    row("input_ids-None-no-embeds", dict(input_ids=None), InputError, "neither input_ids nor inputs_embeds"),
    row(
        "input_ids-and-inputs_embeds",
        dict(inputs_embeds=np.zeros((1, 3, 32), np.float32)),
        InputError,
        "both input_ids and inputs_embeds",
    ),
    row("input_ids-empty-batch", dict(input_ids=np.zeros((0, 5), np.int64)), InputError, "input_ids", "(0, 5)"),
    row("input_ids-zero-length", dict(input_ids=np.zeros((2, 0), np.int64)), InputError, "input_ids", "(2, 0)"),
    row("input_ids-3d", dict(input_ids=np.full((1, 2, 3), 5)), InputError, "input_ids", "(1, 2, 3)"),
    row(
        "input_ids-out-of-vocab",
        dict(input_ids=np.array([[5, 6, 101]])),
        InputError,
        "input_ids",
        "token id 101",
        "(0, 2)",
    ),
    row("input_ids-negative", dict(input_ids=np.array([[5, -1]])), InputError, "input_ids", "token id -1", "(0, 1)"),
    row("input_ids-float", dict(input_ids=np.array([[5.0, 6.0]])), InputError, "input_ids", "dtype float"),
    row("input_ids-too-long", dict(input_ids=np.full((1, 41), 5)), InputError, "input_ids", "position 40", "=40"),
    row(
        "attention_mask-float-0.5",
        dict(attention_mask=np.array([[1.0, 0.5, 1.0]])),
        InputError,
        "attention_mask",
        "0.5",
        "(0, 1)",
    ),
    row("attention_mask-nan", dict(attention_mask=np.array([[1.0, NAN, 1.0]])), InputError, "attention_mask", "nan"),
    row("attention_mask-2", dict(attention_mask=np.array([[1, 2, 1]])), InputError, "attention_mask", "got 2"),
    row("attention_mask-shape", dict(attention_mask=np.ones((1, 4))), InputError, "attention_mask", "(1, 4)"),
    row("attention_mask-batch", dict(attention_mask=np.ones((2, 3))), InputError, "attention_mask", "(2, 3)"),
    row("position_ids-shape", dict(position_ids=np.array([[0, 1]])), InputError, "position_ids", "(1, 2)"),
    row(
        "position_ids-float", dict(position_ids=np.array([[0.0, 1.0, 2.0]])), InputError, "position_ids", "dtype float"
    ),
    row("position_ids-below-2", dict(position_ids=np.array([[0, 1, -3]])), InputError, "position_ids", "-3"),
    row(
        "position_ids-past-table",
        dict(position_ids=np.array([[0, 1, 40]])),
        InputError,
        "position_ids",
        "position 40",
        "=40",
    ),
]
FORWARD_NOT_TORCH = [  # torch tensors cannot hold strings; TF and Flax take numpy as is
    row(
        "attention_mask-strings",
        dict(attention_mask=np.array([["1", "1", "0"]])),
        InputError,
        "attention_mask",
        "dtype",
    ),
]
FORWARD_TORCH = [  # cache_position is torch's (HF's forward); the others' static cache keeps its own index
    row("cache_position-negative", dict(cache_position=np.array([-1, 0, 1])), InputError, "cache_position", "-1"),
    row(
        "cache_position-length",
        dict(cache_position=np.array([0, 1])),
        InputError,
        "cache_position",
        "(2,)",
    ),
    row(
        "cache_position-float",
        dict(cache_position=np.array([0.0, 1.0, 2.0])),
        InputError,
        "cache_position",
        "float",
    ),
]
FORWARD_SETUP = (
    "validate_inputs",
    "check_shapes",
    "check_static_cache",
    "check_cache_position",
    "check_numeric",
    "check_ids_or_embeds",
)


def forward_call(framework, model, kwargs):
    kwargs = dict(kwargs)
    ids = kwargs.pop("input_ids", np.array([[5, 6, 7]]))
    if "cache_position" in kwargs:  # a static cache of 8 slots, the mask over all of them
        kwargs.update(past_key_values=model.init_cache(1, 8), attention_mask=np.ones((1, 8), np.int64))
    return lambda: framework(model, ids, **kwargs)


@pytest.mark.parametrize("kwargs, error, names", FORWARD)
def test_forward(framework, model, kwargs, error, names):
    assert_refused(forward_call(framework, model, kwargs), error, names, FORWARD_SETUP)


@pytest.mark.parametrize("framework", ["tf", "flax"], indirect=True)
@pytest.mark.parametrize("kwargs, error, names", FORWARD_NOT_TORCH)
def test_forward_not_torch(framework, model, kwargs, error, names):
    assert_refused(forward_call(framework, model, kwargs), error, names, FORWARD_SETUP)


@pytest.mark.parametrize("framework", ["torch"], indirect=True)
@pytest.mark.parametrize("kwargs, error, names", FORWARD_TORCH)
def test_forward_torch(framework, model, kwargs, error, names):
    assert_refused(forward_call(framework, model, kwargs), error, names, FORWARD_SETUP)


# ----- generate


class Recorder:
    def put(self, value):
        pass

    def end(self):
        pass


class CharTokenizer:
    """Ids 3.. are the characters from "a"; enough for stop strings and the pipeline."""

    bos_token_id = 2

    def decode(self, ids, skip_special_tokens=False, **kwargs):
        ids = np.asarray(ids).reshape(-1).tolist()
        return "".join(chr(ord("a") + i - 3) for i in ids if not (skip_special_tokens and i < 3))

    def __call__(self, texts, padding=True, padding_side="left", return_tensors="np"):
        rows = [[self.bos_token_id, *(3 + (ord(c) - ord("a")) % 90 for c in text)] for text in texts]
        width = max(len(r) for r in rows)
        ids = np.array([[1] * (width - len(r)) + r for r in rows], np.int64)
        mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int64)
        return {"input_ids": ids, "attention_mask": mask}


def prompt(input_ids, attention_mask=None):
    return dict(input_ids=input_ids, attention_mask=attention_mask)


GENERATE = [
    # lengths
    row("max_new_tokens=0", dict(max_new_tokens=0), ConfigError, "max_new_tokens", "got 0"),
    row("max_new_tokens=-1", dict(max_new_tokens=-1), ConfigError, "max_new_tokens", "got -1"),
    row("max_new_tokens=2.5", dict(max_new_tokens=2.5), ConfigError, "max_new_tokens", "2.5"),
    row("max_new_tokens=True", dict(max_new_tokens=True), ConfigError, "max_new_tokens", "True"),
    row("max_new_tokens-past-table", dict(max_new_tokens=50), ConfigError, "max_new_tokens=50", "=40"),
    row("max_length<prompt", dict(max_length=3), ConfigError, "max_length=3", "prompt of 5"),
    row("max_length=prompt", dict(max_length=5), ConfigError, "max_length=5", "prompt of 5"),
    row("max_length=-1", dict(max_length=-1), ConfigError, "max_length", "got -1"),
    row("min_new_tokens=-1", dict(max_new_tokens=3, min_new_tokens=-1), ConfigError, "min_new_tokens", "got -1"),
    row("min_new_tokens>max", dict(max_new_tokens=3, min_new_tokens=5), ConfigError, "min_new_tokens=5", "=3"),
    row("min_length=-2", dict(max_new_tokens=3, min_length=-2), ConfigError, "min_length", "got -2"),
    row("min_length>max_length", dict(max_new_tokens=3, min_length=12), ConfigError, "min_length=12", "=8"),
    # beams and returned sequences
    row("num_beams=0", dict(num_beams=0), ConfigError, "num_beams", "got 0"),
    row("num_beams=-1", dict(num_beams=-1), ConfigError, "num_beams", "got -1"),
    row("num_return_sequences=0", dict(num_return_sequences=0), ConfigError, "num_return_sequences", "got 0"),
    row("num_return_sequences>beams", dict(num_beams=2, num_return_sequences=3), ConfigError, "(3)", "num_beams (2)"),
    row("num_return_sequences-greedy", dict(num_return_sequences=2), ConfigError, "num_return_sequences (2)", "(1)"),
    row("early_stopping=maybe", dict(num_beams=2, early_stopping="maybe"), ConfigError, "early_stopping", "'maybe'"),
    row("length_penalty=nan", dict(num_beams=2, length_penalty=NAN), ConfigError, "length_penalty", "nan"),
    # sampling warpers
    row("top_p=0", dict(do_sample=True, top_p=0.0), ConfigError, "top_p", "got 0.0"),
    row("top_p=-0.1", dict(do_sample=True, top_p=-0.1), ConfigError, "top_p", "got -0.1"),
    row("top_p=1.5", dict(do_sample=True, top_p=1.5), ConfigError, "top_p", "got 1.5"),
    row("top_p=nan", dict(do_sample=True, top_p=NAN), ConfigError, "top_p", "got nan"),
    row("top_p=1.5-greedy", dict(top_p=1.5), ConfigError, "top_p", "got 1.5"),
    row("top_k=-1", dict(do_sample=True, top_k=-1), ConfigError, "top_k", "got -1"),
    row("top_k=2.0", dict(do_sample=True, top_k=2.0), ConfigError, "top_k", "2.0"),
    row("temperature=0-sampling", dict(do_sample=True, temperature=0.0), ConfigError, "temperature", "got 0.0"),
    row("temperature=-1", dict(do_sample=True, temperature=-1.0), ConfigError, "temperature", "got -1.0"),
    row("temperature=-1-greedy", dict(temperature=-1.0), ConfigError, "temperature", "got -1.0"),
    row("temperature=nan", dict(do_sample=True, temperature=NAN), ConfigError, "temperature", "got nan"),
    row("temperature=inf", dict(do_sample=True, temperature=float("inf")), ConfigError, "temperature", "got inf"),
    row("temperature='hot'", dict(do_sample=True, temperature="hot"), ConfigError, "temperature", "'hot'"),
    # processors
    row("repetition_penalty=0", dict(repetition_penalty=0.0), ConfigError, "repetition_penalty", "got 0.0"),
    row("repetition_penalty=-1", dict(repetition_penalty=-1.0), ConfigError, "repetition_penalty", "got -1.0"),
    row("repetition_penalty=nan", dict(repetition_penalty=NAN), ConfigError, "repetition_penalty", "got nan"),
    row("no_repeat_ngram_size=-1", dict(no_repeat_ngram_size=-1), ConfigError, "no_repeat_ngram_size", "got -1"),
    # strategies: contrastive search and unsupported combinations, named by both options
    row("penalty_alpha=-0.5", dict(penalty_alpha=-0.5, top_k=4), ConfigError, "penalty_alpha", "got -0.5"),
    row("penalty_alpha=1.5", dict(penalty_alpha=1.5, top_k=4), ConfigError, "penalty_alpha", "got 1.5"),
    row("penalty_alpha=nan", dict(penalty_alpha=NAN, top_k=4), ConfigError, "penalty_alpha", "got nan"),
    row(
        "alpha+do_sample",
        dict(penalty_alpha=0.6, top_k=4, do_sample=True),
        ConfigError,
        "penalty_alpha=0.6",
        "do_sample",
    ),
    row("alpha+num_beams", dict(penalty_alpha=0.6, top_k=4, num_beams=2), ConfigError, "penalty_alpha", "num_beams=2"),
    row("do_sample+num_beams", dict(do_sample=True, num_beams=2), ConfigError, "do_sample=True", "num_beams=2"),
    row("do_sample='yes'", dict(do_sample="yes"), ConfigError, "do_sample", "'yes'"),
    # special ids
    row("eos_token_id=101", dict(eos_token_id=101), ConfigError, "eos_token_id", "101", "vocab_size=101"),
    row("eos_token_id=-1", dict(eos_token_id=-1), ConfigError, "eos_token_id", "-1"),
    row("eos_token_id=[2,101]", dict(eos_token_id=[2, 101]), ConfigError, "eos_token_id", "101"),
    row("eos_token_id='2'", dict(eos_token_id="2"), ConfigError, "eos_token_id", "'2'"),
    row("pad_token_id=101", dict(pad_token_id=101), ConfigError, "pad_token_id", "101", "vocab_size=101"),
    row("pad_token_id=-1", dict(pad_token_id=-1), ConfigError, "pad_token_id", "-1"),
    row("bos_token_id=101-no-prompt", dict(prompt(None), bos_token_id=101), ConfigError, "bos_token_id", "101"),
    # generate's own arguments
    row("seed='abc'", dict(do_sample=True, seed="abc"), ConfigError, "seed", "'abc'"),
    row("seed=1.5", dict(do_sample=True, seed=1.5), ConfigError, "seed", "1.5"),
    row("seed=-1", dict(do_sample=True, seed=-1), ConfigError, "seed", "-1"),
    row("streamer+num_beams", dict(num_beams=2, streamer=Recorder()), ConfigError, "streamer", "num_beams=2"),
    row("streamer-without-put", dict(streamer=object()), ConfigError, "streamer", "put"),
    row("stop_strings-no-tokenizer", dict(stop_strings=["ab"]), ConfigError, "stop_strings", "tokenizer"),
    row("stop_strings-''", dict(stop_strings=["ab", ""], tokenizer=CharTokenizer()), ConfigError, "stop_strings", "''"),
    row("generation_config-dict", dict(generation_config={"top_p": 0.5}), ConfigError, "generation_config", "dict"),
    row("unknown-option", dict(max_tokens=5), TypeError, "max_tokens"),
    # the prompt
    row("input_ids-empty-batch", prompt(np.zeros((0, 5), np.int64)), InputError, "input_ids", "(0, 5)"),
    row("input_ids-zero-length", prompt(np.zeros((2, 0), np.int64)), InputError, "input_ids", "(2, 0)"),
    row("input_ids-3d", prompt(np.full((1, 2, 3), 5)), InputError, "input_ids", "(1, 2, 3)"),
    row("input_ids-out-of-vocab", prompt(np.array([[5, 101]])), InputError, "input_ids", "token id 101", "(0, 1)"),
    row("input_ids-float", prompt(np.array([[5.0, 6.0]])), InputError, "input_ids", "dtype float64"),
    row("input_ids-ragged", prompt([[5, 6, 7], [8, 9]]), InputError, "input_ids", "lengths 3, 2"),
    row("input_ids-strings", prompt([["a", "b"]]), InputError, "input_ids", "dtype <U1"),
    row(
        "attention_mask-0.5",
        dict(attention_mask=np.array([[1, 0.5, 1, 1, 1]] * 2)),
        InputError,
        "attention_mask",
        "0.5",
    ),
    row("attention_mask-strings", dict(attention_mask=np.array([["1"] * 5] * 2)), InputError, "attention_mask", "<U1"),
    row("attention_mask-shape", dict(attention_mask=np.ones((2, 4), np.int64)), InputError, "attention_mask", "(2, 4)"),
    row("attention_mask-batch", dict(attention_mask=np.ones((3, 5), np.int64)), InputError, "attention_mask", "(3, 5)"),
]
GENERATE_SETUP = ("prepare_generation",)


def generate_call(framework, model, kwargs):
    """model.generate on the sample prompt (2 rows of 5, one left-padded) or the row's; torch gets tensors where
    the values make one, as users pass them."""
    kwargs = dict(kwargs)
    ids, mask = sample_batch(seed=0, batch=2, length=5)
    ids, mask = kwargs.pop("input_ids", ids), kwargs.pop("attention_mask", mask)
    if "max_length" not in kwargs:
        kwargs.setdefault("max_new_tokens", 3)
    if framework.name == "torch":
        import torch

        def tensor(x):
            numeric = isinstance(x, np.ndarray) and x.dtype.kind in "biuf"
            return torch.from_numpy(x) if numeric else x

        ids, mask = tensor(ids), tensor(mask)
    return lambda: model.generate(ids, attention_mask=mask, **kwargs)


@pytest.mark.parametrize("kwargs, error, names", GENERATE)
def test_generate(framework, model, kwargs, error, names):
    assert_refused(generate_call(framework, model, kwargs), error, names, GENERATE_SETUP)


def test_a_strategy_this_library_lacks_loads_from_generation_config_json_and_generate_refuses_it(tmp_path):
    """A generation_config.json written for beam sampling still loads (the model stays usable, and generate's
    keywords can override it); generate refuses it as it stands, naming both options."""
    from opt_core.generation import GenerationConfig

    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "num_beams": 4}))
    config = GenerationConfig.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="do_sample=True with num_beams=4"):
        config.validate()


# ----- from_pretrained

FROM_PRETRAINED = [
    row("unknown-option", dict(load_in_4bit=True), UnknownArgumentError, "load_in_4bit"),
    row("misspelt-config-field", dict(dropuot=0.1), UnknownArgumentError, "dropuot"),
    row("two-unknown", dict(load_in_8bit=True, tp_size=2), UnknownArgumentError, "load_in_8bit", "tp_size"),
]
FROM_PRETRAINED_NOT_TORCH = [  # tensor parallelism is torch's
    row("tp_plan", dict(tp_plan="auto"), UnknownArgumentError, "tp_plan", "opt_torch", "torchrun"),
    row("device_map", dict(device_map="auto"), UnknownArgumentError, "device_map", "opt_torch", "accelerate"),
]
FROM_PRETRAINED_TORCH = [  # refused in opt_torch before anything is read
    row("tp_plan-not-auto", dict(tp_plan="colwise"), ConfigError, "tp_plan", "'colwise'"),
    row("tp_plan-without-torchrun", dict(tp_plan="auto"), ConfigError, "torchrun", "WORLD_SIZE"),
    row("tp_plan+quantize", dict(tp_plan="auto", quantize="int8"), ConfigError, "tp_plan='auto'", "quantize='int8'"),
    row("tp_plan+adapter", dict(tp_plan="auto", adapter="a"), ConfigError, "tp_plan='auto'", "adapter='a'"),
    row("device_map-name", dict(device_map="everywhere"), ConfigError, "device_map='everywhere'", "'auto'"),
    row("device_map-negative", dict(device_map=-1), ConfigError, "device_map=-1", "GPU index"),
    row("device_map-no-such-gpu", dict(device_map="cuda:99"), ConfigError, "'cuda:99'", "CUDA device"),
    row("device_map-bad-value", dict(device_map={"lm_head": "tape"}), ConfigError, "device_map['lm_head']='tape'"),
    row("device_map-empty", dict(device_map={}), ConfigError, "device_map", "empty"),
    row("device_map+device", dict(device_map="cpu", device="cpu"), ConfigError, "device_map='cpu'", "device='cpu'"),
    row("device_map+tp_plan", dict(device_map="auto", tp_plan="auto"), ConfigError, "device_map", "tp_plan='auto'"),
]


def load_call(framework, hf_checkpoint, kwargs):
    folder, _ = hf_checkpoint("pre_ln")
    return lambda: framework.load(folder, **kwargs)


@pytest.mark.parametrize("kwargs, error, names", FROM_PRETRAINED)
def test_from_pretrained(framework, hf_checkpoint, kwargs, error, names):
    assert issubclass(error, TypeError)  # Python's answer to an unexpected keyword, as before
    assert_refused(load_call(framework, hf_checkpoint, kwargs), error, names, ("check_overrides",))


@pytest.mark.parametrize("framework", ["tf", "flax"], indirect=True)
@pytest.mark.parametrize("kwargs, error, names", FROM_PRETRAINED_NOT_TORCH)
def test_from_pretrained_not_torch(framework, hf_checkpoint, kwargs, error, names):
    assert_refused(load_call(framework, hf_checkpoint, kwargs), error, names, ("check_overrides",))


@pytest.mark.parametrize("framework", ["torch"], indirect=True)
@pytest.mark.parametrize("kwargs, error, names", FROM_PRETRAINED_TORCH)
def test_from_pretrained_torch(framework, hf_checkpoint, kwargs, error, names, monkeypatch):
    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(error) as info:
        load_call(framework, hf_checkpoint, kwargs)()
    for name in names:
        assert name in str(info.value), f"{name!r} not named in: {info.value}"


# ----- the text-generation pipeline

PIPELINE_BUILD = [
    row("task", dict(task="summarization"), ConfigError, "task", "'summarization'"),
    row("framework", dict(framework="mxnet"), ConfigError, "framework", "'mxnet'"),
    row("model=None", dict(model=None), ConfigError, "model", "None"),
    row("batch_size=0", dict(batch_size=0), ConfigError, "batch_size", "got 0"),
    row("batch_size=-1", dict(batch_size=-1), ConfigError, "batch_size", "got -1"),
    row("batch_size='2'", dict(batch_size="2"), ConfigError, "batch_size", "'2'"),
    row("tokenizer-missing", dict(tokenizer=None), ConfigError, "tokenizer", "None"),
]
PIPELINE_CALL = [
    row("text_inputs-empty-list", dict(text_inputs=[]), InputError, "text_inputs", "[]"),
    row("text_inputs-int", dict(text_inputs=5), InputError, "text_inputs", "5"),
    row("text_inputs-None-in-list", dict(text_inputs=["ab", None]), InputError, "text_inputs[1]", "None"),
    row("return_full_text='no'", dict(return_full_text="no"), ConfigError, "return_full_text", "'no'"),
    row("max_new_tokens=0", dict(max_new_tokens=0), ConfigError, "max_new_tokens", "got 0"),
    row("top_p=1.5", dict(top_p=1.5), ConfigError, "top_p", "got 1.5"),
    row("num_beams=0", dict(num_beams=0), ConfigError, "num_beams", "got 0"),
    row("do_sample+num_beams", dict(do_sample=True, num_beams=2), ConfigError, "do_sample=True", "num_beams=2"),
    row("unknown-option", dict(max_tokens=5), TypeError, "max_tokens"),
]
PIPELINE_FRAMEWORK = {"torch": "pt", "tf": "tf", "flax": "flax"}


@pytest.mark.parametrize("kwargs, error, names", PIPELINE_BUILD)
def test_pipeline_build(framework, model, kwargs, error, names):
    arguments = dict(task="text-generation", model=model, tokenizer=CharTokenizer())
    arguments.update({"framework": PIPELINE_FRAMEWORK[framework.name], **kwargs})
    assert_refused(lambda: pipeline(**arguments), error, names, ("pipeline",))


@pytest.mark.parametrize("kwargs, error, names", PIPELINE_CALL)
def test_pipeline_call(framework, model, kwargs, error, names):
    pipe = pipeline(
        "text-generation", model=model, tokenizer=CharTokenizer(), framework=PIPELINE_FRAMEWORK[framework.name]
    )
    kwargs = {"text_inputs": ["abc", "de", "fgh"], "max_new_tokens": 3, **kwargs}
    assert_refused(lambda: pipe(**kwargs), error, names, ("__call__", "prepare_generation"))


def test_pipeline_checks_every_prompt_before_generating(framework, model, monkeypatch):
    """A bad prompt in a later batch is found before the first batch is generated."""
    pipe = pipeline(
        "text-generation", model=model, tokenizer=CharTokenizer(), framework=PIPELINE_FRAMEWORK[framework.name]
    )
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("generated before the inputs were checked"))
    with pytest.raises(InputError, match=r"text_inputs\[2\]"):
        pipe(["ab", "cd", 7], max_new_tokens=2)


# ----- opt-lm, in process (one subprocess smoke row at the end)


TRAIN = "train --train-files {text} --output {out}"
CONVERT = "convert {model} {out} --to flax"
CLI = [  # id, command line, the option and the value its error line must name
    ("generate-max-new-tokens-0", "generate hi --max-new-tokens 0", "--max-new-tokens", "0"),
    ("generate-max-new-tokens--1", "generate hi --max-new-tokens -1", "--max-new-tokens", "-1"),
    ("generate-top-p-2", "generate hi --top-p 2", "--top-p", "2"),
    ("generate-top-p-0", "generate hi --top-p 0", "--top-p", "0"),
    ("generate-top-p-nan", "generate hi --top-p nan", "--top-p", "nan"),
    ("generate-num-beams-0", "generate hi --num-beams 0", "--num-beams", "0"),
    ("generate-num-beams-abc", "generate hi --num-beams abc", "--num-beams", "abc"),
    ("generate-temperature--1", "generate hi --temperature -1", "--temperature", "-1"),
    ("generate-temperature-0-sample", "generate hi --do-sample --temperature 0", "--temperature", "0"),
    ("generate-top-k--1", "generate hi --top-k -1", "--top-k", "-1"),
    ("generate-repetition-penalty-0", "generate hi --repetition-penalty 0", "--repetition-penalty", "0"),
    ("generate-no-repeat-ngram--1", "generate hi --no-repeat-ngram-size -1", "--no-repeat-ngram-size", "-1"),
    ("generate-penalty-alpha--1", "generate hi --penalty-alpha -1", "--penalty-alpha", "-1"),
    ("generate-sample-beams", "generate hi --do-sample --num-beams 2", "--do-sample", "--num-beams=2"),
    (
        "generate-sample-contrastive",
        "generate hi --do-sample --penalty-alpha 0.6",
        "--penalty-alpha=0.6",
        "--do-sample",
    ),
    ("generate-seed--1", "generate hi --seed -1", "--seed", "-1"),
    ("generate-framework", "generate hi --framework mxnet", "--framework", "'mxnet'"),
    ("generate-missing-model", "generate hi --model /no/such/model", "--model", "/no/such/model"),
    ("generate-dtype", "generate hi --dtype float7", "--dtype", "float7"),
    ("score-missing-file", "score /no/such/file.txt", "file", "/no/such/file.txt"),
    ("score-window-1", "score {text} --window 1", "--window", "1"),
    ("score-window-0", "score {text} --window 0", "--window", "0"),
    ("score-framework", "score {text} --framework jax", "--framework", "'jax'"),
    ("score-missing-model", "score {text} --model /no/such/model", "--model", "/no/such/model"),
    ("score-empty-file", "score {empty}", "file", "no text"),
    ("info-missing-model", "info /no/such/model", "model", "/no/such/model"),
    ("convert-to", "convert {model} {out} --to onnx", "--to", "'onnx'"),
    ("convert-dtype", CONVERT + " --dtype float7", "--dtype", "'float7'"),
    ("convert-max-shard-size-big", CONVERT + " --max-shard-size big", "--max-shard-size", "'big'"),
    ("convert-max-shard-size-0", CONVERT + " --max-shard-size 0", "--max-shard-size", "'0'"),
    ("convert-missing-src", "convert /no/such/model {out} --to flax", "src", "/no/such/model"),
    ("train-seq-len-0", TRAIN + " --seq-len 0", "--seq-len", "0"),
    ("train-seq-len-1", TRAIN + " --seq-len 1", "--seq-len", "1"),
    ("train-batch-size-0", TRAIN + " --batch-size 0", "--batch-size", "0"),
    ("train-steps--1", TRAIN + " --steps -1", "--steps", "-1"),
    ("train-learning-rate-0", TRAIN + " --learning-rate 0", "--learning-rate", "0"),
    ("train-learning-rate--0.001", TRAIN + " --learning-rate -0.001", "--learning-rate", "-0.001"),
    ("train-learning-rate-nan", TRAIN + " --learning-rate nan", "--learning-rate", "nan"),
    ("train-warmup-steps--1", TRAIN + " --warmup-steps -1", "--warmup-steps", "-1"),
    ("train-weight-decay--0.1", TRAIN + " --weight-decay -0.1", "--weight-decay", "-0.1"),
    ("train-clip-norm-0", TRAIN + " --clip-norm 0", "--clip-norm", "0"),
    ("train-eval-every-0", TRAIN + " --eval-every 0", "--eval-every", "0"),
    ("train-save-every-0", TRAIN + " --save-every 0", "--save-every", "0"),
    ("train-vocab-size-10", TRAIN + " --vocab-size 10", "--vocab-size", "10"),
    ("train-save-dtype", TRAIN + " --save-dtype int8", "--save-dtype", "'int8'"),
    ("train-seed--1", TRAIN + " --seed -1", "--seed", "-1"),
    ("train-data-parallel", TRAIN + " --data-parallel zero3", "--data-parallel", "'zero3'"),
    ("train-missing-file", "train --train-files /no/such.txt --output {out}", "--train-files", "/no/such.txt"),
    ("train-missing-eval-file", TRAIN + " --eval-files /no/eval.txt", "--eval-files", "/no/eval.txt"),
    ("no-command", "", "command", "required"),
]


@pytest.fixture
def cli_paths(tmp_path):
    from opt_cli.main import DEFAULT_MODEL

    text, empty = tmp_path / "text.txt", tmp_path / "empty.txt"
    text.write_text("Return the absolute value of the argument.\n")
    empty.write_text("")
    return {"text": str(text), "empty": str(empty), "model": str(DEFAULT_MODEL), "out": str(tmp_path / "out")}


def run_cli(argv, capsys):
    """opt-lm in this process: (exit status, stdout, stderr)."""
    from opt_cli.main import main

    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("command, option, value", [pytest.param(*case[1:], id=case[0]) for case in CLI])
def test_cli(command, option, value, cli_paths, capsys, monkeypatch):
    import opt_cli.frameworks
    import opt_cli.main

    monkeypatch.setattr(opt_cli.frameworks, "load_causal_lm", lambda *a, **k: pytest.fail("loaded a model first"))
    monkeypatch.setattr(opt_cli.main, "run_train", lambda args: pytest.fail("started training first"))
    argv = [arg.format(**cli_paths) for arg in command.split()]
    code, out, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code not in (0, None) and out == "", (code, out)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("opt-lm") and ": error: " in lines[0], err
    assert option in lines[0] and value in lines[0], err
    assert not Path(cli_paths["out"]).exists()  # convert and train wrote nothing


def test_cli_subprocess_smoke():
    """As a user runs it: one line on stderr, status 2, no traceback, before any model is loaded."""
    result = subprocess.run(
        [sys.executable, "-m", "opt_cli.main", "generate", "hi", "--top-p", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == ["opt-lm generate: error: argument --top-p: must be in (0, 1], got 2"]
