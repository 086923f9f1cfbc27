"""The Hub code paths (tinystories, pints, hf, Hub tokenizers) against an in-memory stand-in for the Hub."""

from __future__ import annotations

import pytest

from archifactory.core.errors import ArchiFactoryError
from archifactory.data import load_data
from tests.data.conftest import make_text
from tests.helpers import compose_config

SPLITS = {
    "train": [make_text(i, 6) for i in range(40)],
    "validation": [make_text(100 + i, 6) for i in range(6)],
}


@pytest.fixture
def fake_hub(monkeypatch):
    """`datasets.load_dataset` serving SPLITS (column `story`) and recording its calls."""
    import datasets

    calls: list[dict] = []

    def load_dataset(name, config=None, *, split, streaming, revision, token):
        calls.append({"name": name, "config": config, "split": split, "streaming": streaming, "token": token})
        table = datasets.Dataset.from_dict({"story": SPLITS[split], "id": list(range(len(SPLITS[split])))})
        return table.to_iterable_dataset() if streaming else table

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_tinystories_uses_the_real_validation_split_and_caps_training_documents(tmp_path, fake_hub) -> None:
    cfg = compose_config([
        "dataset=tinystories", "dataset.text_field=story", "dataset.max_documents=25",
        "dataset.vocab_size=300", f"dataset.cache_dir={tmp_path}",
    ])  # fmt: skip
    data = load_data(cfg.dataset, seq_len=8, seed=0)
    splits = data.manifest["splits"]
    assert splits["train"]["documents"] == 25 and splits["val"]["documents"] == len(SPLITS["validation"])
    assert splits["val"]["bytes"] == sum(len(t.encode()) for t in SPLITS["validation"])
    assert {c["split"] for c in fake_hub} == {"train", "validation"}
    assert all(c["name"] == "roneneldan/TinyStories" and c["streaming"] for c in fake_hub)
    assert data.manifest["source"] == "hf:roneneldan/TinyStories"
    calls = len(fake_hub)
    assert load_data(cfg.dataset, seq_len=16, seed=1).reused_cache and len(fake_hub) == calls  # no Hub needed


def test_hf_by_name_holds_out_documents_and_checks_the_text_field(tmp_path, fake_hub) -> None:
    base = [
        "dataset=hf",
        "dataset.name=someone/corpus",
        "dataset.vocab_size=300",
        f"dataset.cache_dir={tmp_path}",
    ]
    data = load_data(
        compose_config([*base, "dataset.text_field=story", "dataset.val_fraction=0.1"]).dataset, 8, 0
    )
    assert data.manifest["splits"]["val"]["documents"] == 4  # documents 0, 10, 20, 30 of 40
    assert fake_hub[0]["name"] == "someone/corpus"
    with pytest.raises(ArchiFactoryError, match=r"no field 'text' \(it has: story, id\)"):
        load_data(compose_config(base).dataset, 8, 0)


def test_gated_dataset_passes_the_token(tmp_path, fake_hub, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    cfg = compose_config([
        "dataset=pints", "dataset.text_field=story", "dataset.vocab_size=300", "dataset.max_tokens=500",
        f"dataset.cache_dir={tmp_path}",
    ])  # fmt: skip
    data = load_data(cfg.dataset, seq_len=8, seed=0)
    assert all(c["token"] == "hf_secret" for c in fake_hub)
    assert data.manifest["splits"]["train"]["tokens"] == 500


def test_hub_tokenizer_by_name(tmp_path, corpus, make_cfg, monkeypatch) -> None:
    import transformers
    from transformers import PreTrainedTokenizerFast

    donor = load_data(make_cfg(path=str(corpus), cache_dir=str(tmp_path / "donor")), 8, 0).tokenizer
    requests: list[str] = []

    def from_pretrained(name, token=None):
        requests.append(name)
        return PreTrainedTokenizerFast(tokenizer_object=donor.backend, eos_token="<|endoftext|>")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    data = load_data(make_cfg(path=str(corpus), tokenizer="org/some-tokenizer"), 8, 0)
    assert (
        data.tokenizer.kind == "hub" and data.eos_id == donor.eos_id and data.vocab_size == donor.vocab_size
    )
    assert data.tokenizer.encode("the queen sings") == donor.encode("the queen sings")
    assert load_data(make_cfg(path=str(corpus), tokenizer="org/some-tokenizer"), 8, 0).reused_cache
    assert requests == ["org/some-tokenizer"]  # downloaded once, then read from the cache
