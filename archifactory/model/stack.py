"""StackedMixinForCausalLM: embed -> positional -> (widen to the residual streams) -> N blocks -> (narrow)
-> final norm -> LM head; loss; accounting."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn

from archifactory.config.hybrid import cfg_variant_label
from archifactory.core.errors import ArchiFactoryError
from archifactory.model.block import Block, LayerState
from archifactory.model.components import (
    ModuleFactory,
    build_positional,
    component_factory,
    layer_mixin_factory,
)
from archifactory.model.documents import DocumentLayout
from archifactory.model.ffn.base import FeedForward
from archifactory.model.folder import check_weights, read_folder_config, read_weights, sections_config
from archifactory.model.hyper_weights import EMBED_DIM, HIDDEN, HyperWeights
from archifactory.model.init import init_weights
from archifactory.model.loss import lm_cross_entropy, logits_cross_entropy
from archifactory.model.mixins.base import Mixin
from archifactory.model.norms import build_norm
from archifactory.model.padding import padding
from archifactory.model.positional import NoPositional, PositionalScheme, PositionContext
from archifactory.model.residual.base import Residual
from archifactory.model.residual.standard import StandardResidual
from archifactory.model.value_residual import attach_value_residual


@dataclass
class DecodeState:
    """Per-layer states (mixin + FFN) plus the model-owned position counter, and, after a left-padded
    prefill, each row's pad count (`lead` [B]) so later steps without a mask keep per-row positions and
    the attention key mask right (`model/padding.py`)."""

    layers: list[LayerState]
    position: int = 0
    lead: Tensor | None = None


@dataclass
class BackboneOutput:
    """What the blocks compute before the LM head: callers that need logits at a few positions only
    (the eval adapter scores continuation tokens, generation the last position) project these themselves."""

    hidden: Tensor  # [B, T, D] after the final norm
    aux_loss: Tensor | None  # sum of the FFNs' auxiliary losses
    aux: dict[str, Tensor] = field(default_factory=dict)  # detached metrics, "layers.{i}.{name}"
    state: DecodeState | None = None


@dataclass
class CausalLMOutput:
    logits: Tensor | None  # [B, T, V]; None when only the loss was asked for
    loss: Tensor | None  # lm_loss + aux_loss, what the optimiser minimises
    lm_loss: Tensor | None  # mean next-token cross-entropy over non-ignored targets
    aux_loss: Tensor | None  # sum of the FFNs' auxiliary losses (MoE balance, z-loss)
    aux: dict[str, Tensor] = field(default_factory=dict)  # detached metrics, "layers.{i}.{name}"
    state: DecodeState | None = None


class StackedMixinForCausalLM(nn.Module):
    """A decoder-only LM assembled from swappable parts.

    Args:
        num_layers, hidden_size, vocab_size: the shape.
        mixin_module, ffn_module: factories called as `factory(layer_idx=i)` for each block.
        positional_module: a `PositionalScheme` (default: none).
        residual_module: a factory called as `factory(layer_idx=i, sublayer=j)` for the residual connection
            around block i's mixin (j = 0) and FFN (j = 1) (`model/residual/`; default: the standard one).
        embedding_module, lm_head_module, final_norm_module: pass pretrained modules to reuse them; None
            builds fresh ones. Passed-in modules are not re-initialised.
        freeze_lm_modules: freeze the passed-in embedding / head / final norm (fresh ones never are).
        tie_embeddings: the LM head reuses the embedding matrix.
        initializer_range: std of the init scheme in `model/init.py`.
        norm, norm_eps: `rmsnorm` or `layernorm` for the blocks and the final norm.
        value_residual: later layers mix the first layer's values into theirs (`model/value_residual.py`).
        weights: `standard` (every layer stores its weights) or `hyper` (generated from layer 0's by a GRU
            over depth, `model/hyper_weights.py`, with `hyper_embed_dim` / `hyper_hidden`).
        loss_chunk_size: tokens per chunk of the chunked cross-entropy (0 = whole batch at once).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        hidden_size: int,
        vocab_size: int,
        mixin_module: ModuleFactory,
        ffn_module: ModuleFactory,
        positional_module: PositionalScheme | None = None,
        residual_module: ModuleFactory | None = None,
        embedding_module: nn.Embedding | None = None,
        lm_head_module: nn.Linear | None = None,
        final_norm_module: nn.Module | None = None,
        freeze_lm_modules: bool = False,
        tie_embeddings: bool = False,
        initializer_range: float = 0.02,
        norm: str = "rmsnorm",
        norm_eps: float = 1e-5,
        loss_chunk_size: int = 0,
        value_residual: bool = False,
        weights: str = "standard",
        hyper_embed_dim: int = EMBED_DIM,
        hyper_hidden: int = HIDDEN,
    ) -> None:
        super().__init__()
        if tie_embeddings and lm_head_module is not None:
            raise ArchiFactoryError("tie_embeddings=true cannot be combined with a passed-in lm_head_module")
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.tie_embeddings = tie_embeddings
        self.loss_chunk_size = loss_chunk_size

        self.embedding = embedding_module or nn.Embedding(vocab_size, hidden_size)
        self.positional = positional_module or NoPositional(hidden_size, max_seq_len=0)
        residual_module = residual_module or functools.partial(StandardResidual, hidden_size=hidden_size)
        self.blocks = nn.ModuleList()
        for layer_idx in range(num_layers):
            mixin, ffn = mixin_module(layer_idx=layer_idx), ffn_module(layer_idx=layer_idx)
            if not isinstance(mixin, Mixin) or not isinstance(ffn, FeedForward):
                raise TypeError("mixin_module / ffn_module must build Mixin / FeedForward instances")
            around = [residual_module(layer_idx=layer_idx, sublayer=j) for j in (0, 1)]
            if not all(isinstance(r, Residual) for r in around):
                raise TypeError("residual_module must build Residual instances")
            self.blocks.append(Block(mixin, ffn, hidden_size, norm, norm_eps, *around))
        if value_residual:
            mixins = [b.mixin for b in self.blocks]
            attach_value_residual(mixins, [m.registry_name for m in mixins])
        self.final_norm = final_norm_module or build_norm(norm, hidden_size, norm_eps)
        self.lm_head = (
            None if tie_embeddings else (lm_head_module or nn.Linear(hidden_size, vocab_size, bias=False))
        )
        self._check_shapes()

        init_weights(self.blocks, initializer_range, num_layers)
        init_weights(self.positional, initializer_range, num_layers)
        if embedding_module is None:
            init_weights(self.embedding, initializer_range, num_layers)
        if self.lm_head is not None and lm_head_module is None:
            init_weights(self.lm_head, initializer_range, num_layers)
        if weights not in ("standard", "hyper"):
            raise ValueError(f"model.weights={weights!r} is not one of standard, hyper")
        # after the init: the base is layer 0's weights as a standard model draws them
        self.hyper = HyperWeights(self.blocks, hyper_embed_dim, hyper_hidden) if weights == "hyper" else None

        if freeze_lm_modules:
            for passed in (embedding_module, lm_head_module, final_norm_module):
                if passed is not None:
                    passed.requires_grad_(False)

    def _check_shapes(self) -> None:
        if tuple(self.embedding.weight.shape) != (self.vocab_size, self.hidden_size):
            raise ArchiFactoryError(
                f"embedding_module has shape {tuple(self.embedding.weight.shape)}, "
                f"expected (vocab_size={self.vocab_size}, hidden_size={self.hidden_size})"
            )
        if self.lm_head is not None and tuple(self.lm_head.weight.shape) != (
            self.vocab_size,
            self.hidden_size,
        ):
            raise ArchiFactoryError(
                f"lm_head_module has shape {tuple(self.lm_head.weight.shape)}, "
                f"expected (vocab_size={self.vocab_size}, hidden_size={self.hidden_size})"
            )

    @property
    def streams(self) -> Residual:
        """The residual connection that widens the embedding into the hidden state the blocks carry and
        narrows the last one (every connection of a model is of one option)."""
        return self.blocks[0].mixin_residual

    @property
    def head_weight(self) -> Tensor:
        return self.embedding.weight if self.lm_head is None else self.lm_head.weight

    def init_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> DecodeState:
        device = device or self.embedding.weight.device
        dtype = dtype or self.embedding.weight.dtype
        return DecodeState([block.init_state(batch_size, device, dtype) for block in self.blocks], 0)

    def backbone(
        self,
        input_ids: Tensor,
        state: DecodeState | None = None,
        documents: DocumentLayout | None = None,
        attention_mask: Tensor | None = None,
    ) -> BackboneOutput:
        """Embedding, positional scheme, blocks and final norm: hidden states [B, T, D], no LM head.
        `documents`: keep the packed documents of each row apart (`model/documents.py`; no decoding).
        `attention_mask`: [B, T] (or [B, past + T], transformers' layout), 1 = token, 0 = pad; left padding
        for decoding, left or right for a full forward (`model/padding.py`)."""
        start = 0 if state is None else state.position  # a Python int: no host sync under compile
        if documents is not None:
            if state is not None:
                raise ArchiFactoryError(
                    "document masking applies to full forwards, not to decoding with a state"
                )
            if attention_mask is not None:
                raise ArchiFactoryError(
                    "attention_mask cannot be combined with document masking (dataset.document_mask=true); "
                    "pass one or the other"
                )
            x, ctx = self._embed_documents(input_ids, documents)
        else:
            pads = padding(
                attention_mask,
                input_ids.shape,
                start,
                None if state is None else state.lead,
                state is not None,
            )
            self.positional.check_length(start + input_ids.shape[1])
            ctx = PositionContext(
                self.positional, start, input_ids.shape[1], input_ids.device, pads.pad_mask, pads.lead
            )
            x = self.positional.embed(self.embedding(input_ids), ctx.positions)

        x = self.streams.widen(x)  # [B, T, D], or [B, T, n, D] for a multi-stream residual
        generated = None if self.hyper is None else self.hyper.layer_weights(self.blocks[0])  # once a call
        new_layer_states: list[LayerState] = []
        aux_loss: Tensor | None = None
        metrics: dict[str, Tensor] = {}
        for i, block in enumerate(self.blocks):
            # a block's own layer index (`plan`'s activation trace runs each kind of block twice)
            weights = None if generated is None else generated[block.mixin.layer_idx]
            x, layer_state, aux = block(
                x, ctx, None if state is None else state.layers[i], documents, weights
            )
            if layer_state is not None:
                new_layer_states.append(layer_state)
            for key, value in aux.items():
                if key == "loss":
                    aux_loss = value if aux_loss is None else aux_loss + value
                else:
                    metrics[f"layers.{i}.{key}"] = value.detach()
        new_state = None
        if state is not None:
            new_state = DecodeState(new_layer_states, start + input_ids.shape[1], ctx.lead)
        return BackboneOutput(self.final_norm(self.streams.narrow(x)), aux_loss, metrics, new_state)

    def _embed_documents(
        self, input_ids: Tensor, documents: DocumentLayout
    ) -> tuple[Tensor, PositionContext]:
        """Token embeddings plus additive position embeddings at each token's offset in its document, and
        the per-document position context the blocks' mixers use."""
        self.positional.check_length(documents.length)
        ctx = PositionContext(self.positional, 0, documents.length, input_ids.device)
        tokens = self.embedding(input_ids)
        table = self.positional.embed(tokens.new_zeros(1, documents.length, self.hidden_size), ctx.positions)
        return tokens + table[0][documents.offsets], ctx  # embed() of zeros is the table, [1, L, D]

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        state: DecodeState | None = None,
        return_logits: bool = True,
        documents: DocumentLayout | None = None,
        attention_mask: Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids [B, T]; targets [B, T] already aligned (target t = token t+1), -100 ignored (give pads
        -100); `documents`: the packed rows' document layout when documents must not see each other;
        `attention_mask` [B, T] 1 = token, 0 = pad (`backbone`)."""
        out = self.backbone(input_ids, state, documents, attention_mask)
        hidden = out.hidden
        logits = lm_loss = loss = None
        if targets is None or return_logits:  # one head matmul; the loss (if any) reuses these logits
            logits = hidden @ self.head_weight.t().to(hidden.dtype)
        if targets is not None:
            if logits is not None:
                lm_loss = logits_cross_entropy(logits.reshape(-1, self.vocab_size), targets.reshape(-1))
            else:  # chunked: never materialises the full logits (model.loss_chunk_size)
                flat_hidden = hidden.reshape(-1, self.hidden_size)
                lm_loss = lm_cross_entropy(
                    flat_hidden, self.head_weight.to(hidden.dtype), targets.reshape(-1), self.loss_chunk_size
                )
            loss = lm_loss if out.aux_loss is None else lm_loss + out.aux_loss
        return CausalLMOutput(logits, loss, lm_loss, out.aux_loss, out.aux, out.state)

    def after_optimizer_step(self) -> None:
        """The per-step hook of every component (the training loop calls it after each optimizer step)."""
        for block in self.blocks:
            block.mixin.after_optimizer_step()
            block.ffn.after_optimizer_step()

    @classmethod
    def from_config(cls, cfg: Any, vocab_size: int, **parts: Any) -> StackedMixinForCausalLM:
        """The model a composed config describes (cfg.model, cfg.mixin, cfg.ffn, cfg.positional,
        cfg.residual), built through the registry; a constructor's refusal is one line. A config saved
        before the residual group existed has no `residual` and gets the standard one. `parts`: the
        constructor's embedding_module / lm_head_module / final_norm_module / freeze_lm_modules."""
        model_cfg = cfg.model
        vocab_size = model_cfg.vocab_size or vocab_size
        if model_cfg.hidden_size % model_cfg.num_heads:
            raise ArchiFactoryError(
                f"model.hidden_size={model_cfg.hidden_size} is not divisible by model.num_heads={model_cfg.num_heads}; "
                "choose a hidden size that is a multiple of the head count"
            )
        shape = (model_cfg.hidden_size, model_cfg.num_layers, model_cfg.max_seq_len)
        try:
            model = cls(
                num_layers=model_cfg.num_layers,
                hidden_size=model_cfg.hidden_size,
                vocab_size=vocab_size,
                mixin_module=layer_mixin_factory(cfg, *shape),
                ffn_module=component_factory("ffn", cfg.ffn, *shape),
                positional_module=build_positional(
                    cfg.positional, model_cfg.hidden_size, model_cfg.max_seq_len
                ),
                residual_module=component_factory("residual", residual_config(cfg), model_cfg.hidden_size),
                tie_embeddings=model_cfg.tie_embeddings,
                initializer_range=model_cfg.initializer_range,
                norm=model_cfg.norm,
                norm_eps=model_cfg.norm_eps,
                loss_chunk_size=model_cfg.loss_chunk_size,
                value_residual=bool(model_cfg.get("value_residual", False)),
                weights=str(model_cfg.get("weights", "standard")),
                **hyper_options(model_cfg),
                **parts,
            )
        except (TypeError, ValueError, ZeroDivisionError, AssertionError) as error:
            # a constructor refused an option (or a combination `archifactory.config.validation` cannot see): one line
            raise ArchiFactoryError(
                f"cannot build {cfg_variant_label(cfg)}/{cfg.ffn.name}: {type(error).__name__}: {error}"
            ) from error
        return model

    @classmethod
    def from_sections(cls, sections: dict[str, Any]) -> StackedMixinForCausalLM:
        """A freshly initialised model from a `config.json`'s model/mixin/ffn/positional(/residual) sections."""
        cfg = sections_config(sections)
        try:
            return cls.from_config(cfg, cfg.model.get("vocab_size") or 0)
        except OmegaConfBaseException as error:  # a key the builder needs is missing from config.json
            raise ArchiFactoryError(f"config.json is incomplete ({str(error).splitlines()[0]})") from error

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> StackedMixinForCausalLM:
        """Load a Hugging Face format `model/` folder (`archifactory.hf.model`) without Hydra; eval mode."""
        folder = Path(path)
        raw = read_folder_config(folder)
        weights_file = check_weights(folder, raw.get("weights_sha256"))
        model = cls.from_sections(raw)
        weights = read_weights(weights_file)
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        found = {name: tuple(t.shape) for name, t in weights.items()}
        if expected != found:
            differ = sorted(set(expected) ^ set(found)) or [n for n in expected if expected[n] != found[n]]
            raise ArchiFactoryError(f"{weights_file} does not match config.json (at {', '.join(differ[:3])})")
        model.load_state_dict(weights)
        return model.to(device).eval()

    def parameter_breakdown(self) -> dict[str, int]:
        """Parameter counts by part. `non_embedding` = blocks (their residual connections included) + final
        norm + the hypernetwork of model.weights=hyper (no embedding, positional table or LM head);
        `active` counts only the FFN parameters a token uses (MoE). Under model.weights=hyper the shared
        mixin and FFN weights live in block 0 and are counted once."""

        def count(module: nn.Module | None) -> int:
            return 0 if module is None else sum(p.numel() for p in module.parameters())

        mixin = sum(count(b.mixin) for b in self.blocks)
        residual = sum(count(b.mixin_residual) + count(b.ffn_residual) for b in self.blocks)
        ffn = sum(count(b.ffn) for b in self.blocks)
        owners = self.blocks if self.hyper is None else self.blocks[:1]  # hyper: block 0 holds the FFN
        ffn_active = sum(b.ffn.active_parameters() for b in owners)
        norms = sum(count(b.mixin_norm) + count(b.ffn_norm) for b in self.blocks) + count(self.final_norm)
        hyper = count(self.hyper)
        breakdown = {
            "embedding": count(self.embedding),
            "positional": count(self.positional),
            "mixin": mixin,
            "ffn": ffn,
            "norms": norms,
            "residual": residual,
            "hyper": hyper,
            "head": count(self.lm_head),
        }
        breakdown["total"] = sum(breakdown.values())
        for block in self.blocks:  # per mixin kind (a hybrid has several): "mixin.<name>"
            key = f"mixin.{block.mixin.registry_name}"
            breakdown[key] = breakdown.get(key, 0) + count(block.mixin)
        breakdown["non_embedding"] = mixin + ffn + norms + residual + hyper
        breakdown["active"] = breakdown["total"] - ffn + ffn_active
        breakdown["active_non_embedding"] = mixin + ffn_active + norms + residual + hyper
        return breakdown

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token at context `seq_len`: every block's mixin, FFN and residual connections
        plus the LM head, and under model.weights=hyper the weight generation, which runs once per forward:
        its FLOPs / `seq_len` (one sequence's forward; a batch of B rows shares one generation, so this is
        B× the cost a batch pays per token). Training costs 3× this (forward + backward)."""
        blocks = sum(
            b.mixin.flops_per_token(seq_len)
            + b.ffn.flops_per_token()
            + b.mixin_residual.flops_per_token()
            + b.ffn_residual.flops_per_token()
            + (0.0 if b.mixin.value_residual is None else b.mixin.value_residual.flops_per_token())
            for b in self.blocks
        )
        generation = 0.0 if self.hyper is None else self.hyper.flops() / max(seq_len, 1)
        return blocks + 2 * self.hidden_size * self.vocab_size + generation

    def decode_state_size(self, seq_len: int) -> int:
        """Elements of one sequence's decode state after `seq_len` tokens, summed over layers (mixins and
        stateful FFNs)."""
        return sum(b.mixin.state_size(seq_len) + b.ffn.state_size() for b in self.blocks)


def hyper_options(model_cfg: Any) -> dict[str, int]:
    """The constructor's `hyper_*` options from `model.hyper` (absent in a config saved before it existed)."""
    hyper = model_cfg.get("hyper") or {}
    return {
        "hyper_embed_dim": int(hyper.get("embed_dim", EMBED_DIM)),
        "hyper_hidden": int(hyper.get("hidden", HIDDEN)),
    }


def residual_config(cfg: Any) -> DictConfig:
    """The run's `residual` section, or the standard residual for a config saved before the group existed."""
    residual = cfg.get("residual")
    return OmegaConf.create({"name": "standard"}) if residual is None else residual
