"""gpu_check.sh's DCP check of the 1B run: list each checkpoint's shard files, then load the run's `model/`
folder (consolidated from the final DCP checkpoint) with AutoModelForCausalLM and compare its logits with
the consolidated checkpoint weights in our own model. Usage: python scripts/gpu_check_dcp.py <run dir>"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(run_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    import archifactory  # noqa: F401  (registers the Auto classes)
    from archifactory.model.stack import StackedMixinForCausalLM
    from archifactory.runs import layout
    from archifactory.runs.checkpoints import finished_checkpoints, load_checkpoint_weights

    for checkpoint in finished_checkpoints(run_dir):
        files = sorted(p.name for p in (checkpoint / layout.DCP_DIR).iterdir())
        print(f"{checkpoint.name}: {files}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = AutoModelForCausalLM.from_pretrained(run_dir / layout.MODEL).to(device).eval()
    ours = StackedMixinForCausalLM.from_pretrained(run_dir / layout.MODEL)
    weights, step = load_checkpoint_weights(finished_checkpoints(run_dir)[-1])
    ours.load_state_dict(weights)
    ours = ours.to(device).eval()
    ids = torch.randint(0, ours.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids).logits).abs().max().item()
    print(f"step {step}: max |logits(AutoModelForCausalLM) - logits(checkpoint)| = {diff:.3g}")
    if diff > 1e-3:
        raise SystemExit("the exported model/ folder does not reproduce the DCP checkpoint's logits")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run_dir", type=Path, help="a finished run with DCP checkpoints and its model/ folder"
    )
    run_dir = parser.parse_args().run_dir
    if not (run_dir / "model").is_dir():
        sys.exit(
            f"error: {run_dir} has no model/ folder; pass a finished run trained with trainer.checkpoint_format=dcp"
        )
    main(run_dir)
