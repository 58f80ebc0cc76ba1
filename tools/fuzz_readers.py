"""Coverage-guided fuzzing of every file reader: checkpoints in each format, shard indexes, metaseq `.pt`,
config.json, generation_config.json and the tokenizer files.

    python tools/fuzz_readers.py --seconds 600                 # every target, 10 minutes each
    python tools/fuzz_readers.py --targets safetensors h5 --seconds 60
    python tools/fuzz_readers.py --make-seeds                  # rewrite the seed inputs (needs torch)

An input is a folder of files (a checkpoint file, or an index with its shards, or a tokenizer's files). Each
round takes an input from the corpus, mutates it (bytes: flips, interesting integers, chunk copies, splices,
truncation; structure: the JSON inside safetensors headers, index and config files, the msgpack tree, the
entries of a `.bin` zip, the lines of merges.txt) and runs the reader on it. The oracle (`check`) allows two
outcomes: the reader returns (and its arrays can be read end to end), or it raises this library's `OPTError`
naming one of the input's files. Anything else is a crasher: another exception, an error that names no file,
more than `SLACK_BYTES` + twice the input's size allocated (tracemalloc), more than `TIMEOUT_S` seconds, or the
interpreter dying (the worker runs in a child process; the parent keeps the input that killed it).

Inputs that reach new code (line-to-line arcs in the readers, traced with `sys.settrace`) join the corpus.
Crashers are minimised (chunk deletion while the signature stays the same) and written to
`tests/fuzz_corpus/<target>/crash-*`, where `tests/test_fuzz_corpus.py` replays them with the same oracle.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import tracemalloc
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from opt_core.errors import OPTError  # noqa: E402

CORPUS = ROOT / "tests" / "fuzz_corpus"
TIMEOUT_S = 10.0
SLACK_BYTES = 16 * 2**20  # Python objects of a parsed header, the tokenizer's tables: not the file's size
MAX_INPUT_BYTES = 1 << 20
TRACED = ("opt_core/", "conversion/", "/zipfile", "/h5py/", "/json/", "/pickle")

Files = dict[str, bytes]


# ----- the oracle


class Hang(BaseException):
    """Raised by the timer when one read takes longer than TIMEOUT_S."""


@dataclasses.dataclass(frozen=True)
class Outcome:
    kind: str  # "ok", "refused" or "crash"
    signature: str = ""
    detail: str = ""


def write_files(folder: Path, files: Files) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def _touch(value, seen: int = 0) -> int:
    """Reads every array of a reader's result end to end, so a lazy or mapped view that is wrong fails here."""
    if isinstance(value, dict):
        return sum(_touch(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_touch(v) for v in value)
    if hasattr(value, "load") and hasattr(value, "shape"):  # LazyTensor
        value = value.load()
    if isinstance(value, np.ndarray):
        return len(np.ascontiguousarray(value).tobytes())
    return 0


def _where(error: BaseException) -> str:
    """The innermost frame of the traceback inside this repository (or the innermost one), as file:line."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if f.filename.startswith(str(ROOT)) and "/tools/" not in f.filename]
    frame = (ours or frames or [None])[-1]
    if frame is None:
        return "?"
    inside = frame.filename.startswith(str(ROOT))
    return f"{os.path.relpath(frame.filename, ROOT) if inside else frame.filename}:{frame.lineno}"


def check(target: Target, folder: Path, files: Files) -> Outcome:
    """Runs `target` on `files` written into `folder`, and judges the outcome (see the module docstring)."""
    write_files(folder, files)
    size = sum(len(data) for data in files.values())
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TIMEOUT_S)
    tracemalloc.start()
    try:
        _touch(target.read(folder))
        outcome = Outcome("ok")
    except OPTError as e:
        message = str(e)
        named = str(folder) in message or any(name in message for name in files)
        outcome = (
            Outcome("refused") if named else Outcome("crash", f"unnamed {type(e).__name__} at {_where(e)}", message)
        )
    except Hang as e:
        outcome = Outcome("crash", f"hang at {_where(e)}")
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 (the point: anything but OPTError is a finding)
        outcome = Outcome("crash", f"{type(e).__name__} at {_where(e)}", "".join(traceback.format_exception(e))[-3000:])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    if outcome.kind != "crash" and peak > 2 * size + SLACK_BYTES:
        return Outcome("crash", f"memory {outcome.kind}", f"peak {peak} bytes for {size} bytes of input")
    return outcome


def _on_alarm(signum, frame):
    raise Hang()


# ----- targets


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    read: Callable[[Path], object]
    modules: tuple[str, ...]  # the repository files whose line coverage is reported
    structured: dict[str, Callable[[bytes, random.Random], bytes]]  # file name -> structure-aware mutator
    dictionary: tuple[bytes, ...] = ()


def _read_format(fmt: str) -> Callable[[Path], object]:
    def read(folder: Path):
        from opt_core import keras_h5
        from opt_core.formats import read_checkpoint

        keras_h5.CHILD_TIMEOUT_S = TIMEOUT_S / 2  # the h5 parser's child process: a hang is refused, not waited on
        return read_checkpoint(folder, fmt)[1]

    return read


def _parse_h5_here(folder: Path):
    """The h5 parser without its child process: fast and traced, so coverage guides it; a libhdf5 hang or crash
    here kills the worker (kept as a crasher), where `read_h5` would have refused the file from its child."""
    from opt_core import keras_h5

    return keras_h5._parse_h5(folder / "tf_model.h5")


def _read_metaseq(folder: Path):
    from conversion.metaseq import load_metaseq

    return load_metaseq(folder, None)[1]


def _read_config(folder: Path):
    from opt_core.config import OPTConfig

    config = OPTConfig.from_pretrained(folder)
    return config.to_dict()


def _read_generation_config(folder: Path):
    from opt_core.config import OPTConfig
    from opt_core.generation import load_generation_config

    config = OPTConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, ffn_dim=16, num_attention_heads=2)
    return load_generation_config(folder, config).to_dict()


def _read_tokenizer(folder: Path):
    from opt_core.tokenizer import OPTTokenizer

    tokenizer = OPTTokenizer.from_pretrained(folder)
    ids = tokenizer("Hello world, héllo </s><pad> 12", "a pair")["input_ids"]
    return [tokenizer.decode(ids), tokenizer.decode(ids, skip_special_tokens=True)]


# ----- mutation


INTERESTING = [
    0,
    1,
    -1,
    0x7F,
    0x80,
    0xFF,
    0x7FFF,
    0xFFFF,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**63 - 1,
    2**63,
    2**64 - 1,
]
HOSTILE_JSON = [
    0, -1, 1, 2**31, 2**63, 2**64, 10**30, -(10**30), 1e308, -0.0, 0.5, "", "x" * 1000, None, True, False,
    [], {}, [0, -1], [2**40, 2**40], "F16", "BF16", "F64", "I8", "BOOL", "U8", "F8_E4M3", "../../etc/passwd",
    "/etc/passwd", "model.safetensors", "\x00", "é", [[[[[[[[]]]]]]]],
]  # fmt: skip


def _mutate_bytes(data: bytes, rng: random.Random, others: list[bytes], dictionary: tuple[bytes, ...]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 3, 4, 8])):
        op = rng.randrange(11)
        n = len(buf)
        if n == 0:
            buf += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
            continue
        i = rng.randrange(n)
        if op == 0:
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[i] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif op == 2 and n >= 8:
            width, fmt = rng.choice([(2, "<H"), (4, "<I"), (8, "<Q"), (2, ">H"), (4, ">I"), (8, ">Q")])
            i = rng.randrange(n - width + 1)
            value = rng.choice(INTERESTING) % (1 << (8 * width))
            if rng.random() < 0.3:
                value = (int.from_bytes(buf[i : i + width], "little") + rng.choice([-1, 1, 16, -16])) % (
                    1 << (8 * width)
                )
            buf[i : i + width] = struct.pack(fmt, value)
        elif op == 3:
            j = min(n, i + rng.choice([1, 2, 4, 8, 64, 512]))
            del buf[i:j]
        elif op == 4:
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 4, 8, 32])))
        elif op == 5:
            j = min(n, i + rng.choice([1, 4, 16, 128]))
            k = rng.randrange(n)
            buf[k:k] = buf[i:j]
        elif op == 6:
            del buf[rng.randrange(n) :]
        elif op == 7 and others:
            other = rng.choice(others)
            if other:
                k = rng.randrange(len(other))
                buf[i:] = other[k:]
        elif op == 8 and dictionary:
            word = rng.choice(dictionary)
            if rng.random() < 0.5:
                buf[i:i] = word
            else:
                buf[i : i + len(word)] = word
        elif op == 9:
            number = rng.choice([b"9" * 30, b"-1", b"0", b"18446744073709551616", b"1e999", b"NaN"])
            buf[i : i + rng.randrange(1, 4)] = number
        else:
            j = min(n, i + rng.choice([4, 64, 1024]))
            buf[i:j] = bytes(j - i)
    return bytes(buf[:MAX_INPUT_BYTES])


def _mutate_tree(node, rng: random.Random, depth: int = 0):
    """A copy of a JSON or msgpack tree with one node replaced, removed or added."""
    if isinstance(node, dict) and node and rng.random() < 0.8:
        key = rng.choice(list(node))
        node = dict(node)
        roll = rng.random()
        if roll < 0.15:
            del node[key]
        elif roll < 0.25:
            node[rng.choice(["extra", f"{key}_", "__metadata__", "weight_map", "dtype", "shape"])] = rng.choice(
                HOSTILE_JSON
            )
        else:
            node[key] = _mutate_tree(node[key], rng, depth + 1)
        return node
    if isinstance(node, list) and node and rng.random() < 0.8:
        node = list(node)
        i = rng.randrange(len(node))
        roll = rng.random()
        if roll < 0.15:
            del node[i]
        elif roll < 0.25:
            node.insert(i, node[i])
        else:
            node[i] = _mutate_tree(node[i], rng, depth + 1)
        return node
    if isinstance(node, int) and not isinstance(node, bool) and rng.random() < 0.5:
        return node + rng.choice([-1, 1, -node, node, 2**32, 2**62, -(2**62)])
    if rng.random() < 0.05:  # nesting (the byte mutations add deeper brackets than json.dumps could write)
        nested = []
        for _ in range(rng.choice([3, 60])):
            nested = [nested] if rng.random() < 0.5 else {"a": nested}
        return nested
    return rng.choice(HOSTILE_JSON)


def _mutate_json(data: bytes, rng: random.Random) -> bytes:
    try:
        tree = json.loads(data)
    except (ValueError, RecursionError):
        return data
    try:
        return json.dumps(_mutate_tree(tree, rng)).encode()
    except (ValueError, RecursionError):
        return data


def _mutate_safetensors(data: bytes, rng: random.Random) -> bytes:
    if len(data) < 8:
        return data
    (length,) = struct.unpack("<Q", data[:8])
    header, rest = data[8 : 8 + length], data[8 + length :]
    header = _mutate_json(header, rng)
    if rng.random() < 0.2:
        header = header + b" " * rng.randrange(8)  # safetensors pads headers with spaces
    new_length = len(header) if rng.random() < 0.9 else rng.choice(INTERESTING) % 2**64
    return struct.pack("<Q", new_length) + header + rest


def _mutate_msgpack(data: bytes, rng: random.Random) -> bytes:
    try:
        tree = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 (a byte-mutated input that no longer decodes: mutate its bytes instead)
        return data

    def ext_aware(node):
        if isinstance(node, msgpack.ExtType):
            try:
                inner = msgpack.unpackb(node.data, raw=False)
                return msgpack.ExtType(node.code, msgpack.packb(_mutate_tree(inner, rng), use_bin_type=True))
            except Exception:  # noqa: BLE001
                return msgpack.ExtType(node.code, node.data[: rng.randrange(len(node.data) + 1)])
        return _mutate_tree(node, rng)

    path = []
    node = tree
    while isinstance(node, dict) and node and rng.random() < 0.7:
        key = rng.choice(list(node))
        path.append((node, key))
        node = node[key]
    new = ext_aware(node)
    if path:
        parent, key = path[-1]
        parent[key] = new
    else:
        tree = new
    try:
        return msgpack.packb(tree, use_bin_type=True)
    except Exception:  # noqa: BLE001
        return data


PICKLE_WORDS = (
    b"(", b"]", b"}", b")", b"t", b"R", b"b", b"s", b"u", b"e", b"a", b"h\x00", b"q\x00", b"0", b"2", b"1",
    b"\x80\x02", b"\x80\x05", b"\x95", b"\x8c\x05torch", b"ctorch._utils\n_rebuild_tensor_v2\n",
    b"ctorch\nFloatStorage\n", b"cos\nsystem\n", b"cbuiltins\neval\n", b"ccollections\nOrderedDict\n", b"Q",
    b"X\xff\xff\xff\x7f", b"B\xff\xff\xff\xff", b"J\xff\xff\xff\x7f", b"M\xff\xff", b"\x8a\x08" + b"\xff" * 8,
    b"(" * 5000, b"]" * 5000, b"}" * 5000,
)  # fmt: skip


def _mutate_zip(data: bytes, rng: random.Random) -> bytes:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = [(info, archive.read(info)) for info in archive.infolist()]
    except Exception:  # noqa: BLE001
        return data
    if not entries:
        return data
    out = io.BytesIO()
    pick = rng.randrange(len(entries))
    with zipfile.ZipFile(out, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate entry names are one of the mutations
        for i, (info, content) in enumerate(entries):
            if i == pick:
                content = _mutate_bytes(content, rng, [], PICKLE_WORDS)
            if rng.random() < 0.05:
                info.filename = rng.choice(["../evil", "x/" + info.filename, info.filename + "/", "a" * 300])
            compress = zipfile.ZIP_DEFLATED if rng.random() < 0.2 else zipfile.ZIP_STORED
            archive.writestr(info.filename, content, compress_type=compress)
        if rng.random() < 0.1:
            archive.writestr(
                entries[0][0].filename.split("/")[0] + "/data/99", b"\x00" * 64 * 1024, zipfile.ZIP_DEFLATED
            )
    return out.getvalue()


def _mutate_lines(data: bytes, rng: random.Random) -> bytes:
    lines = data.split(b"\n")
    i = rng.randrange(len(lines))
    roll = rng.random()
    if roll < 0.2:
        del lines[i]
    elif roll < 0.4:
        lines.insert(i, lines[i])
    elif roll < 0.6:
        lines[i] = rng.choice(
            [b"", b"a", b"a b c", b" ", b"\xff\xfe", b"#version: 0.2", b"a  b", "é ü".encode(), b"\x00 \x00"]
        )
    elif roll < 0.8:
        lines[i] = lines[i].replace(b" ", b"", 1) if rng.random() < 0.5 else lines[i] + b" x"
    else:
        lines[i], lines[0] = lines[0], lines[i]
    return b"\n".join(lines)


JSON_WORDS = (b'"', b"{", b"}", b"[", b"]", b",", b":", b"null", b"-1", b"1e400", b"\\u0000", b'"dtype"', b'"shape"')
SAFETENSORS_WORDS = JSON_WORDS + (b'"data_offsets"', b'"__metadata__"', b'"F16"', b'"BF16"', b'"I64"', b'"F8_E5M2"')
H5_WORDS = (b"\x89HDF\r\n\x1a\n", b"OHDR", b"TREE", b"HEAP", b"SNOD", b"GCOL", b"FHDB", b"layer_names", b"weight_names")


def _targets() -> dict[str, Target]:
    st = "opt_core/safetensors_file.py"
    json_files = {"config.json": _mutate_json, "generation_config.json": _mutate_json}
    return {
        t.name: t
        for t in [
            Target(
                "safetensors",
                _read_format("safetensors"),
                (st,),
                {"model.safetensors": _mutate_safetensors},
                SAFETENSORS_WORDS,
            ),
            Target(
                "index",
                _read_format("safetensors"),
                ("opt_core/files.py", "opt_core/formats.py", st),
                {
                    "model.safetensors.index.json": _mutate_json,
                    "model-00001-of-00002.safetensors": _mutate_safetensors,
                    "model-00002-of-00002.safetensors": _mutate_safetensors,
                },
                SAFETENSORS_WORDS + (b'"weight_map"', b"model-00001-of-00002.safetensors", b"../"),
            ),
            Target(
                "pytorch-zip",
                _read_format("pytorch"),
                ("opt_core/torch_pickle.py",),
                {"pytorch_model.bin": _mutate_zip},
                PICKLE_WORDS,
            ),
            Target("pytorch-legacy", _read_format("pytorch"), ("opt_core/torch_pickle.py",), {}, PICKLE_WORDS),
            Target(
                "metaseq",
                _read_metaseq,
                ("conversion/metaseq.py", "opt_core/torch_pickle.py"),
                {"reshard-model_part-0.pt": _mutate_zip, "reshard-model_part-1.pt": _mutate_zip},
                PICKLE_WORDS,
            ),
            Target("h5", _read_format("tf"), ("opt_core/keras_h5.py",), {}, H5_WORDS),
            Target("h5-parser", _parse_h5_here, ("opt_core/keras_h5.py",), {}, H5_WORDS),
            Target(
                "msgpack", _read_format("flax"), ("opt_core/flax_msgpack.py",), {"flax_model.msgpack": _mutate_msgpack}
            ),
            Target("config", _read_config, ("opt_core/config.py",), json_files, JSON_WORDS),
            Target("generation-config", _read_generation_config, ("opt_core/generation.py",), json_files, JSON_WORDS),
            Target(
                "tokenizer",
                _read_tokenizer,
                ("opt_core/tokenizer.py",),
                {
                    "vocab.json": _mutate_json,
                    "merges.txt": _mutate_lines,
                    "tokenizer.json": _mutate_json,
                    "tokenizer_config.json": _mutate_json,
                    "special_tokens_map.json": _mutate_json,
                },
                JSON_WORDS + (b"</s>", b"<pad>", b"\xc4\xa0", b"#version: 0.2\n"),
            ),
        ]
    }


TARGETS = _targets()


def mutate(target: Target, files: Files, rng: random.Random, corpus: list[Files]) -> Files:
    files = dict(files)
    name = rng.choice(sorted(files))
    structured = target.structured.get(name)
    if structured is not None and rng.random() < 0.5:
        files[name] = structured(files[name], rng)
    else:
        others = [c[name] for c in rng.sample(corpus, min(4, len(corpus))) if name in c]
        files[name] = _mutate_bytes(files[name], rng, others, target.dictionary)
    return files


# ----- coverage


class Coverage:
    """Line-to-line arcs executed in the traced files (the readers, zipfile, h5py, json, pickle)."""

    def __init__(self) -> None:
        self.arcs: set[tuple] = set()
        self._wanted: dict[str, bool] = {}

    def wanted(self, filename: str) -> bool:
        hit = self._wanted.get(filename)
        if hit is None:
            hit = self._wanted[filename] = "/tools/" not in filename and any(t in filename for t in TRACED)
        return hit

    def run(self, fn: Callable[[], Outcome]) -> tuple[Outcome, set[tuple]]:
        arcs: set[tuple] = set()

        def call(frame, event, arg):
            if event != "call" or not self.wanted(frame.f_code.co_filename):
                return None
            code, last = frame.f_code, [frame.f_lineno]

            def line(frame, event, arg):
                if event == "line" or event == "return":
                    now = frame.f_lineno if event == "line" else -1
                    arcs.add((code, last[0], now))
                    last[0] = now
                return line

            return line

        sys.settrace(call)
        try:
            outcome = fn()
        finally:
            sys.settrace(None)
        new = arcs - self.arcs
        self.arcs |= new
        return outcome, new

    def lines(self, module: str) -> tuple[int, int]:
        """(lines covered, executable lines) of one repository file."""
        path = str(ROOT / module)
        covered = {(a[0].co_filename, a[2]) for a in self.arcs if a[0].co_filename == path and a[2] > 0}
        source = compile(Path(path).read_text(), path, "exec")
        executable, todo = set(), [source]
        while todo:
            code = todo.pop()
            executable.update(line for _, _, line in code.co_lines() if line)
            todo.extend(c for c in code.co_consts if hasattr(c, "co_lines"))
        return len({line for _, line in covered} & executable), len(executable)


# ----- corpus on disk


def load_folder(folder: Path) -> Files:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def save_folder(folder: Path, files: Files) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def digest(files: Files) -> str:
    h = hashlib.sha1()
    for name, data in sorted(files.items()):
        h.update(name.encode() + b"\0" + data)
    return h.hexdigest()[:12]


def stored_inputs(target: str) -> list[tuple[Path, Files]]:
    base = CORPUS / target
    return [(p, load_folder(p)) for p in sorted(base.iterdir()) if p.is_dir()] if base.is_dir() else []


# ----- minimising


def minimise(target: Target, folder: Path, files: Files, signature: str, budget_s: float = 30.0) -> Files:
    """A smaller input with the same crash signature: whole files dropped, then chunks of each file deleted."""
    deadline = time.monotonic() + budget_s

    def same(candidate: Files) -> bool:
        return check(target, folder, candidate).signature == signature

    for name in sorted(files):
        if len(files) > 1 and time.monotonic() < deadline:
            candidate = {k: v for k, v in files.items() if k != name}
            if same(candidate):
                files = candidate
    for name in sorted(files):
        chunk = max(1, len(files[name]) // 2)
        while chunk >= 1 and time.monotonic() < deadline:
            data, i, progressed = files[name], 0, False
            while i < len(data) and time.monotonic() < deadline:
                candidate = dict(files, **{name: data[:i] + data[i + chunk :]})
                if same(candidate):
                    files, data, progressed = candidate, candidate[name], True
                else:
                    i += chunk
            if not progressed:
                chunk //= 2
    return files


# ----- the worker: one target, in-process


@dataclasses.dataclass
class Stats:
    target: str
    executions: int = 0
    corpus: int = 0
    arcs: int = 0
    crashes: dict = dataclasses.field(default_factory=dict)
    lines: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


def fuzz(
    target: Target, seconds: float, seed: int, scratch: Path, out: Path | None, stats_path: Path | None = None
) -> tuple[Stats, list[Files]]:
    """Fuzzes one target for `seconds`; crashers go to `out/crash-*` (minimised) when `out` is given."""
    rng = random.Random(seed)
    coverage = Coverage()
    folder = scratch / "input"
    corpus: list[Files] = []
    stats = Stats(target.name)
    fresh: list[Files] = []  # inputs this run found that reached new code
    start = time.monotonic()
    # Inputs that killed a worker (a hang or crash inside a C library) would kill this one too: not replayed here.
    seeds = [
        files for path, files in stored_inputs(target.name) if not path.name.startswith(("crash-signal", "crash-exit"))
    ]
    if not seeds:
        raise SystemExit(f"no seed inputs in {CORPUS / target.name}; run with --make-seeds")
    for files in seeds:
        coverage.run(lambda f=files: check(target, folder, f))
        corpus.append(files)
    start = time.monotonic()  # the budget is for new inputs, after the stored ones are replayed
    last_report = 0.0
    while time.monotonic() - start < seconds:
        files = mutate(target, rng.choice(corpus), rng, corpus)
        (scratch / "current.json").write_text(json.dumps(sorted(files)))
        outcome, new = coverage.run(lambda f=files: check(target, folder, f))
        stats.executions += 1
        if outcome.kind == "crash" and outcome.signature not in stats.crashes:
            small = minimise(target, folder, files, outcome.signature)
            stats.crashes[outcome.signature] = outcome.detail[-1500:]
            if out is not None:
                save_folder(out / f"crash-{digest(small)}", small)
            print(f"[{target.name}] crash: {outcome.signature}", file=sys.stderr, flush=True)
        elif new and outcome.kind != "crash":
            corpus.append(files)
            fresh.append(files)
        now = time.monotonic() - start
        if stats_path is not None and now - last_report > 5:
            last_report = now
            _report(stats, coverage, corpus, target, now, stats_path)
    _report(stats, coverage, corpus, target, time.monotonic() - start, stats_path)
    return stats, fresh


def _report(stats: Stats, coverage: Coverage, corpus: list, target: Target, seconds: float, path: Path | None) -> None:
    stats.corpus, stats.arcs, stats.seconds = len(corpus), len(coverage.arcs), round(seconds, 1)
    stats.lines = {m: coverage.lines(m) for m in target.modules}
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(stats), indent=1))
        os.replace(tmp, path)


def keep_regression_inputs(target: Target, corpus: list[Files], limit: int = 12, max_bytes: int = 48_000) -> None:
    """The last inputs this run found reaching new code (the deepest), kept under tests/ so CI replays them."""
    base = CORPUS / target.name
    for old in base.glob("cov-*"):
        shutil.rmtree(old)
    small = [files for files in corpus if sum(map(len, files.values())) <= max_bytes]
    for files in small[-limit:]:
        save_folder(base / f"cov-{digest(files)}", files)


# ----- the parent: restarts a worker the interpreter died in


def run_target(name: str, seconds: float, seed: int, workdir: Path) -> dict:
    """Fuzzes `name` in child processes for `seconds` in all; a child killed by a signal or a hang is a crasher."""
    scratch = workdir / name
    scratch.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + seconds
    total = {"target": name, "executions": 0, "crashes": {}, "restarts": 0}
    round_ = 0
    while (left := deadline - time.monotonic()) > 1:
        stats_path = scratch / f"stats-{round_}.json"
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--seconds",
            str(left),
            "--seed",
            str(seed + round_),
            "--workdir",
            str(workdir),
        ]
        cmd += ["--stats", str(stats_path)]
        child = subprocess.Popen(cmd)
        last_change, last_mtime = time.monotonic(), 0.0
        while child.poll() is None:
            time.sleep(1)
            mtime = stats_path.stat().st_mtime if stats_path.exists() else 0.0
            if mtime != last_mtime:
                last_change, last_mtime = time.monotonic(), mtime
            if time.monotonic() - last_change > 60 + TIMEOUT_S:
                child.kill()
        child.wait()
        if child.returncode != 0:
            kind = f"signal {-child.returncode}" if child.returncode < 0 else f"exit {child.returncode}"
            kept = CORPUS / name / f"crash-{kind.replace(' ', '')}-{round_}"
            if (scratch / "input").is_dir():
                save_folder(kept, load_folder(scratch / "input"))
            total["crashes"][f"worker died ({kind})"] = str(kept)
            total["restarts"] += 1
            print(f"[{name}] worker died ({kind}); input kept in {kept}", file=sys.stderr)
        if stats_path.exists():
            stats = json.loads(stats_path.read_text())
            total["executions"] += stats["executions"]
            total["crashes"].update(stats["crashes"])
            total.update({k: stats[k] for k in ("corpus", "arcs", "lines")})
        round_ += 1
    total["seconds"] = seconds
    return total


# ----- seeds


def make_seeds() -> None:
    """Writes valid inputs for every target into tests/fuzz_corpus/<target>/seed-*: a tiny OPT in every format."""
    from opt_core.config import OPTConfig
    from opt_core.formats import FORMATS, write_tensors
    from opt_core.generation import GenerationConfig
    from opt_core.weights import fresh_parameter, parameter_specs, to_file_tensors

    config = OPTConfig(
        vocab_size=16, hidden_size=8, num_hidden_layers=1, ffn_dim=16, num_attention_heads=2, max_position_embeddings=8
    )
    rng = np.random.default_rng(0)
    canonical = {spec.name: fresh_parameter(spec, config, rng) for spec in parameter_specs(config)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def seed(target: str, label: str, folder: Path, names: list[str] | None = None) -> None:
            files = load_folder(folder)
            if names is not None:
                files = {k: v for k, v in files.items() if k in names}
            dest = CORPUS / target / f"seed-{label}"
            shutil.rmtree(dest, ignore_errors=True)
            save_folder(dest, files)

        for target, fmt, label in [
            ("safetensors", "safetensors", "tiny"),
            ("pytorch-zip", "pytorch", "tiny"),
            ("h5", "tf", "tiny"),
            ("h5-parser", "tf", "tiny"),
            ("msgpack", "flax", "tiny"),
        ]:
            folder = tmp / target
            write_tensors(to_file_tensors(canonical, config, "causal_lm", FORMATS[fmt].style), folder, fmt)
            seed(target, label, folder, [p.name for p in folder.iterdir() if p.name != "config.json"])
        folder = tmp / "index"
        write_tensors(
            to_file_tensors(canonical, config, "causal_lm", "torch"), folder, "safetensors", max_shard_size=2000
        )
        files = load_folder(folder)
        assert len(files) == 3, files.keys()
        seed("index", "two-shards", folder)
        folder = tmp / "config"
        config.save_pretrained(folder)
        GenerationConfig.from_model_config(config).save_pretrained(folder)
        seed("config", "tiny", folder, ["config.json"])
        seed("generation-config", "tiny", folder, ["generation_config.json"])
        _tokenizer_seeds(tmp, seed)
        _torch_seeds(tmp, canonical, config, seed)


def _tokenizer_seeds(tmp: Path, seed) -> None:
    from opt_core.tokenizer import train_bpe_tokenizer

    folder = tmp / "tokenizer"
    texts = ["hello world, héllo there 12 34", "the quick brown fox jumps over the lazy dog"] * 4
    train_bpe_tokenizer(texts, vocab_size=280, folder=folder)
    seed(
        "tokenizer",
        "vocab-merges",
        folder,
        ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"],
    )
    seed("tokenizer", "tokenizer-json", folder, ["tokenizer.json", "tokenizer_config.json"])


def _torch_seeds(tmp: Path, canonical: dict, config, seed) -> None:
    """The pickle formats torch itself writes: the legacy (pre-1.6) `.bin`, and a metaseq `restored.pt`."""
    import torch

    from opt_core.weights import to_file_tensors

    state = {
        k: torch.from_numpy(np.array(v)) for k, v in to_file_tensors(canonical, config, "causal_lm", "torch").items()
    }
    folder = tmp / "legacy"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    seed("pytorch-legacy", "torch-legacy", folder)
    folder = tmp / "metaseq"
    folder.mkdir()
    sys.path.insert(0, str(ROOT / "tests"))
    from test_conversion import metaseq_options, metaseq_parts

    options = metaseq_options(config)
    for p, part in enumerate(metaseq_parts(state, 2)):
        obj = {"model": part, "cfg": {"model": options}, "optimizer_history": [{"num_updates": 1}]}
        torch.save(obj, folder / f"reshard-model_part-{p}.pt")
    seed("metaseq", "two-parts", folder)


# ----- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=sorted(TARGETS))
    parser.add_argument("--seconds", type=float, default=600.0, help="per target (default 600)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch space (default: a temporary folder)")
    parser.add_argument("--report", type=Path, default=None, help="write the per-target results here as JSON")
    parser.add_argument("--make-seeds", action="store_true", help="rewrite the seed inputs and exit")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stats", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make_seeds:
        make_seeds()
        return 0
    workdir = args.workdir or Path(
        tempfile.mkdtemp(prefix="opt-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    )
    if args.worker:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # a bomb that escapes tracemalloc dies here
        target = TARGETS[args.worker]
        _, fresh = fuzz(target, args.seconds, args.seed, workdir / target.name, CORPUS / target.name, args.stats)
        keep_regression_inputs(target, fresh)
        return 0
    results = [run_target(name, args.seconds, args.seed, workdir) for name in args.targets]
    for r in results:
        lines = ", ".join(f"{m} {a}/{b} lines" for m, (a, b) in r.get("lines", {}).items())
        counts = f"{r['executions']:>8} executions  {r.get('arcs', 0):>6} arcs"
        print(f"{r['target']:18} {counts}  {lines}  crashes: {len(r['crashes'])}")
        for signature in r["crashes"]:
            print(f"    {signature}")
    if args.report:
        args.report.write_text(json.dumps(results, indent=1))
    return 1 if any(r["crashes"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
