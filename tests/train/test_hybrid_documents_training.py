"""A hybrid pattern and document-aware packing train end to end, with falling validation loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from archifactory.train.loop import train
from tests.train.test_loop import _first_and_last_val, smoke_config, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.slow
def test_hybrid_pattern_trains_and_names_itself(corpus: Path, tmp_path: Path) -> None:
    cfg = smoke_config(corpus, tmp_path / "cache", "model.layer_pattern=[gated_deltanet,gqa]")
    summary = train(cfg, tmp_path / "run")
    first, last = _first_and_last_val(tmp_path / "run")
    assert last < first and summary["mixin"] == "gated_deltanet+gqa"
    assert cfg.run_name.startswith("gated_deltanet+gqa_")


@pytest.mark.slow
def test_document_mask_trains_and_changes_what_the_model_sees(corpus: Path, tmp_path: Path) -> None:
    """Short documents (one story each) packed into 128-token windows: with the mask the losses differ
    from unmasked packing at the same seed (the model sees less context), and still fall."""
    summaries = {}
    for masked in (False, True):
        cfg = smoke_config(corpus, tmp_path / "cache", f"dataset.document_mask={str(masked).lower()}")
        cfg.dataset.doc_separator = "\n\n"
        run_dir = tmp_path / f"run_{masked}"
        summaries[masked] = train(cfg, run_dir)
        first, last = _first_and_last_val(run_dir)
        assert last < first
        assert json.loads((run_dir / "summary.json").read_text())["document_mask"] is masked
    assert summaries[True]["val_loss"] != summaries[False]["val_loss"]
