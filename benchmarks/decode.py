"""Greedy-decode speed: this project's frameworks against HF transformers' PyTorch OPT, in one run.

    python benchmarks/decode.py [--batch 1 8] [--new-tokens 128] [--prompt 16] [--frameworks torch torch-compile hf]
                                [--quantize int8] [--dtype bfloat16] [--prefill 128]

opt-125m's shape with random weights in fp32, a 16-token prompt and 128 new tokens (eos disabled, so every run
decodes the same number of tokens). For each framework: the first call's time (compilation included), then the best
of `--repeats` timed calls, as new tokens per second, and the ratio to HF in the same run. The memory-bandwidth
bound is the weight bytes each token reads (every parameter once; the tied embedding once, by the LM head) divided by
the read bandwidth this script measures on the same machine.

`--quantize int8` adds, for each of `torch` and `torch-compile` in `--frameworks`, a row of the same model loaded
with `from_pretrained(..., quantize="int8")` (int8 weight-only, `opt_torch.quantization`); their ids are compared
with the first framework's like every row's, and the bound column stays the fp32 bound.

`--dtype bfloat16` loads every row but CTranslate2's in that dtype (`dtype=` in each framework, HF's `dtype=`); the
ids are still compared with the first row's. `--prefill 128` (the default) also times a 1 x 128 prompt with one new
token, the best of `--repeats` calls, as milliseconds.

`ct2` and `ct2-int8` (run when the `ctranslate2` package is installed: `pip install -e ".[bench]"`) are CTranslate2's
Generator on the same weights, converted by its TransformersConverter (fp32, and int8 weights with its int8
compute type), with all cores as intra-op threads. Its converter wants tokenizer files; the benchmark writes a stub
byte-level BPE vocabulary of the embedding's size (token `t{i}` for id i, no merges) beside the random weights,
since only the ids matter here, and decodes from token strings mapped back to ids.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def measure_read_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes per second the machine reads from memory: the best of a sum over a large fp32 tensor and a
    matrix-vector product over a large matrix (decode's own access pattern), with all threads."""
    import torch

    data = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    matrix, vector = data.view(-1, 4096), torch.ones(4096)
    data.sum()  # fault the pages in
    best = min(min(_timed(lambda: data.sum()), _timed(lambda: torch.mv(matrix, vector))) for _ in range(repeats))
    return data.numel() * 4 / best


def bytes_read_per_token() -> int:
    """fp32 bytes of opt-125m's weights one decode step reads: every parameter once (the tied LM head reads the
    whole token embedding), except the position table, of which it reads one row."""
    from opt_core import OPTConfig
    from opt_core.weights import parameter_specs

    config = OPTConfig.from_preset("opt-125m")
    total = sum(int(np.prod(spec.shape)) for spec in parameter_specs(config, "causal_lm"))
    return 4 * (total - (config.num_position_rows - 1) * config.hidden_size)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_checkpoint(folder: Path) -> None:
    """A random-weight opt-125m in HF's format, written once and loaded by every framework."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.OPTConfig.from_dict(
        dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            ffn_dim=3072,
            vocab_size=50272,
            max_position_embeddings=2048,
            word_embed_proj_dim=768,
        )
    )
    transformers.OPTForCausalLM(config).save_pretrained(folder)


def write_stub_vocabulary(folder: Path, size: int = 50272) -> None:
    """Tokenizer files CTranslate2's converter can load: OPT's special tokens at ids 0..3, then `t{i}`."""
    special = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(special + [f"t{i}" for i in range(len(special), size)])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<pad>"}))


def ctranslate2_runner(folder: Path, int8: bool):
    """CTranslate2's Generator over the checkpoint converted to its format (int8 weights with `int8`)."""
    import ctranslate2

    quantization = "int8" if int8 else "float32"
    converted = folder / f"ct2-{quantization}"
    if not converted.exists():
        write_stub_vocabulary(folder)
        converter = ctranslate2.converters.TransformersConverter(str(folder))
        converter.convert(str(converted), quantization=quantization, force=True)
    generator = ctranslate2.Generator(
        str(converted), device="cpu", compute_type=quantization, intra_threads=os.cpu_count() or 1
    )
    vocabulary = json.loads((folder / "vocab.json").read_text())
    token_of = {i: token for token, i in vocabulary.items()}

    def generate(ids, n):
        prompts = [[token_of[int(i)] for i in row] for row in ids]
        results = generator.generate_batch(
            prompts, max_length=n, min_length=n, sampling_topk=1, include_prompt_in_result=False
        )
        new = np.array([[vocabulary[t] for t in r.sequences[0]] for r in results], dtype=np.int64)
        return np.concatenate([ids, new], axis=1)

    return generate


def runner(name: str, folder: Path, dtype: str = "float32"):
    """A function (ids: np.ndarray) -> np.ndarray running greedy decode for `name` ("torch-int8" and
    "torch-compile-int8": the torch rows with int8 weights), its float weights in `dtype`."""
    if name.removesuffix("-int8") in ("torch", "torch-compile"):
        import torch

        import opt_torch

        quantize = "int8" if name.endswith("-int8") else None
        model = opt_torch.OPTForCausalLM.from_pretrained(folder, quantize=quantize, dtype=dtype)
        compiled = name.startswith("torch-compile")
        return lambda ids, n: model.generate(
            torch.from_numpy(ids), max_new_tokens=n, eos_token_id=None, compile=compiled
        ).numpy()
    if name == "hf":
        import torch
        import transformers

        model = transformers.OPTForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()

        def hf(ids, n):
            with torch.no_grad():
                return model.generate(
                    torch.from_numpy(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None
                ).numpy()

        return hf
    if name == "tf":
        import opt_tf

        model = opt_tf.TFOPTForCausalLM.from_pretrained(folder, dtype=dtype)
        return lambda ids, n: np.asarray(model.generate(ids, max_new_tokens=n, eos_token_id=None))
    if name == "flax":
        import opt_flax

        model = opt_flax.FlaxOPTForCausalLM.from_pretrained(folder, dtype=dtype)
        return lambda ids, n: np.asarray(model.generate(ids, max_new_tokens=n, eos_token_id=None))
    if name in ("ct2", "ct2-int8"):
        return ctranslate2_runner(folder, int8=name == "ct2-int8")
    raise ValueError(f"unknown framework {name!r}")


def bench(generate, batch: int, prompt: int, new_tokens: int, repeats: int) -> dict:
    ids = np.random.default_rng(batch).integers(3, 50000, size=(batch, prompt)).astype(np.int64)
    first = _timed(lambda: generate(ids, new_tokens))
    out = generate(ids, new_tokens)
    assert out.shape == (batch, prompt + new_tokens), out.shape
    best = min(_timed(lambda: generate(ids, new_tokens)) for _ in range(repeats))
    return {"first_call_s": first, "best_s": best, "tokens_per_s": batch * new_tokens / best, "ids": out}


def bench_prefill(generate, length: int, repeats: int) -> float:
    """Seconds for a 1 x `length` prompt and one new token (its first call, compilation included, not counted)."""
    ids = np.random.default_rng(length).integers(3, 50000, size=(1, length)).astype(np.int64)
    generate(ids, 1)
    return min(_timed(lambda: generate(ids, 1)) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frameworks", nargs="+", default=["hf", "ct2", "ct2-int8", "torch", "tf", "flax"])
    parser.add_argument("--quantize", choices=("int8",), help="also run the torch rows with int8 weights")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the float weights' dtype")
    parser.add_argument("--prefill", type=int, default=128, help="also time a 1 x N prompt (0: not)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quantize:
        torch_rows = [name for name in args.frameworks if name in ("torch", "torch-compile")]
        args.frameworks += [f"{name}-{args.quantize}" for name in torch_rows]

    import torch

    bandwidth = measure_read_bandwidth()
    weight_bytes = bytes_read_per_token()
    bound = bandwidth / weight_bytes
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch threads "
        f"{torch.get_num_threads()}; read bandwidth {bandwidth / 1e9:.1f} GB/s; opt-125m fp32 weights "
        f"{weight_bytes / 1e6:.0f} MB -> bound {bound:.1f} tokens/s per row at batch 1"
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(Path(tmp))
        reference = {}
        for name in args.frameworks:
            try:
                generate = runner(name, Path(tmp), "float32" if name.startswith("ct2") else args.dtype)
            except ImportError as error:
                print(f"{name}: skipped ({error})")
                continue
            prefill = bench_prefill(generate, args.prefill, args.repeats) if args.prefill else float("nan")
            for batch in args.batch:
                result = bench(generate, batch, args.prompt, args.new_tokens, args.repeats)
                ids = result.pop("ids")
                same = reference.setdefault(batch, ids) is ids or np.array_equal(reference[batch], ids)
                row = {"framework": name, "batch": batch, **result, "same_ids_as_first": bool(same)}
                results.append({**row, "prefill_ms": prefill * 1e3})
    print(
        f"\n{'framework':<20}{'batch':>6}{'first call s':>14}{'tokens/s':>10}{'x HF':>7}{'of bound':>10}"
        f"{f'prefill {args.prefill} ms':>18}  same ids"
    )
    for row in results:
        hf = next((r for r in results if r["framework"] == "hf" and r["batch"] == row["batch"]), None)
        ratio = row["tokens_per_s"] / hf["tokens_per_s"] if hf else float("nan")
        row["ratio_to_hf"] = ratio
        of_bound = row["tokens_per_s"] / row["batch"] / bound if row["batch"] == 1 else float("nan")
        print(
            f"{row['framework']:<20}{row['batch']:>6}{row['first_call_s']:>14.2f}{row['tokens_per_s']:>10.1f}"
            f"{ratio:>7.2f}{of_bound:>10.0%}{row['prefill_ms']:>18.1f}  {row['same_ids_as_first']}"
        )
    if args.json:
        summary = {"bandwidth_Bps": bandwidth, "dtype": args.dtype, "results": results}
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
