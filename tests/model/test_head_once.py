"""One forward, one head matmul: asking for logits with targets reuses them for the loss."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from archifactory.model.build import build_model
from tests.helpers import compose_config


def test_logits_and_loss_cost_one_head_matmul() -> None:
    cfg = compose_config(["model.hidden_size=32", "model.num_heads=2", "model.num_layers=1"])
    model = build_model(cfg, 512).eval()
    ids = torch.randint(0, 512, (2, 16))
    flops = {}
    outputs = {}
    for return_logits in (False, True):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            outputs[return_logits] = model(ids, targets=ids, return_logits=return_logits)
        flops[return_logits] = counter.get_total_flops()
    head = 2 * ids.numel() * 32 * 512
    assert flops[True] == flops[False], f"{flops[True] - flops[False]} extra FLOPs ({head} = one head matmul)"
    assert outputs[False].logits is None and outputs[True].logits.shape == (2, 16, 512)
    torch.testing.assert_close(outputs[True].loss, outputs[False].loss)
    by_hand = torch.nn.functional.cross_entropy(outputs[True].logits.reshape(-1, 512), ids.reshape(-1))
    torch.testing.assert_close(outputs[True].lm_loss, by_hand)
