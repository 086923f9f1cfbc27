"""Residual options: how a block's sub-layers (mixin, FFN) read from and write back into the hidden state.

One file per option, each registered with `@register_residual("<name>")` (`core/registry.py`) and chosen
with `residual=<name>` (`configs/residual/`); `base.py` holds the interface the Block calls. The Block
(`model/block.py`) is the one place that wires them.
"""
