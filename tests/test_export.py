"""`opt-lm export`: each target's own runtime, in a fresh process that imports no model framework, gives the
exporting framework's logits (within RUNTIME_ATOL on real tokens), and greedy decoding over ONNX Runtime's past
keys and values gives `generate`'s ids; bad arguments are refused before anything is written, and a failed export
leaves nothing behind.

The round trips on the pre-LN config run in CI; the other configs (post-LN with a projection, an untied head) are
`slow`. One subprocess per runtime call (`opt_export.runtimes`), fed and read through .npz files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_close_on_real_tokens, sample_batch

from opt_cli.main import main as opt_lm

REPO = Path(__file__).resolve().parents[1]
RUNTIME_ATOL = 1e-4  # the bound; measured 5e-7 .. 2e-6 on these configs
BATCH, LENGTH, NEW_TOKENS = 3, 9, 12
# Modules a runtime's process must not have imported: the exporting framework and this library's models.
FORBIDDEN = {
    "onnx": ("torch", "opt_torch"),
    "saved-model": ("opt_tf",),  # tf.saved_model.load imports keras itself
    "tflite": ("tensorflow", "keras", "opt_tf"),
    "stablehlo": ("flax", "opt_flax"),
}
EXPORT_OPTIONS = {"tflite": ["--batch-size", str(BATCH), "--sequence-length", str(LENGTH)]}
VARIANTS = [
    "pre_ln",
    pytest.param("post_ln_proj", marks=pytest.mark.slow),
    pytest.param("untied", marks=pytest.mark.slow),
]

RUN_IN_RUNTIME = """
import sys
import numpy as np
from opt_export import runtimes

folder, inputs, outputs = sys.argv[1:]
data = np.load(inputs)
runner = runtimes.load(folder)
result = {"logits": runner.logits(data["ids"], data["mask"])}
if "new_tokens" in data:
    result["greedy"] = runner.greedy(data["ids"], data["mask"], int(data["new_tokens"]))
watched = ("torch", "tensorflow", "keras", "flax", "opt_torch", "opt_tf", "opt_flax")
imported = [name for name in watched if name in sys.modules]
np.savez(outputs, imported=np.array(imported, dtype=str), **result)
"""


def run_in_runtime(folder: Path, tmp_path: Path, ids, mask, new_tokens: int | None = None) -> dict:
    """Runs the export in a fresh Python process with `opt_export.runtimes`; returns its arrays."""
    inputs, outputs = tmp_path / "inputs.npz", tmp_path / "outputs.npz"
    extra = {} if new_tokens is None else {"new_tokens": np.array(new_tokens)}
    np.savez(inputs, ids=ids, mask=mask, **extra)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    command = [sys.executable, "-c", RUN_IN_RUNTIME, str(folder), str(inputs), str(outputs)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    with np.load(outputs) as data:
        return {name: data[name] for name in data.files}


def export(model, out: Path, target: str, *options: str) -> int:
    return opt_lm(["export", str(model), str(out), "--to", target, *options])


FRAMEWORK_OF = {"onnx": "torch", "saved-model": "tf", "tflite": "tf", "stablehlo": "flax"}


def framework_model(target: str, folder: Path):
    """The exporting framework's own model, through the CLI's numpy adapter (`opt_cli.frameworks`)."""
    from opt_cli.frameworks import load_causal_lm

    return load_causal_lm(FRAMEWORK_OF[target], folder)


def check_optimum_layout(out: Path) -> None:
    """Optimum's decoder-with-past names; batch, sequence and past length symbolic (read back by onnx itself), and
    export.json lists exactly these."""
    import onnx

    graph = onnx.load(out / "model.onnx", load_external_data=False).graph

    def axes(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    inputs, outputs = axes(graph.input), axes(graph.output)
    past = {f"past_key_values.{i}.{kind}" for i in range(2) for kind in ("key", "value")}
    assert set(inputs) == {"input_ids", "attention_mask", "position_ids", *past}
    assert set(outputs) == {"logits", *(name.replace("past_key_values", "present") for name in past)}
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"] == ["batch_size", "past_sequence_length + sequence_length"]
    assert inputs["past_key_values.0.key"] == ["batch_size", 4, "past_sequence_length", 8]
    assert outputs["logits"][0] == "batch_size" and outputs["logits"][2] == 101
    listed = json.loads((out / "export.json").read_text())
    assert {t["name"]: t["shape"] for t in listed["inputs"]} == inputs


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("target", ["onnx", "saved-model", "tflite", "stablehlo"])
def test_round_trip_in_the_runtime(target, variant, hf_checkpoint, tmp_path, capfd):
    folder, _ = hf_checkpoint(variant)
    out = tmp_path / "export"
    if target == "stablehlo":
        out.mkdir()  # an existing empty folder is filled
    assert export(folder, out, target, *EXPORT_OPTIONS.get(target, [])) == 0
    captured = capfd.readouterr()
    assert captured.out == "" and "WARNING" not in captured.err and "I0000" not in captured.err, captured.err

    metadata = json.loads((out / "export.json").read_text())
    assert metadata["target"] == target
    assert {"config.json", "generation_config.json", metadata["file"]} <= set(metadata["files"])
    assert all((out / name).is_file() for name in metadata["files"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    if target == "onnx":
        check_optimum_layout(out)

    ids, mask = sample_batch(seed=3, batch=BATCH, length=LENGTH)
    new_tokens = NEW_TOKENS if target == "onnx" else None
    ran = run_in_runtime(out, tmp_path, ids, mask, new_tokens)
    assert not set(ran["imported"]) & set(FORBIDDEN[target]), ran["imported"]

    model = framework_model(target, folder)
    diff = assert_close_on_real_tokens(ran["logits"], model.logits(ids, mask), mask, RUNTIME_ATOL)
    print(f"{target} {variant}: max |logits - framework's| on real tokens {diff:.2e}")
    if new_tokens is not None:
        expected = model.generate(ids, mask, max_new_tokens=new_tokens, do_sample=False)
        np.testing.assert_array_equal(ran["greedy"], expected)
        check_greedy_stops_at_eos(out, tmp_path, model, ids, mask, eos=int(expected[0, LENGTH + 1]))


def check_greedy_stops_at_eos(out: Path, tmp_path: Path, model, ids, mask, eos: int) -> None:
    """With row 0's second new token as eos (read from the export's generation_config.json), that row is padded
    from there on while the others go on, and decoding stops when all have met it: `generate`'s ids."""
    config = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    ran = run_in_runtime(out, tmp_path, ids, mask, NEW_TOKENS)
    expected = model.generate(ids, mask, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos)
    assert (expected[0, LENGTH + 2 :] == model.config.pad_token_id).all()
    np.testing.assert_array_equal(ran["greedy"], expected)


def refused(capfd, *argv: str) -> str:
    """Runs `opt-lm export ...`, which must fail with exit status 2; returns its stderr."""
    try:
        code = opt_lm(["export", *argv])
    except SystemExit as exit_:  # argparse's refusals
        code = exit_.code
    assert code == 2
    return capfd.readouterr().err


def test_bad_arguments_are_refused_before_anything_is_written(hf_checkpoint, tmp_path, capfd):
    from opt_core.config import OPTConfig
    from opt_core.quantization import with_quantization_config

    folder, _ = hf_checkpoint("pre_ln")
    new = tmp_path / "new"
    assert "invalid choice: 'coreml'" in refused(capfd, str(folder), str(new), "--to", "coreml")
    assert "is not an existing folder" in refused(capfd, str(tmp_path / "missing"), str(new), "--to", "onnx")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert "exists and is not empty" in refused(capfd, str(folder), str(full), "--to", "onnx")
    assert (full / "keep.txt").read_text() == "mine" and len(list(full.iterdir())) == 1
    (tmp_path / "file").write_text("")
    assert "is not a folder" in refused(capfd, str(folder), str(tmp_path / "file"), "--to", "stablehlo")
    assert "--sequence-length does not apply to --to onnx" in refused(
        capfd, str(folder), str(new), "--to", "onnx", "--sequence-length", "8"
    )
    assert "must be in 1..40" in refused(capfd, str(folder), str(new), "--to", "tflite", "--sequence-length", "41")
    assert "--opset must be in 18..23" in refused(capfd, str(folder), str(new), "--to", "onnx", "--opset", "13")
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    with_quantization_config(OPTConfig.from_pretrained(folder), True).save_pretrained(quantized)
    assert "int8" in refused(capfd, str(quantized), str(new), "--to", "saved-model")
    assert not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full", "quantized"]


def test_a_failed_export_leaves_nothing(hf_checkpoint, tmp_path, monkeypatch, capfd):
    """The exporter dies after writing: no output folder, no staging folder; a killed export's staging folder
    (a dead process's) is removed by the next export."""
    import opt_export.stablehlo

    folder, _ = hf_checkpoint("pre_ln")
    killed = tmp_path / ".export.exporting-abc.999999999.partial"
    killed.mkdir()
    (killed / "model.jax_exported").write_bytes(b"half")

    def crash(model_folder, config, out):
        (out / "model.jax_exported").write_bytes(b"half")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(opt_export.stablehlo, "export_stablehlo", crash)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export(folder, tmp_path / "export", "stablehlo")
    assert list(tmp_path.iterdir()) == []
