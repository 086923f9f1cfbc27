"""Start an SFT model from a pretrained run: its weights, with the vocabulary grown for the chat tokens."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.runs.checkpoints import load_checkpoint_weights, pick_checkpoint

log = logging.getLogger(__name__)
VOCAB_ROWS = ("embedding.weight", "lm_head.weight")  # [V, D] matrices that grow with the vocabulary


def grow_rows(pretrained: torch.Tensor, rows: int) -> torch.Tensor:
    """`pretrained` [V, D] extended to [rows, D]; each new row is the mean of the pretrained rows, so a new
    token starts as an "average" token (a common choice, e.g. Hewitt 2021) instead of a random direction."""
    extra = rows - pretrained.shape[0]
    return torch.cat([pretrained, pretrained.mean(dim=0, keepdim=True).expand(extra, -1)])


def init_from_pretrained(model: nn.Module, run_dir: Path) -> int:
    """Load `run_dir`'s newest checkpoint into `model` (built with the pretrained architecture and the grown
    vocabulary); returns the pretrained step. Every tensor must match except the vocabulary rows."""
    checkpoint = pick_checkpoint(run_dir)
    weights, step = load_checkpoint_weights(checkpoint)
    own = model.state_dict()
    if set(own) != set(weights):
        differ = sorted(set(own) ^ set(weights))[:3]
        raise ArchiFactoryError(
            f"{checkpoint} does not fit the SFT model (differs at {', '.join(differ)}); SFT takes its architecture "
            "from the pretrained run, so leave mixin/ffn/positional/model unchanged"
        )
    for name, tensor in weights.items():
        if name in VOCAB_ROWS and tensor.shape[0] < own[name].shape[0]:
            weights[name] = grow_rows(tensor, own[name].shape[0])
        elif tensor.shape != own[name].shape:
            raise ArchiFactoryError(
                f"{checkpoint}: {name} has shape {tuple(tensor.shape)}, the SFT model {tuple(own[name].shape)}; "
                "leave the architecture unchanged (trainer.seq_len may not exceed a learned position table)"
            )
    model.load_state_dict(weights)
    log.info("initialised from %s (pretrained step %d)", checkpoint, step)
    return step
