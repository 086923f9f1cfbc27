"""File modes of what ArchiFactory writes: readable by the group and others as far as the umask allows.

`tempfile.mkdtemp` makes 0700 folders and safetensors writes 0600 files; renamed into place as a run's
`model/`, `tokenizer/` or checkpoint (or a token cache), they would lock out every other user of a shared
machine whatever their umask says. `share_as_umask_allows` gives such a tree the modes a plain
`open()`/`mkdir()` would have: 0666 & ~umask for files, 0777 & ~umask for folders.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process umask (read by setting it and setting it back: Python has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_as_umask_allows(path: Path) -> None:
    """chmod `path` (and, for a folder, everything under it) to the modes the umask allows."""
    mask = current_umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        if item.is_symlink():
            continue
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)
