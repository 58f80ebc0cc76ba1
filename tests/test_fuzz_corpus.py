"""The fuzzer's corpus, replayed: every input under tests/fuzz_corpus/<reader>/ (the seeds, the inputs that reached
new code, and every crasher the fuzzer found, minimised) must load or be refused with an OPTError naming its file,
within the time and memory the oracle allows (`tools/fuzz_readers.py check`). Then a short fuzzing run per reader,
so the harness itself stays working; the long runs are `python tools/fuzz_readers.py --seconds 600`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_readers", ROOT / "tools" / "fuzz_readers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_readers"] = module
    spec.loader.exec_module(module)
    return module


fuzz_readers = _load_fuzzer()
# The kept libhdf5 hangs are refused when read_h5's child runs out of its TIMEOUT_S / 2: short here, so CI does not
# wait 5 s on each; a real file's child finishes in well under a second.
fuzz_readers.TIMEOUT_S = 4.0
INPUTS = [(name, path) for name in sorted(fuzz_readers.TARGETS) for path, _ in fuzz_readers.stored_inputs(name)]


def test_every_reader_has_seeds():
    for name in fuzz_readers.TARGETS:
        seeds = [path for path, _ in fuzz_readers.stored_inputs(name) if path.name.startswith("seed-")]
        assert seeds, f"no seed inputs for {name}; run python tools/fuzz_readers.py --make-seeds"


@pytest.mark.parametrize(("target", "path"), INPUTS, ids=[f"{name}/{path.name}" for name, path in INPUTS])
def test_corpus_input_loads_or_is_refused_naming_the_file(tmp_path, target, path):
    outcome = fuzz_readers.check(fuzz_readers.TARGETS[target], tmp_path / "input", fuzz_readers.load_folder(path))
    assert outcome.kind in ("ok", "refused"), f"{outcome.signature}\n{outcome.detail}"
    if path.name.startswith("seed-"):
        assert outcome.kind == "ok", "a seed is a valid file and must load"


@pytest.mark.parametrize("target", sorted(fuzz_readers.TARGETS))
def test_a_short_fuzzing_run_finds_nothing(tmp_path, target):
    stats, _ = fuzz_readers.fuzz(fuzz_readers.TARGETS[target], seconds=1.5, seed=1, scratch=tmp_path, out=None)
    assert stats.executions > 0
    assert not stats.crashes, stats.crashes
