"""Lazy, memory-mapped access to a Hugging Face checkpoint (single or sharded safetensors).

Nothing here loads the whole model: tensor headers are read up front (names, shapes,
dtypes), and each tensor is read from its memory-mapped shard only when asked for.
Nothing outside the model directory is read (bar a hub cache snapshot's ``blobs/``), and
ambiguous or unsupported checkpoints are refused when opened, with one-line errors.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from quantkit.errors import QuantkitError
from quantkit.jsonfile import read_json_object
from quantkit.model.fp8 import Fp8Source, dequantize, open_fp8

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_model"

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

Shape = tuple[int, ...]
_SAMPLE = 64 * 1024  # bytes per fingerprint sample

# The only top-level files copied next to a quantized output (fnmatch patterns): the tokenizer,
# generation defaults, the model card and licences. Code (*.py) and everything else stays behind.
TRAVELLING_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "*.tiktoken", "chat_template.jinja",
    "chat_template.json", "generation_config.json", "README.md", "LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY*",
)

# config.json's integer sizes: positive, except those that may be 0 or (as Hugging Face allows) null.
_SIZE_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "vocab_size", "max_position_embeddings", "head_dim", "moe_intermediate_size", "n_routed_experts", "num_experts",
    "num_local_experts", "num_experts_per_tok", "n_shared_experts", "first_k_dense_replace", "n_group", "topk_group",
    "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
    "shared_expert_intermediate_size", "decoder_sparse_step",
)
_MAY_BE_ZERO = {"n_shared_experts", "first_k_dense_replace", "shared_expert_intermediate_size"}
_MAY_BE_NULL = {
    "num_key_value_heads", "head_dim", "num_experts_per_tok", "n_shared_experts", "first_k_dense_replace", "n_group",
    "topk_group", "q_lora_rank", "v_head_dim",
}


@dataclass(frozen=True)
class TensorInfo:
    """What the shard header says about one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def resolve_model_path(model: str | Path | None) -> Path:
    """A local checkpoint directory for ``model``: a path, a hub id (downloaded), or None (demo model)."""
    if model is None:
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise QuantkitError(f"the bundled demo model is missing from {DEMO_MODEL_DIR}; pass MODEL explicitly")
        return DEMO_MODEL_DIR
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists()
    if not looks_like_hub_id:
        raise QuantkitError(f"model directory not found: {model}")
    return _download_from_hub(text)


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download  # deferred: needed only for hub ids, not local directories
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise QuantkitError(
            f"cannot download {repo_id!r}: offline and not in the local Hugging Face cache; "
            "pass a local checkpoint directory instead"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantkitError(f"cannot download {repo_id!r} from the Hugging Face hub: {first_line}") from None


class Checkpoint:
    """A checkpoint directory: its config, its tensors (lazily) and its other files.

    An FP8 checkpoint (DeepSeek-V3's block-scaled layout, :mod:`quantkit.model.fp8`) is seen as the bf16
    model it stands for: ``tensors`` lists its weights as bfloat16 and not their ``_scale_inv`` tensors,
    ``get`` dequantizes each weight as it is read, and ``config`` is config.json without the fp8
    ``quantization_config``, so nothing downstream sees FP8 or writes it out again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.config = _read_config(path)
        self.tensors: dict[str, TensorInfo] = {}
        self._handles: dict[Path, Any] = {}
        for file, names in _shard_map(path).items():
            self._read_header(file, names)
        self._stored_bytes = sum(t.nbytes for t in self.tensors.values())
        self.fp8: Fp8Source | None = open_fp8(self.tensors, self.config, path)
        if self.fp8 is not None:
            self.config.pop("quantization_config")
        self._other_files = _travelling_files(path)

    @classmethod
    def open(cls, model: str | Path | None) -> Checkpoint:
        return cls(resolve_model_path(model))

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    @property
    def shard_files(self) -> list[Path]:
        return sorted(self._handles)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor from its memory-mapped shard (an FP8 weight: dequantized to bfloat16)."""
        info = self.tensors[name]
        if self.fp8 is not None and name in self.fp8.scales:
            scale = self.fp8.scales[name]
            return dequantize(self._read(name, info.file), self._read(scale.name, scale.file), self.fp8.block)
        return self._read(name, info.file)

    def _read(self, name: str, file: Path) -> torch.Tensor:
        try:
            return self._handles[file].get_tensor(name)
        except SafetensorError as exc:
            raise QuantkitError(f"corrupt shard {file.name}: cannot read {name}: {exc}") from None

    def fingerprint(self) -> str:
        """A sha256 naming this model: config, every tensor's name/dtype/shape, and sampled weight bytes.

        Reading every byte of a large checkpoint would take minutes, so each shard contributes its
        size and 64 KiB from its start, middle and end: a fine-tuned copy differs there too.
        """
        digest = hashlib.sha256()
        config = {k: v for k, v in self.config.items() if k != "quantization_config"}
        digest.update(json.dumps(config, sort_keys=True).encode())
        for name in sorted(self.tensors):
            info = self.tensors[name]
            digest.update(f"{name}:{info.dtype}:{list(info.shape)};".encode())
        for file in self.shard_files:
            size = file.stat().st_size
            digest.update(str(size).encode())
            with file.open("rb") as handle:
                for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
                    handle.seek(offset)
                    digest.update(handle.read(_SAMPLE))
        return digest.hexdigest()

    def total_bytes(self) -> int:
        """The tensors' bytes as stored (an FP8 checkpoint: its FP8 weights and their scales)."""
        return self._stored_bytes

    def other_files(self) -> list[Path]:
        """Top-level files that travel with the weights unchanged (see ``TRAVELLING_FILES``)."""
        return list(self._other_files)

    def _read_header(self, file: Path, expected: set[str] | None) -> None:
        handle, header = _read_shard_header(self.path, file, expected is not None)
        for name, (dtype_name, shape) in sorted(header.items()):
            if dtype_name not in SAFETENSORS_DTYPES:
                raise QuantkitError(f"unsupported dtype {dtype_name} for {name} in {file.name}")
            if name in self.tensors:
                raise QuantkitError(
                    f"tensor {name} is in two shards of {self.path}, {self.tensors[name].file.name} and {file.name}: "
                    "which copy is meant is ambiguous"
                )
            self.tensors[name] = TensorInfo(name, shape, SAFETENSORS_DTYPES[dtype_name], file)
        self._handles[file] = handle
        if expected is not None and not expected <= header.keys():
            missing = sorted(expected - header.keys())
            raise QuantkitError(
                f"shard {file.name} lacks {len(missing)} tensor(s) its index lists, e.g. {missing[0]}"
            )


def _read_shard_header(model_dir: Path, file: Path, listed: bool) -> tuple[Any, dict[str, tuple[str, Shape]]]:
    """An open handle on ``file`` and its tensors' dtype names and shapes; a one-line error if it is malformed."""
    try:
        status = file.stat()
    except FileNotFoundError:
        listed_in = f" (listed in {INDEX_FILE})" if listed else ""
        raise QuantkitError(f"missing shard {file.name}{listed_in} in {model_dir}") from None
    except OSError as exc:  # e.g. a name too long
        raise QuantkitError(f"cannot read shard {file.name}: {exc.strerror or _first_line(exc)}") from None
    if stat.S_ISDIR(status.st_mode):
        raise QuantkitError(f"shard {file.name} in {model_dir} is a directory, not a safetensors file")
    if not stat.S_ISREG(status.st_mode):
        raise QuantkitError(f"shard {file.name} in {model_dir} is not a regular file")
    if status.st_size == 0:
        raise QuantkitError(f"corrupt shard {file.name}: the file is empty")
    try:
        handle = safe_open(str(file), framework="pt")
        header = {}
        names = handle.keys()  # a safe_open handle has keys() but is not iterable
        for name in names:
            tensor_slice = handle.get_slice(name)
            header[name] = (tensor_slice.get_dtype(), tuple(tensor_slice.get_shape()))
    except OSError as exc:
        raise QuantkitError(f"cannot read shard {file.name}: {exc.strerror or _first_line(exc)}") from None
    except (SafetensorError, ValueError) as exc:
        raise QuantkitError(f"corrupt shard {file.name}: {_first_line(exc)}") from None
    except BaseException as exc:  # pyo3's PanicException (a BaseException) when the Rust reader panics
        if type(exc).__name__ != "PanicException":
            raise
        raise QuantkitError(f"corrupt shard {file.name}: {_first_line(exc)}") from None
    return handle, header


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise QuantkitError(f"no config.json in {path}: not a Hugging Face checkpoint directory")
    config = read_json_object(_inside(path, "config.json"))
    _check_config_values(config, path)
    return config


def _check_config_values(config: dict[str, Any], path: Path) -> None:
    """Refuse a non-string ``model_type`` and size fields that are not integers in range."""
    if "model_type" in config and not isinstance(config["model_type"], str):
        raise QuantkitError(f"config.json in {path}: model_type must be a string, got {_show(config['model_type'])}")
    for field in _SIZE_FIELDS:
        if field not in config or (config[field] is None and field in _MAY_BE_NULL):
            continue
        value = config[field]
        lowest = 0 if field in _MAY_BE_ZERO else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            kind = "non-negative" if lowest == 0 else "positive"
            nullable = " or null" if field in _MAY_BE_NULL else ""
            expected = f"a {kind} integer{nullable}"
            raise QuantkitError(f"config.json in {path}: {field} must be {expected}, got {_show(value)}")


def _show(value: Any) -> str:
    """``value`` as JSON, cut short to stay readable on one line."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _shard_map(path: Path) -> dict[Path, set[str] | None]:
    """Shard file -> the tensor names its index promises (None when there is no index)."""
    if (path / INDEX_FILE).is_file():
        return _indexed_shards(path, read_json_object(_inside(path, INDEX_FILE)))
    if (path / SINGLE_FILE).is_file():
        return {_inside(path, SINGLE_FILE): None}
    files = sorted(path.glob("*.safetensors"))
    if files:
        return {_inside(path, file.name): None for file in files}
    if any(path.glob("*.bin")):
        raise QuantkitError(
            f"{path} holds only pickle (.bin) weights, which quantkit does not load; convert them to safetensors"
        )
    raise QuantkitError(f"no safetensors weights in {path}")


def _indexed_shards(path: Path, index: dict[str, Any]) -> dict[Path, set[str] | None]:
    """The shards an index's ``weight_map`` (tensor name -> file name) names, each inside ``path``."""
    weight_map = index.get("weight_map")
    invalid = f"invalid {INDEX_FILE} in {path}"
    if not isinstance(weight_map, dict):
        raise QuantkitError(f"{invalid}: no 'weight_map' object")
    if not weight_map:
        raise QuantkitError(f"{invalid}: weight_map is empty")
    shards: dict[Path, set[str] | None] = {}
    for name, file in weight_map.items():
        if not name:
            raise QuantkitError(f"{invalid}: weight_map has an empty tensor name")
        if not isinstance(file, str) or not file or "\0" in file:
            raise QuantkitError(f"{invalid}: weight_map[{name!r}] must be a shard file name, got {_show(file)}")
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise QuantkitError(
                f"{INDEX_FILE} in {path} names shard {file!r}, outside the model directory "
                "(absolute paths and '..' are refused)"
            )
        names = shards.setdefault(_inside(path, file), set())
        assert names is not None
        names.add(name)
    return shards


def _travelling_files(path: Path) -> list[Path]:
    """The top-level files matching ``TRAVELLING_FILES``, each inside ``path``."""
    names = sorted(
        p.name for p in path.iterdir() if p.is_file() and any(fnmatch.fnmatchcase(p.name, t) for t in TRAVELLING_FILES)
    )
    return [_inside(path, name) for name in names]


def _inside(model_dir: Path, name: str) -> Path:
    """``model_dir / name``, refused if it resolves (through symlinks) outside ``model_dir``.

    A hub cache snapshot (``models--org--name/snapshots/<rev>/``) links its files into the
    sibling ``blobs/`` directory; those links are allowed.
    """
    file = model_dir / name
    try:
        target = file.resolve()
        root = model_dir.resolve()
    except (OSError, RuntimeError) as exc:  # symlink loops, names too long
        raise QuantkitError(f"cannot resolve {name!r} in {model_dir}: {_first_line(exc)}") from None
    allowed = [root]
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        allowed.append((root.parent.parent / "blobs").resolve())
    if not any(target.is_relative_to(directory) for directory in allowed):
        raise QuantkitError(f"{name} in {model_dir} is a symlink to {target}, outside the model directory")
    return file
