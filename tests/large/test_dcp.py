"""Sharded checkpoints (trainer.checkpoint_format=dcp): a 2-process gloo FSDP2 run resumes exactly under 1
and 2 processes (DCP reshards), async saves included, and the run's `model/` folder — consolidated from the
DCP shards — loads with AutoModelForCausalLM with the logits of the checkpoint's weights.

The corpus is small enough that the first epoch ends right after the checkpoint: 30 training windows hold 7
optimizer steps of 4 and leave 2, which one process's micro-batch of 2 would still fit, so the resumed
step 8 is the one that must wrap into the next epoch as the uninterrupted run did."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from archifactory.runs.checkpoints import load_checkpoint_weights
from archifactory.train.loop import train
from tests.helpers import compose_config
from tests.train.test_distributed import torchrun
from tests.train.test_distributed_resume import RECIPE, steps_and_losses
from tests.train.test_loop import write_corpus

DCP = ["trainer.checkpoint_format=dcp"]


@pytest.mark.slow
def test_dcp_run_resumes_exactly_under_one_and_two_processes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = write_corpus(tmp_path / "corpus", documents=100)
    data = [f"dataset.path={corpus}", f"dataset.cache_dir={tmp_path / 'cache'}"]
    reference = tmp_path / "reference"
    train(compose_config([*RECIPE, *data]), reference)  # 8 steps, 1 process, full checkpoints
    expected = steps_and_losses(reference)

    first = tmp_path / "first"
    leg = torchrun(
        [*RECIPE, *data, *DCP, "trainer.strategy=fsdp", "trainer.max_steps=7", f"hydra.run.dir={first}"],
        tmp_path,
    )
    assert leg.returncode == 0, leg.stderr[-3000:]
    checkpoint = first / "checkpoints/step_0000007"
    shards = sorted(p.name for p in (checkpoint / "dcp").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its shards
    assert not (checkpoint / "model.safetensors").exists()
    position = json.loads((checkpoint / "trainer_state.json").read_text())["loader"]
    assert (position["epoch"], position["position"], position["num_windows"]) == (
        0,
        28,
        30,
    )  # the wrap is next

    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(first, one)
    shutil.copytree(first, two)
    train(compose_config([*RECIPE, *data, *DCP, "trainer.resume=true"]), one)  # 1 process, no torchrun
    leg = torchrun(
        [
            *RECIPE,
            *data,
            *DCP,
            "trainer.strategy=fsdp",
            "trainer.async_checkpoint=true",
            "trainer.resume=true",
            f"hydra.run.dir={two}",
        ],
        tmp_path,
    )
    assert leg.returncode == 0, leg.stderr[-3000:]

    final = load_file(str(reference / "checkpoints/step_0000008/model.safetensors"))
    for run_dir in (one, two):
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 8
        got = steps_and_losses(run_dir)
        assert sorted(got) == list(range(1, 9))
        for step in range(1, 9):
            assert abs(got[step] - expected[step]) < 2e-4, (run_dir.name, step, got, expected)
        weights, step = load_checkpoint_weights(run_dir / "checkpoints/step_0000008")
        assert step == 8 and sorted(weights) == sorted(final)
        for name in final:
            torch.testing.assert_close(weights[name], final[name], rtol=0, atol=1e-4)

    # the model/ folder the run wrote (export of the final DCP checkpoint) loads with transformers
    from transformers import AutoModelForCausalLM

    import archifactory  # noqa: F401  (registers the Auto classes)
    from archifactory.model.stack import StackedMixinForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(two / "model").eval()
    ours = StackedMixinForCausalLM.from_pretrained(two / "model")
    weights, _ = load_checkpoint_weights(two / "checkpoints/step_0000008")
    ours.load_state_dict(weights)
    ids = torch.randint(0, ours.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=0, atol=0)
    # gpu_check.sh's DCP check, run here on CPU against the same run (in this process: its imports are loaded)
    script = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check_dcp.py"
    spec = importlib.util.spec_from_file_location("gpu_check_dcp", script)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    check.main(two)
    printed = capsys.readouterr().out
    assert "step 8: max |logits" in printed and "__1_0.distcp" in printed


def test_single_process_dcp_checkpoint_is_checked_and_exported(tmp_path: Path) -> None:
    """One process, no torchrun: DCP checkpoints, `archifactory export` of one, and a truncated shard
    refused by the resume with one line (nothing else written)."""
    from archifactory.core.errors import ArchiFactoryError
    from archifactory.generate.export import export_run

    corpus = write_corpus(tmp_path / "corpus", documents=100)
    data = [f"dataset.path={corpus}", f"dataset.cache_dir={tmp_path / 'cache'}"]
    run_dir = tmp_path / "run"
    train(compose_config([*RECIPE, *data, *DCP, "trainer.max_steps=4"]), run_dir)
    checkpoint = run_dir / "checkpoints/step_0000004"
    meta = json.loads((checkpoint / "trainer_state.json").read_text())
    assert meta["format"] == "dcp" and set(meta["dcp_files"]) == {".metadata", "__0_0.distcp"}
    out = export_run(run_dir, tmp_path / "exported", step=4)
    weights, _ = load_checkpoint_weights(checkpoint)
    exported = load_file(str(out / "model.safetensors"))
    for name, tensor in weights.items():
        torch.testing.assert_close(exported[f"model.{name}"].float(), tensor, rtol=0, atol=0)

    shard = checkpoint / "dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ArchiFactoryError, match=r"is incomplete \(dcp/__0_0.distcp\)"):
        train(compose_config([*RECIPE, *data, *DCP, "trainer.resume=true"]), run_dir)
