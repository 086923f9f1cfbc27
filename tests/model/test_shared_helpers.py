"""One helper per concern: backend validation, the accumulation dtype, the chunk carry, file digests."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.hashing import file_digest
from archifactory.core.registry import components
from archifactory.model.components import component_factory
from archifactory.model.mixins.reference.common import carry_chunks, compute_dtype
from tests.helpers import compose_config

WITH_BACKEND = sorted(
    name
    for name, cls in components("mixin").items()
    if "backend" in inspect.signature(cls.__init__).parameters
)


@pytest.mark.parametrize("name", WITH_BACKEND)
def test_every_backend_option_refuses_an_unknown_value_in_one_line(name: str) -> None:
    cfg = compose_config([f"mixin={name}", "model.hidden_size=64", "model.num_heads=4"])
    cfg.mixin.backend = "cuda-magic"
    with pytest.raises(ArchiFactoryError, match=rf"mixin={name}: backend='cuda-magic' is not one of auto, "):
        component_factory("mixin", cfg.mixin, 64)(layer_idx=0)


def test_compute_dtype_is_at_least_fp32() -> None:
    assert compute_dtype(torch.bfloat16) == compute_dtype(torch.float16) == torch.float32
    assert compute_dtype(torch.float32) == torch.float32 and compute_dtype(torch.float64) == torch.float64


def test_carry_chunks_is_the_chunk_recurrence() -> None:
    state = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    kv = torch.randn(2, 3, 6, 4, 5, dtype=torch.float64)  # 6 chunks along dim 2
    decay = torch.rand(2, 3, 6, 4, 1, dtype=torch.float64)
    entering, final = carry_chunks(state, kv, decay)
    expected, current = [], state
    for n in range(6):
        expected.append(current)
        current = decay[:, :, n] * current + kv[:, :, n]
    torch.testing.assert_close(entering, torch.stack(expected, dim=2))
    torch.testing.assert_close(final, current)


def test_file_digest_streams_the_standard_hashes(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 40_000  # 10 MB: more than one read block
    path.write_bytes(data)
    assert file_digest(path) == hashlib.sha256(data).hexdigest()
    assert file_digest(path, "blake2b", digest_size=16) == hashlib.blake2b(data, digest_size=16).hexdigest()
