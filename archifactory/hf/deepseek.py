"""`archifactory export format=deepseek_v3`: an all-`mla` run as a native transformers DeepSeek-V3 folder.

The folder (`DeepseekV3ForCausalLM`, model_type `deepseek_v3`) loads with `AutoModelForCausalLM` and no
ArchiFactory code, and computes our model's logits. It uses DeepSeek's released-weights convention,
`rope_interleave=True`: the rope rows of the query up-projection (`q_b_proj`, or `q_proj` without a query
latent) and of the KV down-projection (`kv_a_proj_with_mqa`) hold each rotary pair as neighbours (rows 2i,
2i+1) where ours holds them half a rope width apart (rows i, i + d_r/2, the rotate-half layout).

    ours (blocks[i].…)                       DeepSeek-V3 (model.layers.i.…)
    mixin_norm / ffn_norm                    input_layernorm / post_attention_layernorm (model.norm_eps)
    mixin.q_down, q_norm, q_up               self_attn.q_a_proj, q_a_layernorm, q_b_proj (q_lora_rank > 0)
    mixin.q_proj                             self_attn.q_proj                            (q_lora_rank = 0)
    mixin.kv_down, kv_norm, kv_up            self_attn.kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj
    mixin.out_proj                           self_attn.o_proj
    ffn.gate_proj, up_proj, out_proj         mlp.gate_proj, up_proj, down_proj (swiglu; a dense moe layer's
                                             ffn.dense.*; dense layers come first: first_k_dense_replace)
    ffn.router.gate, router.expert_bias      mlp.gate.weight, mlp.gate.e_score_correction_bias      (moe)
    ffn.w_in[e] (gate | up), ffn.w_out[e]    mlp.experts.e.gate_proj / up_proj, down_proj, transposed
    ffn.shared.*                             mlp.shared_experts.* (zero-width without shared experts)
    embedding, final_norm, lm_head           model.embed_tokens, model.norm, lm_head (tie_word_embeddings)

An `ffn=moe` run maps exactly when it is DeepSeek-V3's router: sigmoid scores, selection-only bias, no
token dropped, its MoE layers last (`moe_problem`); the export sets one expert group (n_group = topk_group =
1, so group-limited routing is plain top-k), routed_scaling_factor 1 and norm_topk_prob = ffn.renormalize.

transformers builds the two latent norms with a fixed epsilon of 1e-6; a run whose `mixin.norm_eps` is
another ε exports with `q_a_proj` and the latent rows of `kv_a_proj_with_mqa` scaled by s = sqrt(1e-6 / ε),
which is exact: RMSNorm(s·x) with s²ε in the root is RMSNorm(x) with ε. The rotary base is the model's
`positional.theta` under positional=rope, else MLA's own `mixin.rope_theta`. Whatever DeepSeek-V3 cannot
express is refused in one line before any weight is loaded (`check_exportable`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors.torch import save_file
from torch import Tensor
from transformers import DeepseekV3Config

from archifactory.config.hybrid import pattern_entries
from archifactory.core.errors import ArchiFactoryError
from archifactory.data.tokenizer import Tokenizer
from archifactory.hf.write import write_folder_atomically, write_tokenizer_files
from archifactory.model.ffn.moe import MoE
from archifactory.model.ffn.swiglu import SwiGLU
from archifactory.model.folder import WEIGHTS
from archifactory.model.mixins.mla import MultiHeadLatentAttention
from archifactory.model.positional import RotaryPositional
from archifactory.model.stack import StackedMixinForCausalLM, residual_config

LATENT_EPS = 1e-6  # transformers' DeepseekV3Attention builds q_a_layernorm / kv_a_layernorm with this eps
NO_EXPERTS = {
    "n_routed_experts": 0,
    "n_shared_experts": 0,
    "moe_intermediate_size": 0,
    "num_experts_per_tok": None,
    "n_group": None,
    "topk_group": None,
    "routed_scaling_factor": 1.0,
}
FIX = "export it with format=hf (ArchiFactory's own Hugging Face format, the default)"


def check_exportable(cfg: DictConfig) -> None:
    """Refuse, in one line naming the option and the fix, a run DeepSeek-V3's architecture cannot hold."""
    model = cfg.model
    if pattern_entries(cfg) is not None:
        problem = "the run is a hybrid (model.layer_pattern / model.attention_every); every layer must be mla"
    elif cfg.mixin.name != "mla":
        problem = (
            f"mixin={cfg.mixin.name}; DeepSeek-V3's attention is multi-head latent attention (mixin=mla)"
        )
    elif cfg.ffn.name not in ("swiglu", "moe"):
        problem = f"ffn={cfg.ffn.name}; DeepSeek-V3's MLP is a SwiGLU (ffn=swiglu) or its MoE (ffn=moe)"
    elif cfg.ffn.get("bias", False):
        problem = "ffn.bias=true; DeepSeek-V3's MLP has no biases"
    elif cfg.ffn.name == "moe" and (moe := moe_problem(cfg)):
        problem = moe
    elif cfg.positional.name not in ("rope", "none"):
        problem = (
            f"positional={cfg.positional.name}; DeepSeek-V3 has MLA's decoupled rope only (rope or none)"
        )
    elif residual_config(cfg).name != "standard":
        problem = f"residual={residual_config(cfg).name}; DeepSeek-V3 has the standard pre-norm residual"
    elif model.get("value_residual", False):
        problem = "model.value_residual=true; DeepSeek-V3 has no value residual"
    elif str(model.get("weights", "standard")) != "standard":
        problem = f"model.weights={model.weights}; DeepSeek-V3 stores every layer's weights"
    elif str(model.norm) != "rmsnorm":
        problem = f"model.norm={model.norm}; DeepSeek-V3's norms are RMSNorms"
    else:
        return
    raise ArchiFactoryError(f"format=deepseek_v3 cannot express this run: {problem}; {FIX}")


def moe_problem(cfg: DictConfig) -> str | None:
    """Why an `ffn=moe` run is not a DeepSeek-V3 MoE (None: it is one, with one expert group and a routed
    scaling factor of 1): DeepSeek-V3 scores with a sigmoid, drops no token and has its dense layers first."""
    ffn, layers = cfg.ffn, int(cfg.model.num_layers)
    every = int(ffn.get("moe_every", 1))
    moe_layers = [i for i in range(layers) if i % every == every - 1]
    if ffn.score_func != "sigmoid":
        return f"ffn.score_func={ffn.score_func}; DeepSeek-V3's router scores with a sigmoid (ffn.score_func=sigmoid)"
    if ffn.get("capacity_factor") is not None:
        return f"ffn.capacity_factor={ffn.capacity_factor}; DeepSeek-V3 drops no token (capacity_factor=null)"
    if moe_layers != list(range(layers - len(moe_layers), layers)):
        return (
            f"ffn.moe_every={every} interleaves dense and MoE layers; DeepSeek-V3 has its dense layers first"
        )
    if ffn.num_experts * ffn.get("granularity", 1) < 2:
        return "ffn.num_experts=1; DeepSeek-V3's group routing needs at least 2 experts"
    return None


def interleaved(rows: Tensor) -> Tensor:
    """Rope rows [d_r, ...] from our rotate-half layout (pair i = rows i, i + d_r/2) to DeepSeek's
    interleaved one (pair i = rows 2i, 2i + 1)."""
    half = rows.shape[0] // 2
    order = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()
    return rows[order]


def query_rows(weight: Tensor, mla: MultiHeadLatentAttention) -> Tensor:
    """A query projection [H * (d_nope + d_r), in] with each head's rope rows interleaved."""
    heads = weight.view(mla.num_heads, mla.qk_dim, -1)
    rope = torch.stack([interleaved(head[mla.nope_dim :]) for head in heads])
    return torch.cat([heads[:, : mla.nope_dim], rope], dim=1).reshape(weight.shape)


def attention_weights(mla: MultiHeadLatentAttention) -> dict[str, Tensor]:
    """One layer's `self_attn.*` tensors (see the module docstring)."""
    scale = math.sqrt(LATENT_EPS / mla.kv_norm.eps)  # the latent norms' eps, moved into their inputs
    latent, rope = mla.kv_down.weight.split([mla.kv_lora_rank, mla.rope_dim])
    tensors = {
        "kv_a_proj_with_mqa": torch.cat([latent * scale, interleaved(rope)]),
        "kv_a_layernorm": mla.kv_norm.weight,
        "kv_b_proj": mla.kv_up.weight,
        "o_proj": mla.out_proj.weight,
    }
    if mla.q_lora_rank:
        tensors |= {
            "q_a_proj": mla.q_down.weight * scale,
            "q_a_layernorm": mla.q_norm.weight,
            "q_b_proj": query_rows(mla.q_up.weight, mla),
        }
    else:
        tensors["q_proj"] = query_rows(mla.q_proj.weight, mla)
    return {f"self_attn.{name}.weight": t for name, t in tensors.items()}


def mlp_weights(ffn: SwiGLU | MoE) -> dict[str, Tensor]:
    """One layer's `mlp.*` tensors: a dense SwiGLU (ffn=swiglu, or a dense layer of ffn=moe), or the MoE in
    DeepSeek's released layout (one gate/up/down per expert; transformers fuses them when loading)."""
    if isinstance(ffn, SwiGLU) or not ffn.is_moe:
        dense = ffn if isinstance(ffn, SwiGLU) else ffn.dense
        projections = {"gate_proj": dense.gate_proj, "up_proj": dense.up_proj, "down_proj": dense.out_proj}
        return {f"mlp.{name}.weight": linear.weight for name, linear in projections.items()}
    tensors = {
        "mlp.gate.weight": ffn.router.gate.weight,
        "mlp.gate.e_score_correction_bias": ffn.router.expert_bias,
    }
    gate, up = ffn.w_in.split(ffn.intermediate_size, dim=-1)  # [E, D, F] each
    for e in range(ffn.num_experts):
        tensors[f"mlp.experts.{e}.gate_proj.weight"] = gate[e].T
        tensors[f"mlp.experts.{e}.up_proj.weight"] = up[e].T
        tensors[f"mlp.experts.{e}.down_proj.weight"] = ffn.w_out[e].T
    if ffn.shared is None:  # DeepSeek-V3 always has a shared MLP: zero-width, it adds nothing
        shared = {"gate_proj": torch.zeros(0, ffn.hidden_size), "up_proj": torch.zeros(0, ffn.hidden_size)}
        shared["down_proj"] = torch.zeros(ffn.hidden_size, 0)
    else:
        linears = {
            "gate_proj": ffn.shared.gate_proj,
            "up_proj": ffn.shared.up_proj,
            "down_proj": ffn.shared.out_proj,
        }
        shared = {name: linear.weight for name, linear in linears.items()}
    tensors |= {f"mlp.shared_experts.{name}.weight": t for name, t in shared.items()}
    return tensors


def deepseek_weights(model: StackedMixinForCausalLM) -> dict[str, Tensor]:
    """Every tensor of the DeepSeek-V3 state dict (fp32, CPU); no lm_head when the embedding is tied."""
    weights = {
        "model.embed_tokens.weight": model.embedding.weight,
        "model.norm.weight": model.final_norm.weight,
    }
    if model.lm_head is not None:
        weights["lm_head.weight"] = model.lm_head.weight
    for i, block in enumerate(model.blocks):
        layer = {
            "input_layernorm.weight": block.mixin_norm.weight,
            "post_attention_layernorm.weight": block.ffn_norm.weight,
            **attention_weights(block.mixin),
            **mlp_weights(block.ffn),
        }
        weights |= {f"model.layers.{i}.{name}": t for name, t in layer.items()}
    return {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in weights.items()}


def moe_options(model: StackedMixinForCausalLM) -> dict[str, Any]:
    """The config's dense/MoE split and, for ffn=moe, its router and experts: the layers from
    `first_k_dense_replace` on are MoE layers (= L: none), with one expert group and routed scaling 1."""
    ffn = model.blocks[-1].ffn  # an MoE layer if the model has any (they come last)
    if isinstance(ffn, SwiGLU) or not ffn.is_moe:
        width = ffn.intermediate_size if isinstance(ffn, SwiGLU) else ffn.dense.intermediate_size
        return {
            "first_k_dense_replace": model.num_layers,
            "intermediate_size": width,
            **NO_EXPERTS,  # not DeepSeek-V3's defaults (256 experts): a reader sees a dense model
        }
    return {
        "first_k_dense_replace": sum(not block.ffn.is_moe for block in model.blocks),
        "intermediate_size": (ffn.top_k + ffn.num_shared_experts) * ffn.intermediate_size,  # dense layers'
        "moe_intermediate_size": ffn.intermediate_size,
        "n_routed_experts": ffn.num_experts,
        "num_experts_per_tok": ffn.top_k,
        "n_shared_experts": ffn.num_shared_experts,
        "norm_topk_prob": ffn.router.renormalize,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
    }


def deepseek_config(model: StackedMixinForCausalLM, cfg: DictConfig, eos_id: int) -> DeepseekV3Config:
    """The DeepSeek-V3 config of `model` (built from `cfg`, which `check_exportable` accepted)."""
    mla: MultiHeadLatentAttention = model.blocks[0].mixin
    rope = model.positional if isinstance(model.positional, RotaryPositional) else mla.own_rope
    return DeepseekV3Config(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        num_hidden_layers=model.num_layers,
        **moe_options(model),
        num_attention_heads=mla.num_heads,
        num_key_value_heads=mla.num_heads,
        kv_lora_rank=mla.kv_lora_rank,
        q_lora_rank=mla.q_lora_rank or None,  # None: a direct q_proj
        qk_nope_head_dim=mla.nope_dim,
        qk_rope_head_dim=mla.rope_dim,
        v_head_dim=mla.v_dim,
        hidden_act="silu",
        max_position_embeddings=int(cfg.model.max_seq_len),
        initializer_range=float(cfg.model.initializer_range),
        rms_norm_eps=float(cfg.model.norm_eps),
        tie_word_embeddings=model.lm_head is None,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope.theta)},
        rope_interleave=True,
        attention_bias=False,
        num_mtp_layers=0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        architectures=["DeepseekV3ForCausalLM"],
        dtype="float32",
    )


def save_deepseek_v3(
    model: StackedMixinForCausalLM, cfg: DictConfig, tokenizer: Tokenizer, out: str | Path
) -> Path:
    """Write the DeepSeek-V3 folder atomically (config, weights, generation config, tokenizer)."""
    check_exportable(cfg)
    config = deepseek_config(model, cfg, tokenizer.eos_id)
    weights = deepseek_weights(model)

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        write_tokenizer_files(tmp, tokenizer)

    return write_folder_atomically(out, write)
