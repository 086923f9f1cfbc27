"""File digests: the one streaming hasher behind checkpoint sha256s, shard checksums and source fingerprints."""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK = 1 << 22  # 4 MiB reads: large files never sit in memory whole


def file_digest(path: Path, algorithm: str = "sha256", digest_size: int | None = None) -> str:
    """Hex digest of a file's bytes, read in blocks. `digest_size` is for blake2b (shards use 16 bytes)."""
    digest = hashlib.new(algorithm) if digest_size is None else hashlib.blake2b(digest_size=digest_size)
    with path.open("rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()
