"""Token shards: flat binary files of uint16 (uint32 for vocabularies over 65,536) token ids.

`ShardWriter` streams a split's tokens into `<split>_00000.bin`, `<split>_00001.bin`, … of at most
`shard_tokens` tokens each, hashing as it writes; `TokenStream` memory-maps them back as one virtual
1-D array. The checksums and counts go into the manifest, and `verify_shards` checks them on reuse.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from archifactory.core import hashing
from archifactory.core.errors import ArchiFactoryError


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class ShardWriter:
    """Appends token arrays to fixed-capacity shard files; `close()` returns the shard records."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        if shard_tokens < 1:
            raise ArchiFactoryError(f"dataset.shard_tokens={shard_tokens} must be positive")
        self.folder, self.split, self.dtype, self.capacity = folder, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self._handle = None
        self._digest = None
        self._in_shard = 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._handle = (self.folder / name).open("wb")
        self._digest = hashlib.blake2b(digest_size=16)
        self._in_shard = 0
        self.shards.append({"file": name, "tokens": 0, "blake2b": ""})

    def _seal(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self.shards[-1].update(tokens=self._in_shard, blake2b=self._digest.hexdigest())
            self._handle = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        while tokens.size:
            if self._handle is None:
                self._open()
            take = min(tokens.size, self.capacity - self._in_shard)
            chunk = tokens[:take].tobytes()
            self._handle.write(chunk)
            self._digest.update(chunk)
            self._in_shard += take
            self.tokens += take
            tokens = tokens[take:]
            if self._in_shard == self.capacity:
                self._seal()

    def close(self) -> list[dict[str, Any]]:
        self._seal()
        return self.shards


def file_digest(path: Path) -> str:
    """The shards' checksum (blake2b, 16 bytes; the same as `ShardWriter` computes while writing)."""
    return hashing.file_digest(path, "blake2b", digest_size=16)


def verify_shards(folder: Path, shards: list[dict[str, Any]], dtype: np.dtype, checksums: bool) -> str | None:
    """Why the shards do not match their records (missing, wrong size, wrong checksum), or None."""
    for shard in shards:
        path = folder / shard["file"]
        if not path.is_file():
            return f"{shard['file']} is missing"
        if path.stat().st_size != shard["tokens"] * dtype.itemsize:
            expected = shard["tokens"] * dtype.itemsize
            return f"{shard['file']} has {path.stat().st_size} bytes, expected {expected}"
        if checksums and file_digest(path) != shard["blake2b"]:
            return f"{shard['file']} fails its checksum"
    return None


class TokenStream:
    """A split's shards memory-mapped as one virtual array of `total` tokens."""

    def __init__(self, folder: Path, shards: list[dict[str, Any]], dtype: np.dtype) -> None:
        kept = [s for s in shards if s["tokens"] > 0]
        self.arrays = [
            np.memmap(folder / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],)) for s in kept
        ]
        self.offsets = np.cumsum([0] + [s["tokens"] for s in kept])
        self.total = int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), copied across a shard boundary when they span one."""
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        local = start - int(self.offsets[shard])
        array = self.arrays[shard]
        if local + length <= array.shape[0]:
            return array[local : local + length]
        parts, remaining = [], length
        while remaining:
            piece = self.arrays[shard][local : local + remaining]
            parts.append(piece)
            remaining -= piece.shape[0]
            shard, local = shard + 1, 0
        return np.concatenate(parts)
