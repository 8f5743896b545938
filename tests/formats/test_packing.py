"""Dense int32 bit packing: exact round trips, and byte equality with compressed-tensors."""

from __future__ import annotations

import pytest
import torch

from quantkit.formats.packing import pack_int32, unpack_int32

SHAPES = [(1, 1), (3, 32), (5, 70), (16, 256), (7, 33)]


def random_codes(bits: int, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, generator=g, dtype=torch.int8)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dim", [0, 1])
def test_round_trip_is_exact(bits: int, shape: tuple[int, int], dim: int) -> None:
    codes = random_codes(bits, shape)
    packed = pack_int32(codes, bits, dim)
    assert packed.dtype == torch.int32
    expected_words = -(-shape[dim] * bits // 32)
    assert packed.shape[dim] == expected_words
    assert torch.equal(unpack_int32(packed, bits, shape, dim), codes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dim", [0, 1])
def test_matches_compressed_tensors(bits: int, shape: tuple[int, int], dim: int) -> None:
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    codes = random_codes(bits, shape, seed=bits)
    assert torch.equal(pack_int32(codes, bits, dim), helpers.pack_to_int32(codes, bits, packed_dim=dim))


def test_known_layout_for_4_bits() -> None:
    # codes -8..7 become 0..15; element i occupies bits 4i..4i+3, little-endian across words
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(2).reshape(1, 32)
    high_word = 0xFEDCBA98 - 2**32  # int32 view of 0xFEDCBA98
    assert pack_int32(codes, 4).tolist() == [[0x76543210, high_word, 0x76543210, high_word]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_packing_by_blocks_of_lines_is_exact(bits: int, dim: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large weights are packed a block of lines at a time (bounded int64 temporaries): the same words."""
    import quantkit.formats.packing as packing

    codes = random_codes(bits, (37, 75), seed=bits)
    whole = pack_int32(codes, bits, dim)
    monkeypatch.setattr(packing, "_BLOCK_CODES", 100)  # one or two lines per block
    assert torch.equal(pack_int32(codes, bits, dim), whole)
