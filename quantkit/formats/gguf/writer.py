"""Writing GGUF files: the planned tensors, each checked against its plan, then the metadata.

``write_gguf`` writes where it is told: the quantize driver hands it the temporary path of
:func:`quantkit.outputs.atomic_file`. :func:`atomic_gguf` makes a GGUF writer atomic on its own (imatrix files).
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import gguf
import numpy as np

from quantkit.errors import QuantkitError
from quantkit.formats.gguf.tensors import keeps_f32
from quantkit.formats.output import FileTensor, StoredTensor

GGML = gguf.GGMLQuantizationType
FLOAT_DTYPES = {GGML.F32: np.float32, GGML.F16: np.float16}
_SPOOL_BYTES = 256 * 1024 * 1024  # staged tensor data beyond this goes to disk


def write_gguf(path: Path, arch: str, planned: list[FileTensor], tensors: Iterable[StoredTensor],
               add_metadata: Callable[[gguf.GGUFWriter], None]) -> None:
    """Write a GGUF of llama.cpp architecture ``arch`` at ``path``: ``tensors`` in the order given, each
    ``planned`` one exactly once, then what ``add_metadata`` adds.

    Tensor data is staged beside ``path``, not in /tmp: it is as large as the model.
    """
    remaining = {tensor.name: tensor for tensor in planned}
    with tempfile.SpooledTemporaryFile(_SPOOL_BYTES, "w+b", dir=str(path.parent)) as staging, \
            closing(gguf.GGUFWriter(path, arch, use_temp_file=True)) as writer:
        writer.temp_file = staging
        for stored in tensors:
            tensor = remaining.pop(stored.name, None)
            if tensor is None:
                raise QuantkitError(f"GGUF tensor {stored.name} is not planned for this checkpoint, or comes twice")
            kind = gguf.GGMLQuantizationType[stored.type_name]
            writer.add_tensor(stored.name, _checked_data(tensor, kind, stored.data),
                              raw_dtype=None if kind in FLOAT_DTYPES else kind)
        if remaining:
            raise QuantkitError(f"GGUF export got no data for {len(remaining)} tensor(s), e.g. {next(iter(remaining))}")
        add_metadata(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()


def _checked_data(tensor: FileTensor, ggml_type: GGML, data: np.ndarray) -> np.ndarray:
    """``data`` as GGUFWriter wants it, after checking it fits ``tensor``'s shape and F32 rule."""
    if keeps_f32(tensor) and ggml_type != GGML.F32:
        raise QuantkitError(f"{tensor.name} must stay F32 for llama.cpp, got {ggml_type.name}")
    if ggml_type in FLOAT_DTYPES:
        shape = tuple(data.shape)
        array = np.ascontiguousarray(data, dtype=FLOAT_DTYPES[ggml_type])
    else:
        if data.dtype != np.uint8:
            raise QuantkitError(f"{tensor.name}: {ggml_type.name} data must be uint8 ggml blocks, got {data.dtype}")
        try:
            shape = gguf.quant_shape_from_byte_shape(data.shape, ggml_type)
        except ValueError as exc:
            raise QuantkitError(f"{tensor.name}: {exc}") from None
        array = np.ascontiguousarray(data)
    if shape != tensor.shape:
        raise QuantkitError(f"{tensor.name}: {ggml_type.name} data holds shape {list(shape)}, "
                            f"GGUF needs {list(tensor.shape)}")
    return array


@contextmanager
def atomic_gguf(path: Path, make_writer: Callable[[Path], gguf.GGUFWriter]) -> Iterator[gguf.GGUFWriter]:
    """A writer (from ``make_writer(temporary path)``) whose file replaces ``path`` when the block completes.

    On any error or Ctrl-C inside the block the temporary file is removed and ``path`` is untouched.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    writer = make_writer(tmp)
    try:
        yield writer
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
