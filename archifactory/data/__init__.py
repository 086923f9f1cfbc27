"""The data pipeline: text → tokenizer → packed token shards (cached) → batches.

    from archifactory.data import load_data
    data = load_data(cfg.dataset, seq_len=256, seed=0)        # prepares on first use, then reuses
    loader = data.train_loader(batch_size=16)                  # (inputs, targets) int64 [16, 256], forever
    val = data.val_batches(batch_size=16, max_tokens=65536)    # fixed validation batches

Modules: `sources` (local files, Hub datasets), `tokenizer` (byte-level BPE or a Hub tokenizer),
`prepare` (tokenize in parallel, EOS after each document, shards + manifest, atomic, keyed by content),
`shards` (writing, verifying and memory-mapping token files), `loader` (packed windows, seeded order,
checkpointable position, rank slices), `hub` (one-line errors instead of Hub tracebacks).

Cache layout under `dataset.cache_dir` (default `$ARCHIFACTORY_CACHE` or `~/.cache/archifactory`):

    tokenizers/bpe8192-<hash>/{tokenizer.json, meta.json}    # hash of the data fingerprint + BPE settings
    tokenizers/hub-<name>-<hash>/{tokenizer.json, meta.json}
    tokens/<dataset name>-<hash>/manifest.json                # hash of data + tokenizer hash + settings
    tokens/<dataset name>-<hash>/{train,val}_00000.bin …      # uint16 (uint32 above 65,536 ids) token ids
"""

from archifactory.data.dataset import TokenData, load_data, prepare_task
from archifactory.data.loader import PackedLoader
from archifactory.data.sources import check_dataset_path
from archifactory.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "PackedLoader",
    "TokenData",
    "Tokenizer",
    "check_dataset_path",
    "load_data",
    "load_tokenizer",
    "prepare_task",
]
