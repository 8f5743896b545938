"""Lazy, memory-mapped access to a Hugging Face checkpoint (single or sharded safetensors).

Nothing here loads the whole model: tensor headers are read up front (names, shapes,
dtypes), and each tensor is read from its memory-mapped shard only when asked for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from quantkit.errors import QuantkitError
from quantkit.jsonfile import read_json_object

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

# Files that belong to the float weights and are never copied next to a quantized output.
_SAMPLE = 64 * 1024  # bytes per fingerprint sample
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


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
    from huggingface_hub import snapshot_download
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
    """A checkpoint directory: its config, its tensors (lazily) and its other files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.config = _read_config(path)
        self.tensors: dict[str, TensorInfo] = {}
        self._handles: dict[Path, Any] = {}
        for file, names in _shard_map(path).items():
            self._read_header(file, names)

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
        """Read one tensor from its memory-mapped shard."""
        info = self.tensors[name]
        try:
            return self._handles[info.file].get_tensor(name)
        except SafetensorError as exc:
            raise QuantkitError(f"corrupt shard {info.file.name}: cannot read {name}: {exc}") from None

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
        return sum(t.nbytes for t in self.tensors.values())

    def other_files(self) -> list[Path]:
        """Top-level files that travel with the weights unchanged (tokenizer, generation config, ...)."""
        skip = {"config.json", INDEX_FILE}
        return sorted(
            p
            for p in self.path.iterdir()
            if p.is_file()
            and p.name not in skip
            and not p.name.startswith(".")
            and not p.name.endswith(_WEIGHT_SUFFIXES)
            and not p.name.endswith(".index.json")
        )

    def _read_header(self, file: Path, expected: set[str] | None) -> None:
        if not file.is_file():
            raise QuantkitError(f"missing shard {file.name} (listed in {INDEX_FILE}) in {self.path}")
        try:
            handle = safe_open(str(file), framework="pt")
            names = set(handle.keys())
            for name in names:
                tensor_slice = handle.get_slice(name)
                dtype_name = tensor_slice.get_dtype()
                if dtype_name not in SAFETENSORS_DTYPES:
                    raise QuantkitError(f"unsupported dtype {dtype_name} for {name} in {file.name}")
                self.tensors[name] = TensorInfo(
                    name, tuple(tensor_slice.get_shape()), SAFETENSORS_DTYPES[dtype_name], file
                )
        except SafetensorError as exc:
            raise QuantkitError(f"corrupt shard {file.name}: {exc}") from None
        self._handles[file] = handle
        if expected is not None and not expected <= names:
            missing = sorted(expected - names)
            raise QuantkitError(
                f"shard {file.name} lacks {len(missing)} tensor(s) its index lists, e.g. {missing[0]}"
            )


def _read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise QuantkitError(f"no config.json in {path}: not a Hugging Face checkpoint directory")
    return read_json_object(config_file)


def _shard_map(path: Path) -> dict[Path, set[str] | None]:
    """Shard file -> the tensor names its index promises (None when there is no index)."""
    index_file = path / INDEX_FILE
    if index_file.is_file():
        weight_map = read_json_object(index_file).get("weight_map")
        if not isinstance(weight_map, dict):
            raise QuantkitError(f"invalid {INDEX_FILE} in {path}: no 'weight_map' object")
        shards: dict[Path, set[str] | None] = {}
        for name, file in weight_map.items():
            names = shards.setdefault(path / file, set())
            assert names is not None
            names.add(name)
        return shards
    if (path / SINGLE_FILE).is_file():
        return {path / SINGLE_FILE: None}
    files = sorted(path.glob("*.safetensors"))
    if files:
        return dict.fromkeys(files)
    if any(path.glob("*.bin")):
        raise QuantkitError(
            f"{path} holds only pickle (.bin) weights, which quantkit does not load; convert them to safetensors"
        )
    raise QuantkitError(f"no safetensors weights in {path}")
