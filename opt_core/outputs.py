"""Model output objects with HF's field names, shared by the PyTorch, TensorFlow and Flax implementations.

As HF's `ModelOutput`: fields read as attributes (`out.logits`), by key (`out["logits"]`) or by position among
the fields that are set (`out[0]`), and `to_tuple()` gives the set fields in order. The arrays inside are the
framework's own tensors; these classes never look at them.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class ModelOutput:
    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if v is not None)

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: int | str | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())


@dataclasses.dataclass
class BaseModelOutputWithPast(ModelOutput):
    last_hidden_state: Any = None  # B T E (after the final norm and project_out)
    past_key_values: Any = None  # the framework's cache: torch per layer (k, v) B N S H; Flax/TF a static cache
    hidden_states: Any = None  # L + 1 of B T D; the last is last_hidden_state
    attentions: Any = None  # L of B N T S


@dataclasses.dataclass
class CausalLMOutputWithPast(ModelOutput):
    loss: Any = None
    logits: Any = None  # B T V
    past_key_values: Any = None
    hidden_states: Any = None
    attentions: Any = None


@dataclasses.dataclass
class SequenceClassifierOutputWithPast(ModelOutput):
    loss: Any = None
    logits: Any = None  # B C, at each row's last non-pad token
    past_key_values: Any = None
    hidden_states: Any = None
    attentions: Any = None


@dataclasses.dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: Any = None
    start_logits: Any = None  # B T
    end_logits: Any = None  # B T
    hidden_states: Any = None
    attentions: Any = None
