"""Pretrained parts from a transformers checkpoint: `model.pretrained_from=<Hub id or local folder>`.

The seed's `embedding_module` / `lm_head_module` / `final_norm_module` / `freeze_lm_modules`, from the CLI:
the source is loaded with `AutoModelForCausalLM` and its parts are found the way transformers itself names
them — `get_input_embeddings()`, `get_output_embeddings()` and the base model's final norm (`norm`,
`ln_f`, `final_layernorm`, …) — so Llama-style checkpoints and others work alike. Their weights are copied
into our own `nn.Embedding` / `nn.Linear` / norm (fp32), which the model constructor takes as passed-in
modules (`model.freeze_pretrained=true` freezes them).

`apply_pretrained(cfg)` runs before anything is written, and puts into the saved config what the source
decides: `model.vocab_size` (its embedding rows), `model.norm_eps` (its norm's eps) and `dataset.tokenizer`
(the source itself, so the run tokenizes with the source's tokenizer). A hidden size that differs from
`model.hidden_size`, a missing folder, an unreachable Hub, a final norm that computes differently from
`model.norm`: one line each.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, open_dict
from torch import nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.data import hub
from archifactory.model.norms import build_norm

log = logging.getLogger(__name__)

# where transformers' base models keep their final norm (Llama/Mistral/Qwen: norm, GPT-2: ln_f, …)
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f")
EPS_NAMES = ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "norm_eps")


def _looks_local(source: str) -> bool:
    """A path rather than a Hub id (`org/name`): absolute, relative, home-relative, or an existing entry."""
    return source.startswith(("/", ".", "~")) or os.sep + os.sep in source or Path(source).exists()


def check_source(source: str) -> str:
    """The source as transformers loads it: a local folder (must exist) or a Hub id (Hub reachable)."""
    if _looks_local(source):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise ArchiFactoryError(
                f"model.pretrained_from={source}: no such folder; give a transformers checkpoint folder "
                "(config.json + weights) or a Hub model id"
            )
        if not (folder / "config.json").is_file():
            raise ArchiFactoryError(
                f"model.pretrained_from={source} has no config.json; it is not a transformers checkpoint folder"
            )
        return str(folder.resolve())
    hub.check_hub(f"model.pretrained_from={source!r}")
    return source


def source_config(source: str) -> Any:
    """The source's transformers config (AutoConfig), Hub errors as one line."""
    with hub.hub_errors(f"model.pretrained_from={source!r}", gated_hint=True):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source, token=hub.hub_token("HF_TOKEN"))


def _config_value(config: Any, names: tuple[str, ...]) -> Any:
    text = getattr(config, "get_text_config", lambda: config)()
    return next((getattr(text, n) for n in names if getattr(text, n, None) is not None), None)


def apply_pretrained(cfg: DictConfig) -> DictConfig:
    """`cfg` with what the source decides (vocab size, norm eps, tokenizer); unchanged without a source."""
    source = cfg.model.get("pretrained_from")
    if not source:
        return cfg
    resolved = check_source(str(source))
    config = source_config(resolved)
    hidden = _config_value(config, ("hidden_size", "n_embd", "d_model"))
    if hidden != cfg.model.hidden_size:
        raise ArchiFactoryError(
            f"model.pretrained_from={source} has hidden size {hidden}, model.hidden_size is "
            f"{cfg.model.hidden_size}; set model.hidden_size={hidden} (and a matching model.num_heads)"
        )
    tokenizer = cfg.dataset.get("tokenizer")
    if tokenizer not in (None, "bpe", resolved, str(source)):
        raise ArchiFactoryError(
            f"model.pretrained_from={source} brings its own tokenizer, but dataset.tokenizer={tokenizer}; "
            "drop the dataset.tokenizer override"
        )
    vocab = _config_value(config, ("vocab_size",))
    eps = _config_value(config, EPS_NAMES)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.model.pretrained_from = resolved
        if vocab is not None:
            cfg.model.vocab_size = int(vocab)
        if eps is not None:
            cfg.model.norm_eps = float(eps)
        if "tokenizer" in cfg.dataset:
            cfg.dataset.tokenizer = resolved
    return cfg


def _final_norm(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)
    for name in FINAL_NORM_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module) and getattr(module, "weight", None) is not None:
            return module
    raise ArchiFactoryError(
        f"cannot find the final norm of {type(model).__name__} (looked for {', '.join(FINAL_NORM_NAMES)} "
        "on its base model); use a Llama-style checkpoint"
    )


def _copy_norm(source_norm: nn.Module, ours: nn.Module, cfg: DictConfig) -> None:
    """The source's final-norm weights into `ours` (our `model.norm`), refused if it computes differently."""
    hidden = cfg.model.hidden_size
    theirs = {n: p.detach().float() for n, p in source_norm.named_parameters()}
    if set(theirs) != {n for n, _ in ours.named_parameters()}:
        raise ArchiFactoryError(
            f"the source's final norm ({type(source_norm).__name__}: {', '.join(sorted(theirs))}) does not "
            f"match model.norm={cfg.model.norm}; choose the norm the source uses (rmsnorm or layernorm)"
        )
    with torch.no_grad():
        for name, param in ours.named_parameters():
            param.copy_(theirs[name])
        probe = torch.randn(4, hidden, generator=torch.Generator().manual_seed(0))
        same = torch.allclose(ours(probe), source_norm.float()(probe), rtol=1e-4, atol=1e-5)
    if not same:
        raise ArchiFactoryError(
            f"the source's final norm ({type(source_norm).__name__}) computes differently from "
            f"model.norm={cfg.model.norm}; pick a source with a standard RMSNorm or LayerNorm"
        )


def pretrained_part_modules(cfg: DictConfig, vocab: int) -> dict[str, Any]:
    """The constructor's embedding_module / lm_head_module (untied only) / final_norm_module /
    freeze_lm_modules as fresh modules of the source's shapes: `load_pretrained_parts` copies the source's
    weights into them; `archifactory plan` builds them on the meta device (which parts are loaded, which
    are frozen) without reading the source's weights."""
    hidden = int(cfg.model.hidden_size)
    parts: dict[str, Any] = {
        "embedding_module": nn.Embedding(vocab, hidden),
        "final_norm_module": build_norm(str(cfg.model.norm), hidden, float(cfg.model.norm_eps)),
        "freeze_lm_modules": bool(cfg.model.freeze_pretrained),
    }
    if not cfg.model.tie_embeddings:
        parts["lm_head_module"] = nn.Linear(hidden, vocab, bias=False)
    return parts


def load_pretrained_parts(cfg: DictConfig) -> dict[str, Any]:
    """The constructor's embedding_module / lm_head_module / final_norm_module / freeze_lm_modules, copied
    from `model.pretrained_from` (after `apply_pretrained`); {} without a source."""
    source = cfg.model.get("pretrained_from")
    if not source:
        return {}
    with hub.hub_errors(f"model.pretrained_from={source!r}", gated_hint=True):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(source, token=hub.hub_token("HF_TOKEN"))
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, nn.Embedding) or not isinstance(head, nn.Linear) or head.bias is not None:
        raise ArchiFactoryError(
            f"model.pretrained_from={source}: its embedding/head are not a plain nn.Embedding and bias-free "
            "nn.Linear; use a Llama-style checkpoint"
        )
    vocab, hidden = embedding.weight.shape
    if hidden != cfg.model.hidden_size:
        raise ArchiFactoryError(
            f"model.pretrained_from={source} has hidden size {hidden}, model.hidden_size is "
            f"{cfg.model.hidden_size}; set model.hidden_size={hidden}"
        )
    if cfg.model.tie_embeddings and head.weight.data_ptr() != embedding.weight.data_ptr():
        raise ArchiFactoryError(
            f"model.tie_embeddings=true, but {source} has a separate LM head; set model.tie_embeddings=false"
        )
    parts = pretrained_part_modules(cfg, vocab)
    _copy_norm(_final_norm(model), parts["final_norm_module"], cfg)
    with torch.no_grad():
        parts["embedding_module"].weight.copy_(embedding.weight.float())
        if "lm_head_module" in parts:
            parts["lm_head_module"].weight.copy_(head.weight.float())
    log.info(
        "pretrained parts from %s: embedding %s, final norm, %s%s",
        source,
        tuple(embedding.weight.shape),
        "tied head" if cfg.model.tie_embeddings else "LM head",
        " (frozen)" if cfg.model.freeze_pretrained else "",
    )
    return parts
