"""llama.cpp importance-matrix (imatrix) GGUF files from calibration statistics, and back.

The layout is the one ``llama-imatrix`` writes (``IMatrixCollector::save_imatrix`` in llama.cpp's
``tools/imatrix/imatrix.cpp``) and ``llama-quantize --imatrix`` reads:

- metadata, in this order: ``general.type`` = ``"imatrix"`` (string), ``imatrix.datasets``
  (array of strings), ``imatrix.chunk_count`` (u32), ``imatrix.chunk_size`` (u32, tokens per chunk);
  no ``general.architecture``;
- per entry, in sorted name order, ``<name>.in_sum2`` (F32, ne = [in_features, n_mat]: the sum of
  x² per input channel, one row per expert) then ``<name>.counts`` (F32, ne = [1, n_mat]: tokens
  seen per expert). GGUF stores only ``ggml_n_dims`` dimensions, so a plain linear (n_mat = 1)
  has ne = [in_features] and [1]. Counts are float32, exact up to 2^24 tokens as in llama.cpp.

llama-quantize's importance is ``in_sum2 / count`` per expert, and 1 for every channel of an
expert whose count is 0 (``load_imatrix`` in ``tools/quantize/quantize.cpp``); :func:`importance`
computes the same in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from quantkit.errors import QuantkitError
from quantkit.formats.gguf.writer import atomic_gguf
from quantkit.model.gguf_names import gguf_name

# llama.cpp's own names (tools/imatrix/imatrix.cpp); gguf-py only has them as Keys.IMatrix from 0.18 on
IMATRIX_TYPE = "imatrix"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"
_U32_MAX = 2**32 - 1

Entry = tuple[torch.Tensor, torch.Tensor]  # (sum_sq [E, in_features], counts [E])


@dataclass(frozen=True)
class ImatrixMetadata:
    """The ``imatrix.*`` keys of an imatrix file."""

    datasets: tuple[str, ...]
    chunk_count: int
    chunk_size: int


class _ImatrixWriter(gguf.GGUFWriter):
    def add_architecture(self) -> None:
        """Imatrix files carry no ``general.architecture`` (llama-imatrix writes none)."""


def _check_entry(name: str, sum_sq: torch.Tensor, counts: torch.Tensor) -> None:
    if sum_sq.ndim != 2 or counts.ndim != 1 or sum_sq.shape[0] != counts.shape[0] or 0 in sum_sq.shape:
        raise QuantkitError(
            f"imatrix entry {name}: expected sum_sq [E, in] and counts [E], got {tuple(sum_sq.shape)} "
            f"and {tuple(counts.shape)}"
        )


def _to_arrays(name: str, sum_sq: torch.Tensor, counts: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float32 arrays shaped as llama.cpp stores them (trailing size-1 dimensions dropped)."""
    _check_entry(name, sum_sq, counts)
    sums = sum_sq.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    n_tok = counts.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    if not np.isfinite(sums).all():
        raise QuantkitError(f"imatrix entry {name} has non-finite sums")
    if not (np.isfinite(n_tok).all() and (n_tok >= 0).all() and (n_tok == np.round(n_tok)).all()):
        raise QuantkitError(f"imatrix entry {name}: counts must be whole token counts >= 0")
    n_mat = sums.shape[0]
    if n_mat == 1:
        return sums.reshape(-1), n_tok.reshape(1)
    return sums, n_tok.reshape(n_mat, 1)


def write_imatrix_gguf(
    path: Path, entries: dict[str, Entry], datasets: list[str], chunk_count: int, chunk_size: int
) -> None:
    """Write ``entries`` (GGUF tensor name -> (sum_sq [E, in], counts [E])) as llama-imatrix does, atomically.

    ``datasets`` must name at least one dataset: llama-quantize prints the first one unchecked.
    """
    if not datasets:
        raise QuantkitError(f"imatrix {path}: at least one dataset name is required")
    for key, value in (("chunk_count", chunk_count), ("chunk_size", chunk_size)):
        if not 0 <= value <= _U32_MAX:
            raise QuantkitError(f"imatrix {path}: {key} {value} does not fit in a u32")
    arrays = {name: _to_arrays(name, *entries[name]) for name in sorted(entries)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_gguf(path, lambda tmp: _ImatrixWriter(tmp, arch="")) as writer:
        writer.add_type(IMATRIX_TYPE)
        writer.add_key_value(KEY_DATASETS, list(datasets), gguf.GGUFValueType.ARRAY,
                             sub_type=gguf.GGUFValueType.STRING)
        writer.add_uint32(KEY_CHUNK_COUNT, chunk_count)
        writer.add_uint32(KEY_CHUNK_SIZE, chunk_size)
        for name, (sums, counts) in arrays.items():
            writer.add_tensor(name + SUMS_SUFFIX, sums)
            writer.add_tensor(name + COUNTS_SUFFIX, counts)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()


def is_imatrix_gguf(path: Path) -> bool:
    """Whether ``path`` is an imatrix GGUF (``general.type`` imatrix), i.e. one that may be replaced by a new one."""
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, TypeError):
        return False
    field = reader.get_field(gguf.Keys.General.TYPE)
    return field is not None and field.contents() == IMATRIX_TYPE


def _field(reader: gguf.GGUFReader, path: Path, key: str) -> object:
    field = reader.get_field(key)
    if field is None:
        raise QuantkitError(f"imatrix {path} has no {key} metadata")
    return field.contents()


def read_imatrix_gguf(path: Path) -> tuple[dict[str, Entry], ImatrixMetadata]:
    """The entries (float32 sum_sq [E, in], counts [E]) and metadata of an imatrix GGUF file.

    Tensors other than ``.in_sum2``/``.counts`` (newer llama-imatrix also writes ``.in_sum``) are ignored.
    """
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise QuantkitError(f"cannot read imatrix {path}: {exc}") from None
    kind = _field(reader, path, gguf.Keys.General.TYPE)
    if kind != IMATRIX_TYPE:
        raise QuantkitError(f"{path} is a GGUF file of type {kind!r}, not an imatrix")
    datasets = _field(reader, path, KEY_DATASETS)
    chunk_count = _field(reader, path, KEY_CHUNK_COUNT)
    chunk_size = _field(reader, path, KEY_CHUNK_SIZE)
    if not (isinstance(datasets, list) and isinstance(chunk_count, int) and isinstance(chunk_size, int)):
        raise QuantkitError(f"imatrix {path} has malformed imatrix.* metadata")
    metadata = ImatrixMetadata(tuple(str(d) for d in datasets), chunk_count, chunk_size)

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        for suffix, into in ((SUMS_SUFFIX, sums), (COUNTS_SUFFIX, counts)):
            if not tensor.name.endswith(suffix):
                continue
            if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
                raise QuantkitError(f"imatrix {path}: {tensor.name} is {tensor.tensor_type.name}, not F32")
            into[tensor.name[: -len(suffix)]] = np.array(tensor.data, dtype=np.float32).reshape(-1)
    if sums.keys() != counts.keys():
        unpaired = sorted(sums.keys() ^ counts.keys())
        raise QuantkitError(f"imatrix {path}: mismatched sums and counts for {unpaired[0]}")
    entries: dict[str, Entry] = {}
    for name in sorted(sums):
        n_mat = counts[name].size
        if n_mat == 0 or sums[name].size % n_mat:
            raise QuantkitError(f"imatrix {path}: {name} has {sums[name].size} sums for {n_mat} counts")
        entries[name] = (torch.from_numpy(sums[name].reshape(n_mat, -1)), torch.from_numpy(counts[name]))
    return entries, metadata


def importance(sum_sq: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """llama-quantize's importance weights, float32 [E, in]: ``sum_sq / count``, all ones where count is 0."""
    _check_entry("importance", sum_sq, counts)
    sums = sum_sq.to(torch.float32)
    n_tok = counts.to(torch.float32)[:, None]
    return torch.where(n_tok > 0, sums / n_tok, torch.ones_like(sums))


def imatrix_entries(
    model_type: str, num_layers: int, stats: dict[str, Entry], *, num_experts: int | None = None
) -> dict[str, Entry]:
    """GGUF-named imatrix entries from statistics keyed by on-disk Hugging Face weight names.

    Per-expert names (each a [1, in] row and a [1] count) are stacked in expert order into the
    merged ``ffn_*_exps`` entry; every expert 0 .. ``num_experts`` - 1 must be present (without
    ``num_experts``, up to the highest index seen).
    """
    plain: dict[str, Entry] = {}
    rows: dict[str, dict[int, Entry]] = {}
    for hf_name, (sum_sq, counts) in stats.items():
        _check_entry(hf_name, sum_sq, counts)
        name, expert = gguf_name(model_type, hf_name, num_layers)
        if expert is None:
            if name in plain:
                raise QuantkitError(f"two calibration entries map to GGUF tensor {name}, one is {hf_name}")
            plain[name] = (sum_sq, counts)
            continue
        if counts.shape[0] != 1:
            raise QuantkitError(f"calibration entry {hf_name} is one expert but has {counts.shape[0]} rows")
        rows.setdefault(name, {})[expert] = (sum_sq, counts)
    merged: dict[str, Entry] = {}
    for name, by_expert in rows.items():
        n = num_experts if num_experts is not None else max(by_expert) + 1
        missing = [e for e in range(n) if e not in by_expert]
        if missing or max(by_expert) >= n:
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            problem = f"no statistics for expert(s) {shown}" if missing else f"expert {max(by_expert)} >= {n}"
            raise QuantkitError(f"imatrix entry {name}: {problem}")
        widths = {by_expert[e][0].shape[1] for e in range(n)}
        if len(widths) != 1:
            raise QuantkitError(f"imatrix entry {name}: experts have different input widths {sorted(widths)}")
        merged[name] = (torch.cat([by_expert[e][0] for e in range(n)]), torch.cat([by_expert[e][1] for e in range(n)]))
    return {**plain, **merged}
