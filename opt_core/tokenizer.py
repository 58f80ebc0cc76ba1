"""OPT's tokenizer: GPT-2's byte-level BPE through the `tokenizers` library, with `</s>` (id 2) prepended.

`OPTTokenizer.from_pretrained(folder_or_hub_id)` reads `vocab.json` + `merges.txt` (or `tokenizer.json`) and the
optional `tokenizer_config.json` / `special_tokens_map.json`, and gives the ids, masks and text that HF transformers'
`GPT2Tokenizer` (fast, `tokenizers`-backed) gives with OPT's configuration: `add_bos_token=True`, bos = eos = unk =
`</s>`, pad = `<pad>`. One text becomes `</s> A`, a pair `</s> A </s> B`; the bos counts towards `max_length`.
`save_pretrained` writes the files OPT's Hub repositories hold plus `tokenizer.json`, so HF loads the folder
identically; `train_bpe_tokenizer` trains a new vocabulary laid out as OPT's (`<s> <pad> </s> <unk>` = ids 0..3).

Importing this module imports numpy and `tokenizers` only: torch, tensorflow and jax are imported inside
`return_tensors="pt"/"tf"/"jax"`. The framework packages (`opt_torch`, `opt_tf`, `opt_flax`) take the returned
`BatchEncoding` as `model(**enc)`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

from opt_core.errors import CheckpointError, ConfigError, InputError, OPTError
from opt_core.files import FolderCommit, complete_interrupted_save
from opt_core.hub import resolve_file

# fairseq's dictionary puts these four first, so they are ids 0..3 of every OPT vocabulary.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
# The tokenizer's files in a model folder: what a converted, merged or exported folder carries along.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# OPT's tokenizer_config.json: bos, eos and unk all name `</s>`; `<s>` and `<unk>` have no role.
OPT_SPECIAL_TOKENS_MAP = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
ROLES = tuple(OPT_SPECIAL_TOKENS_MAP)
TENSOR_TYPES = ("np", "pt", "tf", "jax")
SIDES = ("right", "left")
TRUNCATION_STRATEGIES = ("longest_first", "only_first", "only_second")
_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized")


class BatchEncoding(dict):
    """The tokenizer's output: a dict, so `model(**enc)` works, whose keys are also attributes (`enc.input_ids`).

    A tokenizer call also keeps the backend's encodings, one per row, for `sequence_ids` (HF's method of the name).
    """

    _encodings: list | None = None

    def sequence_ids(self, batch_index: int = 0) -> list[int | None]:
        """Which text each token of row `batch_index` comes from: 0 for the first, 1 for text_pair, None for the
        special tokens (the `</s>` in front of each) and padding, as HF's fast tokenizers give it.

        Args:
            batch_index: the row (after overflowing windows are flattened into rows).
        """
        if self._encodings is None:
            raise InputError("sequence_ids needs the tokenizer's own output (this BatchEncoding was built by hand)")
        if not -len(self._encodings) <= batch_index < len(self._encodings):
            raise InputError(f"batch_index {batch_index} is out of range for {len(self._encodings)} rows")
        return list(self._encodings[batch_index].sequence_ids)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no {name!r}; it holds {sorted(self)}") from None

    def to(self, device: Any) -> BatchEncoding:
        """This encoding with torch tensors moved to `device` (HF's `BatchEncoding.to`); other values as they are."""
        return BatchEncoding({key: value.to(device) if hasattr(value, "to") else value for key, value in self.items()})


def _role_property(role: str) -> property:
    def get(self: OPTTokenizer) -> str | None:
        return self._roles[role]

    def set_(self: OPTTokenizer, value: str | None) -> None:
        self._set_role(role, value)

    return property(get, set_, doc=f"The {role.replace('_', ' ')} string, or None; settable.")


def _role_id_property(role: str) -> property:
    def get(self: OPTTokenizer) -> int | None:
        content = self._roles[role]
        return None if content is None else self._backend.token_to_id(content)

    return property(get, doc=f"The id of the {role.replace('_', ' ')}, or None.")


class OPTTokenizer:
    """OPT's byte-level BPE tokenizer, with HF's call signature and results.

    Build it with `from_pretrained` or `train_bpe_tokenizer`; the constructor wraps a `tokenizers.Tokenizer` whose
    model is the BPE vocabulary.

    Args:
        backend: the `tokenizers.Tokenizer` (byte-level BPE; its added tokens are the never-split ones).
        bos_token, eos_token, unk_token, pad_token: the strings of the four roles, or None for none. Each is
            registered with the backend as a special token (never split, dropped by `skip_special_tokens`).
        add_bos_token: prepend the bos token to every sequence, as OPT does.
        add_prefix_space: add a space before the first word (GPT-2's option; OPT never sets it).
        padding_side: "right" (OPT's default) or "left" (for generation).
        truncation_side: "right" or "left".
        model_max_length: the length `truncation=True` and `padding="max_length"` use when `max_length` is not
            given; None (as OPT's configuration) means no limit.
        name_or_path: where the tokenizer came from, for messages.
    """

    def __init__(
        self,
        backend: Tokenizer,
        *,
        bos_token: str | None = "</s>",
        eos_token: str | None = "</s>",
        unk_token: str | None = "</s>",
        pad_token: str | None = "<pad>",
        add_bos_token: bool = True,
        add_prefix_space: bool = False,
        padding_side: str = "right",
        truncation_side: str = "right",
        model_max_length: int | None = None,
        name_or_path: str = "",
    ):
        self._backend = backend
        self._lock = threading.Lock()
        self._roles: dict[str, str | None] = {}
        self._add_bos_token = bool(add_bos_token)
        self.add_prefix_space = add_prefix_space
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = _check_length(model_max_length, "model_max_length")
        self.name_or_path = str(name_or_path)
        roles = dict(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token)
        for role, value in roles.items():
            self._set_role(role, value)

    # ----- loading and saving

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        padding_side: str | None = None,
        truncation_side: str | None = None,
        model_max_length: int | None = None,
        **special_tokens: str | None,
    ) -> OPTTokenizer:
        """Loads the tokenizer of a folder or hub repository (vocab.json + merges.txt, or tokenizer.json).

        Args:
            name_or_path: a local folder, or a hub id such as "facebook/opt-125m".
            revision: branch, tag or commit on the hub.
            cache_dir: the HF cache folder to use instead of the default.
            local_files_only: use the cache only; defaults to the HF_HUB_OFFLINE environment variable.
            token: hub token for private repositories.
            padding_side: overrides tokenizer_config.json's (default "right").
            truncation_side: overrides tokenizer_config.json's (default "right").
            model_max_length: overrides tokenizer_config.json's (default None: no limit).
            **special_tokens: bos_token, eos_token, unk_token or pad_token overriding the files' (None for none).
        """
        unknown = sorted(set(special_tokens) - set(ROLES))
        if unknown:
            raise TypeError(f"from_pretrained got unexpected arguments {unknown}; special tokens are {list(ROLES)}")
        hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        overrides = {role: _as_added_token(value) for role, value in special_tokens.items()}
        if Path(name_or_path).is_dir():
            complete_interrupted_save(name_or_path)  # a save killed after its commit point is finished first
        with _naming_errors(name_or_path):
            config = _read_json(_optional_file(name_or_path, "tokenizer_config.json", hub))
            roles = _role_tokens(config, _read_json(_optional_file(name_or_path, "special_tokens_map.json", hub)))
            roles.update(overrides)
            vocab, merges, added = _read_model_files(name_or_path, hub)
            if added is None:  # no tokenizer.json: HF takes the added tokens from tokenizer_config.json
                added = _added_tokens_of_config(config)
            add_prefix_space = bool(config.get("add_prefix_space", False))
            backend = _build_backend(vocab, merges, add_prefix_space)
            _add_tokens(backend, added + [token for token in roles.values() if token is not None])
        return cls(
            backend,
            **{role: None if token is None else token.content for role, token in roles.items()},
            add_bos_token=config.get("add_bos_token", True),
            add_prefix_space=add_prefix_space,
            padding_side=padding_side or config.get("padding_side", "right"),
            truncation_side=truncation_side or config.get("truncation_side", "right"),
            model_max_length=model_max_length if model_max_length is not None else _max_length_of(config),
            name_or_path=str(name_or_path),
        )

    def save_pretrained(self, folder: str | os.PathLike) -> tuple[Path, ...]:
        """Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json as OPT's Hub
        repositories have them, plus tokenizer.json; HF's AutoTokenizer and GPT2TokenizerFast load the folder.

        Args:
            folder: created if missing; files of the same names are replaced.

        Returns:
            The paths written.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as model_folder:
            files = {Path(p).name: Path(p).read_bytes() for p in self._backend.model.save(model_folder)}
        for name, content in (
            ("tokenizer_config.json", self._tokenizer_config()),
            ("special_tokens_map.json", self._special_tokens_map()),
        ):
            files[name] = json.dumps(content, indent=2, ensure_ascii=False) + "\n"
        files["tokenizer.json"] = self._backend.to_str(pretty=True)
        # One commit, as a checkpoint's: a crash leaves the previous tokenizer's files or all of these, never a mix.
        with FolderCommit(folder) as commit:
            for name, data in files.items():
                commit.write(name, data)
            commit.commit()
        return tuple(folder / name for name in files)

    def _tokenizer_config(self) -> dict:
        added = self._backend.get_added_tokens_decoder()
        config: dict[str, Any] = {"errors": "replace"}
        for role in ROLES:
            config[role] = self._role_dict(role, added)
            if config[role] is not None:
                config[role]["__type"] = "AddedToken"  # as OPT's Hub files write them
        config.update(add_prefix_space=self.add_prefix_space, add_bos_token=self.add_bos_token)
        config["special_tokens_map_file"] = None
        # Beyond OPT's files: the class lets AutoTokenizer load a folder without config.json, the added tokens let
        # HF rebuild them without tokenizer.json, and transformers 4 would otherwise clean up spaces on decode.
        config.update(tokenizer_class="GPT2Tokenizer", clean_up_tokenization_spaces=False)
        config["added_tokens_decoder"] = {str(i): _token_dict(token, special=True) for i, token in added.items()}
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        for side in ("padding_side", "truncation_side"):
            if getattr(self, side) != "right":
                config[side] = getattr(self, side)
        return config

    def _special_tokens_map(self) -> dict:
        added = self._backend.get_added_tokens_decoder()
        return {role: self._role_dict(role, added) for role in ROLES if self._roles[role] is not None}

    def _role_dict(self, role: str, added: dict[int, AddedToken]) -> dict | None:
        content = self._roles[role]
        if content is None:
            return None
        return _token_dict(added[self._backend.token_to_id(content)], special=False)

    # ----- special tokens

    def _set_role(self, role: str, value: str | AddedToken | None) -> None:
        token = _as_added_token(value)
        specials = {added.content for added in self._backend.get_added_tokens_decoder().values() if added.special}
        if token is not None and token.content not in specials:  # from_pretrained registered it with its flags
            _add_tokens(self._backend, [token])
        self._roles[role] = None if token is None else token.content
        if role == "bos_token":
            self._update_post_processor()

    def _update_post_processor(self) -> None:
        # As HF's GPT2Tokenizer with add_bos_token=True: "</s> A" for one text, "</s> A </s> B" for a pair.
        bos = self._roles.get("bos_token")
        if not self._add_bos_token or bos is None:
            self._backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
            return
        self._backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, self.bos_token_id)]
        )

    @property
    def add_bos_token(self) -> bool:
        """Whether `</s>` is prepended to every sequence (OPT: True)."""
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value: bool) -> None:
        self._add_bos_token = bool(value)
        self._update_post_processor()

    @property
    def add_prefix_space(self) -> bool:
        """Whether a space is added before the first word (GPT-2's option; OPT never sets it)."""
        return self._add_prefix_space

    @add_prefix_space.setter
    def add_prefix_space(self, value: bool) -> None:
        self._add_prefix_space = bool(value)
        self._backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=self._add_prefix_space)

    bos_token = _role_property("bos_token")
    eos_token = _role_property("eos_token")
    unk_token = _role_property("unk_token")
    pad_token = _role_property("pad_token")
    bos_token_id = _role_id_property("bos_token")
    eos_token_id = _role_id_property("eos_token")
    unk_token_id = _role_id_property("unk_token")
    pad_token_id = _role_id_property("pad_token")

    @property
    def all_special_tokens(self) -> list[str]:
        """The distinct strings of the roles (HF: `["</s>", "<pad>"]` for OPT)."""
        return list(dict.fromkeys(token for token in self._roles.values() if token is not None))

    @property
    def all_special_ids(self) -> list[int]:
        """The ids of `all_special_tokens`."""
        return [self._backend.token_to_id(token) for token in self.all_special_tokens]

    # ----- sides

    @property
    def padding_side(self) -> str:
        """Where padding goes: "right" (OPT's default) or "left" (for batched generation)."""
        return self._padding_side

    @padding_side.setter
    def padding_side(self, value: str) -> None:
        self._padding_side = _check_side(value, "padding_side")

    @property
    def truncation_side(self) -> str:
        """Which end truncation cuts: "right" (default) or "left"."""
        return self._truncation_side

    @truncation_side.setter
    def truncation_side(self, value: str) -> None:
        self._truncation_side = _check_side(value, "truncation_side")

    # ----- vocabulary

    @property
    def vocab_size(self) -> int:
        """Entries of the BPE vocabulary, without tokens added on top (OPT: 50265)."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        """Token string to id, added tokens included."""
        return self._backend.get_vocab(with_added_tokens=True)

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The `tokenizers.Tokenizer` doing the work (HF's name for it)."""
        return self._backend

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | None | list[int | None]:
        """Id of a token string, or ids of a list of them; strings not in the vocabulary give `unk_token_id`."""
        if isinstance(tokens, str):
            index = self._backend.token_to_id(tokens)
            return self.unk_token_id if index is None else index
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def convert_ids_to_tokens(self, ids: Any, skip_special_tokens: bool = False) -> str | None | list[str | None]:
        """Token string of an id, or strings of a sequence of ids (None for ids beyond the vocabulary, as HF).

        Args:
            ids: an int, or a list / numpy / torch sequence of ints.
            skip_special_tokens: leave out `all_special_ids`.
        """
        ids = _to_int_lists(ids)
        if isinstance(ids, int):
            return self._backend.id_to_token(_flat_ids(ids)[0])
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._backend.id_to_token(index) for index in _flat_ids(ids) if index not in skip]

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        """How many tokens the bos adds to one text (1) or a pair (2)."""
        return self._backend.num_special_tokens_to_add(pair)

    # ----- encoding

    def __call__(
        self,
        text: str | list[str],
        text_pair: str | list[str] | None = None,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
        stride: int = 0,
        return_overflowing_tokens: bool = False,
        return_offsets_mapping: bool = False,
    ) -> BatchEncoding:
        """Token ids (and attention mask) of one text, a batch of texts, or text pairs, as HF's tokenizer gives them.

        Args:
            text: a string, or a list of strings (a batch).
            text_pair: second texts, of the same form: each sequence becomes `</s> A </s> B`.
            add_special_tokens: prepend `</s>`.
            padding: False / "do_not_pad"; True / "longest" (to the longest in the batch); "max_length".
            truncation: True / "longest_first", "only_first", "only_second", False / "do_not_truncate". None (the
                default) truncates only when `max_length` is given and `padding` is off, as HF does.
            max_length: the length, bos included, for truncation and `padding="max_length"`; default
                `model_max_length`.
            pad_to_multiple_of: round padded lengths up to a multiple of this.
            padding_side: "right" or "left" for this call; default `self.padding_side`.
            return_tensors: None (lists), "np" or "pt" (int64, as HF), "tf" or "jax" (int32, as HF gave them).
            return_attention_mask: include `attention_mask` (1 for tokens, 0 for padding).
            stride: with `return_overflowing_tokens`, how many tokens each window repeats from the one before it
                (HF's `doc_stride` in its question-answering example).
            return_overflowing_tokens: what truncation cuts off becomes further rows (windows) rather than being
                dropped; `overflow_to_sample_mapping` gives each row's input index. The output is then always
                batched (lists of rows), as HF's.
            return_offsets_mapping: `offset_mapping`, the (start, end) characters of each token in its own text;
                (0, 0) for special tokens and padding. Use `sequence_ids(i)` to tell the two texts of a pair apart.
        """
        batch, batched = _as_batch(text, text_pair)
        _check_length(max_length, "max_length")
        if return_tensors is not None and return_tensors not in TENSOR_TYPES:
            raise InputError(f"return_tensors must be None or one of {list(TENSOR_TYPES)}, got {return_tensors!r}")
        pad = self._padding_options(padding, max_length, pad_to_multiple_of, padding_side)
        specials = self.num_special_tokens_to_add(text_pair is not None) if add_special_tokens else 0
        trunc = self._truncation_options(truncation, max_length, padding, specials, _check_stride(stride))
        encodings = self._encode(batch, add_special_tokens, trunc, pad)
        samples = list(range(len(encodings)))
        if return_overflowing_tokens:
            # As HF's fast tokenizers: each input's windows in order, the first window being the encoding itself.
            samples = [i for i, encoding in enumerate(encodings) for _ in range(1 + len(encoding.overflowing))]
            encodings = [window for encoding in encodings for window in (encoding, *encoding.overflowing)]
            batched = True
        data = {"input_ids": [encoding.ids for encoding in encodings]}
        if return_attention_mask:
            data["attention_mask"] = [encoding.attention_mask for encoding in encodings]
        if return_offsets_mapping:
            data["offset_mapping"] = [list(encoding.offsets) for encoding in encodings]
        if return_overflowing_tokens:
            data["overflow_to_sample_mapping"] = samples
        if return_tensors is not None:
            rows_of_ids = ("input_ids", "attention_mask")
            converted = {key: _to_tensors(data[key], return_tensors, key) for key in rows_of_ids if key in data}
            if return_overflowing_tokens:
                converted["overflow_to_sample_mapping"] = _convert(np.asarray(samples, dtype=np.int64), return_tensors)
            if return_offsets_mapping:
                converted["offset_mapping"] = _offsets_tensor(data["offset_mapping"], return_tensors)
            output = BatchEncoding(converted)
        else:
            output = BatchEncoding(data if batched else {key: rows[0] for key, rows in data.items()})
        output._encodings = encodings
        return output

    def encode(self, text: str, text_pair: str | None = None, **kwargs: Any) -> list[int]:
        """The ids of one text (or pair), bos included: `tokenizer(text, ...)["input_ids"]`.

        Args:
            text: the text.
            text_pair: an optional second text.
            **kwargs: as for `__call__` (add_special_tokens, truncation, max_length, padding, ...).
        """
        if not isinstance(text, str):
            raise InputError(
                f"encode takes one text (a str), got {type(text).__name__}; call the tokenizer for batches"
            )
        return self(text, text_pair, return_attention_mask=False, **kwargs)["input_ids"]

    def tokenize(self, text: str, text_pair: str | None = None, add_special_tokens: bool = False) -> list[str]:
        """The token strings of one text (byte-level: a leading space shows as "Ġ")."""
        batch, batched = _as_batch(text, text_pair)
        if batched:
            raise InputError("tokenize takes one text (a str); call the tokenizer for batches")
        return self._encode(batch, add_special_tokens, None, None)[0].tokens

    def _padding_options(self, padding, max_length, pad_to_multiple_of, padding_side) -> dict | None:
        if padding is False or padding == "do_not_pad":
            return None
        if padding is True or padding == "longest":
            length = None
        elif padding == "max_length":
            length = _check_length(max_length if max_length is not None else self.model_max_length, "max_length")
            if length is None:
                raise InputError("padding='max_length' needs max_length (this tokenizer has no model_max_length)")
        else:
            raise InputError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if self.pad_token is None:
            raise ConfigError(
                "this tokenizer has no pad token, so it cannot pad: set `tokenizer.pad_token` (e.g. to "
                "tokenizer.eos_token) or load it with pad_token=..."
            )
        return dict(
            length=length,
            direction=_check_side(padding_side or self.padding_side, "padding_side"),
            pad_id=self.pad_token_id,
            pad_token=self.pad_token,
            pad_type_id=0,
            pad_to_multiple_of=_check_length(pad_to_multiple_of, "pad_to_multiple_of"),
        )

    def _truncation_options(self, truncation, max_length, padding, specials: int, stride: int = 0) -> dict | None:
        if truncation is None:
            # HF: a max_length without padding asks for truncation even when truncation is not given.
            truncation = max_length is not None and padding in (False, "do_not_pad")
        if truncation is False or truncation == "do_not_truncate":
            return None
        strategy = "longest_first" if truncation is True else truncation
        if strategy not in TRUNCATION_STRATEGIES:
            raise InputError(
                f"truncation must be True, False, 'do_not_truncate' or one of {list(TRUNCATION_STRATEGIES)}, "
                f"got {truncation!r}"
            )
        length = _check_length(max_length if max_length is not None else self.model_max_length, "max_length")
        if length is None:
            return None  # as HF: no max_length and no model_max_length leaves nothing to truncate to
        if length < specials:
            raise InputError(f"max_length={length} leaves no room: the special tokens alone take {specials}")
        return dict(max_length=length, stride=stride, strategy=strategy, direction=self.truncation_side)

    def _encode(self, batch: list, add_special_tokens: bool, truncation: dict | None, padding: dict | None) -> list:
        # The backend holds truncation and padding as state; the lock keeps one call's settings from another's.
        with self._lock:
            try:
                if truncation is not None:
                    self._backend.enable_truncation(**truncation)
                if padding is not None:
                    self._backend.enable_padding(**padding)
                return self._backend.encode_batch(batch, add_special_tokens=add_special_tokens)
            except Exception as err:  # `tokenizers` raises a bare Exception, e.g. when "only_first" cannot fit
                raise InputError(f"cannot tokenize with these settings: {err}") from None
            except BaseException as err:
                # A Rust panic (a stride not shorter than the room truncation leaves) is a BaseException.
                if type(err).__name__ != "PanicException":
                    raise
                raise InputError(f"cannot tokenize with these settings: {str(err).splitlines()[0]}") from None
            finally:
                self._backend.no_truncation()
                self._backend.no_padding()

    # ----- decoding

    def decode(
        self, token_ids: Any, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False
    ) -> str | list[str]:
        """The text of a sequence of ids (a list of texts for a 2-D input, as HF 5).

        Bytes that do not form valid UTF-8 become U+FFFD (GPT-2's errors="replace"); ids beyond the vocabulary are
        left out, as HF does.

        Args:
            token_ids: an int, a list of ints, or a 1-D / 2-D numpy, torch, tf or jax array of ints.
            skip_special_tokens: leave out the added special tokens (`</s>`, `<pad>`, and `<s>` / `<unk>` where the
                tokenizer registers them).
            clean_up_tokenization_spaces: remove the spaces before punctuation and contractions that transformers 4
                removed (" ." -> ".", " n't" -> "n't"); transformers 5 ignores this for BPE tokenizers.
        """
        ids = _to_int_lists(token_ids)
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], list):
            return self.batch_decode(ids, skip_special_tokens, clean_up_tokenization_spaces)
        text = self._backend.decode(_flat_ids(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def batch_decode(
        self, sequences: Any, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False
    ) -> list[str]:
        """The texts of a batch of id sequences (ragged lists, or a 2-D array); see `decode`.

        Args:
            sequences: a list of id lists, or a 2-D numpy, torch, tf or jax array (a 1-D one is one sequence).
            skip_special_tokens: as for `decode`.
            clean_up_tokenization_spaces: as for `decode`.
        """
        rows = _to_int_lists(sequences)
        if isinstance(rows, int) or not rows or not isinstance(rows[0], list):
            rows = [rows]
        texts = self._backend.decode_batch([_flat_ids(row) for row in rows], skip_special_tokens=skip_special_tokens)
        return [clean_up_tokenization(text) for text in texts] if clean_up_tokenization_spaces else texts

    # ----- plumbing

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_lock"]  # locks do not pickle; DataLoader workers need to pickle the tokenizer
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"OPTTokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, len={len(self)}, "
            f"bos/eos/unk/pad={self.bos_token!r}/{self.eos_token!r}/{self.unk_token!r}/{self.pad_token!r}, "
            f"add_bos_token={self.add_bos_token}, padding_side={self.padding_side!r})"
        )


def clean_up_tokenization(text: str) -> str:
    """transformers 4's `clean_up_tokenization`: drops the space before punctuation and English contractions."""
    for spaced, joined in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
        (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):  # fmt: skip
        text = text.replace(spaced, joined)
    return text


# ----- training


def train_bpe_tokenizer(
    files_or_iterator: str | os.PathLike | Iterable[str | os.PathLike],
    vocab_size: int,
    folder: str | os.PathLike,
    *,
    min_frequency: int = 2,
    model_max_length: int | None = None,
) -> OPTTokenizer:
    """Trains a byte-level BPE vocabulary the OPT way and writes an OPT tokenizer folder (see `save_pretrained`).

    `<s> <pad> </s> <unk>` get ids 0..3 and are never split; then come the 256 byte symbols, then the merges.
    Training is deterministic: the same texts give byte-identical files, whatever their order or the thread count.

    Args:
        files_or_iterator: one text file (a path), a list of text files (paths that all exist; each line is a
            text), or an iterable of texts.
        vocab_size: entries wanted, special tokens and the 256 bytes included (fewer if the texts run out of merges).
        folder: where to write vocab.json, merges.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json.
        min_frequency: the fewest occurrences a pair needs to be merged.
        model_max_length: saved in tokenizer_config.json (OPT's models take 2048 positions); None for no limit.

    Returns:
        The tokenizer, loaded back from `folder`.
    """
    floor = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < floor:
        raise ConfigError(
            f"vocab_size must be an int of at least {floor} (4 special tokens + 256 bytes), got {vocab_size!r}"
        )
    backend = Tokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    files = _training_files(files_or_iterator)
    if files is not None:
        backend.train(files, trainer)
    else:
        backend.train_from_iterator(_checked_texts(files_or_iterator), trainer)
    # Rebuild it the way from_pretrained builds it, so that saving a loaded copy writes the same tokenizer.json.
    vocab, merges, added = _parse_tokenizer_json(json.loads(backend.to_str()), "the trained tokenizer")
    backend = _build_backend(vocab, merges, add_prefix_space=False)
    _add_tokens(backend, added)
    OPTTokenizer(backend, model_max_length=model_max_length).save_pretrained(folder)
    return OPTTokenizer.from_pretrained(folder)


def _training_files(source: Any) -> list[str] | None:
    """The files to train on, or None when `source` is an iterable of texts."""
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).is_file():
            raise CheckpointError(f"training file {source} does not exist (pass texts as a list or an iterator)")
        return [str(source)]
    if not isinstance(source, (list, tuple)) or not source:
        return None
    # Looking at the first item only keeps a long list of texts from costing a file-system call per text.
    if not _is_file(source[0]) and not any(isinstance(item, os.PathLike) for item in source):
        return None
    missing = [str(item) for item in source if not _is_file(item)]
    if missing:
        raise CheckpointError(f"training files {missing[:3]} do not exist (texts and files cannot be mixed)")
    return [str(item) for item in source]


def _is_file(item: Any) -> bool:
    return isinstance(item, (str, os.PathLike)) and Path(item).is_file()


def _checked_texts(texts: Iterable) -> Iterable[str]:
    for text in texts:
        if not isinstance(text, str):
            raise InputError(f"training texts must be str, got {type(text).__name__}")
        yield text


# ----- reading the files


def _optional_file(name_or_path: str | os.PathLike, filename: str, hub: dict) -> Path | None:
    folder = Path(name_or_path)
    if folder.is_dir():
        path = folder / filename
        return path if path.is_file() else None
    try:
        return resolve_file(name_or_path, filename, **hub)
    except CheckpointError:
        return None  # the required files, asked for next, report why the repository cannot be read


@contextlib.contextmanager
def _naming_errors(name_or_path: str | os.PathLike) -> Iterator[None]:
    """Prefixes the tokenizer's folder to an error about its files that does not name one already."""
    try:
        yield
    except OPTError as err:
        if str(name_or_path) in str(err):
            raise
        raise type(err)(f"{name_or_path}: {err}") from None


def _read_json(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(content).__name__}")
    return content


def _read_model_files(name_or_path, hub: dict) -> tuple[dict[str, int], list[tuple[str, str]], list | None]:
    """(vocab, merges, added tokens of tokenizer.json or None) from tokenizer.json, else vocab.json + merges.txt."""
    tokenizer_json = _optional_file(name_or_path, "tokenizer.json", hub)
    if tokenizer_json is not None:
        return _read_tokenizer_json(tokenizer_json)
    try:
        vocab_file = resolve_file(name_or_path, "vocab.json", **hub)
        merges_file = resolve_file(name_or_path, "merges.txt", **hub)
    except CheckpointError as err:
        raise CheckpointError(f"{err}: an OPT tokenizer needs vocab.json and merges.txt (or tokenizer.json)") from None
    return _check_vocab(_read_json(vocab_file), vocab_file), _read_merges(merges_file), None


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], list[tuple[int, AddedToken]]]:
    return _parse_tokenizer_json(_read_json(path), path)


def _parse_tokenizer_json(content: dict, path: Path | str) -> tuple[dict, list, list[tuple[int, AddedToken]]]:
    model = content.get("model")
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "merges" not in model:
        raise CheckpointError(f"{path} does not hold a BPE model (OPT's tokenizer is GPT-2's byte-level BPE)")
    if not isinstance(model["merges"], list) or not isinstance(content.get("added_tokens") or [], list):
        raise CheckpointError(f"{path}: the model's merges and the added_tokens must be lists")
    merges = []
    for number, merge in enumerate(model["merges"]):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(part, str) for part in pair):
            raise CheckpointError(f"{path}: merge {number} is {merge!r}, expected two tokens")
        merges.append(tuple(pair))
    added = []
    for entry in content.get("added_tokens") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or "id" not in entry:
            raise CheckpointError(f"{path}: added token {entry!r} needs a 'content' string and an 'id'")
        added.append((entry["id"], _added_token_from_dict(entry, special=entry.get("special", False))))
    return _check_vocab(model.get("vocab"), path), merges, added


def _check_vocab(vocab: Any, path: Path) -> dict[str, int]:
    if not isinstance(vocab, dict) or not vocab:
        raise CheckpointError(f"{path}: the vocabulary must be a non-empty JSON object of token -> id")
    bad = [token for token, index in vocab.items() if isinstance(index, bool) or not isinstance(index, int)][:3]
    if bad:
        raise CheckpointError(f"{path}: ids must be ints; see tokens {bad}")
    return vocab


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise CheckpointError(f"{path}, line {line}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise CheckpointError(f"{path}, line {number}: {line!r} is not a merge (two tokens and one space)")
        merges.append((pair[0], pair[1]))
    return merges


def _build_backend(vocab: dict[str, int], merges: list[tuple[str, str]], add_prefix_space: bool) -> Tokenizer:
    """GPT-2's byte-level BPE, built as HF's GPT2Tokenizer builds it (tokenizer.json's pipeline is not trusted)."""
    # `tokenizers` refuses a merge whose tokens are not in the vocabulary, but for some (a merged token that is
    # missing, next to multi-byte characters) it panics instead, printing a Rust backtrace: checked here first.
    for number, (a, b) in enumerate(merges):
        missing = next((token for token in (a, b, a + b) if token not in vocab), None)
        if missing is not None:
            raise CheckpointError(
                f"vocabulary and merges do not agree: merge {number} ({a!r} {b!r}) needs {missing!r}, not in it"
            )
    try:
        model = BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    except Exception as err:  # `tokenizers` names the merge whose token is not in the vocabulary
        raise CheckpointError(f"vocabulary and merges do not agree: {err}") from None
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_tokens(backend: Tokenizer, tokens: list) -> None:
    """Registers added tokens ((declared id, token) or token), special ones never split; checks declared ids."""
    for item in tokens:
        declared, token = item if isinstance(item, tuple) else (None, item)
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        got = backend.token_to_id(token.content)
        if declared is not None and got != declared:
            raise CheckpointError(
                f"added token {token.content!r} is declared as id {declared} but the vocabulary gives it id {got}"
            )


def _role_tokens(config: dict, special_map: dict) -> dict[str, AddedToken | None]:
    """The four roles: OPT's by default, then tokenizer_config.json's, then special_tokens_map.json's (as HF)."""
    roles: dict[str, AddedToken | None] = {
        role: _as_added_token(value) for role, value in OPT_SPECIAL_TOKENS_MAP.items()
    }
    for source in (config, special_map):
        for role in ROLES:
            if role in source:
                roles[role] = _as_added_token(source[role])
    return roles


def _as_added_token(value: Any) -> AddedToken | None:
    if value is None or isinstance(value, AddedToken):
        return value
    if value == "" or (isinstance(value, dict) and value.get("content") == ""):
        raise ConfigError("a special token cannot be empty")
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return _added_token_from_dict(value, special=True)
    raise ConfigError(f"a special token must be a string, an AddedToken dict with 'content', or null; got {value!r}")


def _added_token_from_dict(entry: dict, special: bool) -> AddedToken:
    flags = {flag: bool(entry[flag]) for flag in _TOKEN_FLAGS if flag in entry}
    return AddedToken(entry["content"], special=bool(special), **flags)


def _token_dict(token: AddedToken, special: bool) -> dict:
    entry = {"content": token.content, **{flag: getattr(token, flag) for flag in _TOKEN_FLAGS}}
    if special:
        entry["special"] = token.special
    return entry


def _added_tokens_of_config(config: dict) -> list[tuple[int, AddedToken]]:
    entries = config.get("added_tokens_decoder") or {}
    try:
        return [
            (int(i), _added_token_from_dict(e, e.get("special", False)))
            for i, e in sorted(entries.items(), key=lambda kv: int(kv[0]))
        ]
    except (ValueError, TypeError, KeyError, AttributeError):
        raise CheckpointError(f"tokenizer_config.json: added_tokens_decoder is malformed: {entries!r:.200}") from None


def _max_length_of(config: dict) -> int | None:
    value = config.get("model_max_length")
    # HF writes 1e30 (its VERY_LARGE_INTEGER) when a model has no limit.
    if value is None or not isinstance(value, (int, float)) or value >= 1e29:
        return None
    return int(value)


# ----- checking arguments and converting values


def _check_side(value: Any, name: str) -> str:
    if value not in SIDES:
        raise ConfigError(f"{name} must be 'right' or 'left', got {value!r}")
    return value


def _check_length(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_stride(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"stride must be a non-negative int, got {value!r}")
    return int(value)


def _offsets_tensor(rows: list[list[tuple[int, int]]], return_tensors: str) -> Any:
    """offset_mapping as a B T 2 tensor (int64 as HF's; rows are of one length, as the ids already checked)."""
    return _convert(np.asarray(rows, dtype=np.int64).reshape(len(rows), -1, 2), return_tensors)


def _as_batch(text: Any, text_pair: Any) -> tuple[list, bool]:
    """(inputs for the backend, whether the call was batched)."""
    if isinstance(text, str):
        if text_pair is not None and not isinstance(text_pair, str):
            raise InputError(f"text is one string, so text_pair must be one too, got {type(text_pair).__name__}")
        return [text if text_pair is None else (text, text_pair)], False
    if not isinstance(text, (list, tuple)) or not all(isinstance(item, str) for item in text):
        raise InputError(f"text must be a str or a list of str, got {_describe(text)}")
    if not text:
        raise InputError("text is an empty list: give at least one text")
    if text_pair is None:
        return list(text), True
    if not isinstance(text_pair, (list, tuple)) or not all(isinstance(item, str) for item in text_pair):
        raise InputError(f"text is a list, so text_pair must be a list of str too, got {_describe(text_pair)}")
    if len(text_pair) != len(text):
        raise InputError(f"text has {len(text)} entries but text_pair has {len(text_pair)}")
    return list(zip(text, text_pair)), True


def _describe(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(item).__name__ for item in value})
        return f"a {type(value).__name__} of {'/'.join(kinds) or 'nothing'}"
    return type(value).__name__


def _to_tensors(rows: list[list[int]], return_tensors: str, key: str) -> Any:
    lengths = sorted({len(row) for row in rows})
    if len(lengths) > 1:
        raise InputError(
            f"{key} rows have lengths {lengths[0]}..{lengths[-1]}; tensors need one length: pass padding=True "
            "(or truncation=True with padding='max_length')"
        )
    return _convert(np.asarray(rows, dtype=np.int64).reshape(len(rows), lengths[0]), return_tensors)


def _convert(array: np.ndarray, return_tensors: str) -> Any:
    if return_tensors == "np":
        return array
    if return_tensors == "pt":
        import torch

        return torch.from_numpy(array)
    # HF made int32 tensors for TensorFlow and JAX (the default integer of both).
    if return_tensors == "tf":
        import tensorflow as tf

        return tf.constant(array.astype(np.int32))
    import jax.numpy as jnp

    return jnp.asarray(array.astype(np.int32))


def _to_int_lists(ids: Any) -> int | list:
    """An int or (nested) lists of ints from ints, lists, numpy, torch, tf or jax values."""
    if hasattr(ids, "detach"):  # torch, possibly on an accelerator
        ids = ids.detach().cpu().numpy()
    if isinstance(ids, (list, tuple)):
        return [_to_int_lists(item) for item in ids]
    if isinstance(ids, bool):
        raise InputError(f"token ids must be integers, got {ids!r}")
    if isinstance(ids, int):
        return ids
    array = np.asarray(ids)
    if array.dtype.kind not in "iu":
        raise InputError(f"token ids must be integers, got dtype {array.dtype} ({_describe(ids)})")
    return array.tolist()


def _flat_ids(ids: Any) -> list[int]:
    """One sequence of non-negative ints; anything nested deeper, or negative, is an error."""
    if isinstance(ids, int):
        ids = [ids]
    for index in ids:
        if not isinstance(index, int):
            raise InputError("token ids must be a sequence of ints (or a batch of them for decode/batch_decode)")
        if index < 0:
            raise InputError(f"token ids must be >= 0, got {index}")
    return ids
