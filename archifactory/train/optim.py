"""Optimizers, selected by `trainer.optimizer`: `adamw`, `muon` (+ AdamW for the rest) and `ademamix`.

Parameters fall in four classes (`classify_parameters`), decided by the module that owns them, not by name:

- `matrix`: the ≥2-D `weight` of an `nn.Linear` inside the network (attention/FFN projections);
- `head`: the LM head's weight when it is its own `nn.Linear` (untied);
- `table`: `nn.Embedding` weights (token embedding, learned positional table; a tied head is this tensor)
  and every parameter of the model's `positional` module;
- `other`: everything else — norm gains, biases, per-channel decays and gates, raw `nn.Parameter`s.

Weight decay (AdamW, AdEMAMix, and the AdamW half of Muon) applies to `matrix` and `head` only. A tensor
shared by several modules (tied embeddings) is counted once; frozen parameters (`requires_grad=False`)
are left out. A component that wants decay or Muon on a matrix should hold it in an `nn.Linear`.

Parameter names travel into the optimizer (`param_names` in its `state_dict()`), so a checkpoint from a
different architecture is refused by `load_state_dict` instead of being loaded into the wrong tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError

OPTIMIZERS = ("adamw", "muon", "ademamix")
NamedParams = list[tuple[str, nn.Parameter]]


@dataclass
class ParameterClasses:
    matrix: NamedParams = field(default_factory=list)
    head: NamedParams = field(default_factory=list)
    table: NamedParams = field(default_factory=list)
    other: NamedParams = field(default_factory=list)

    @property
    def decay(self) -> NamedParams:
        return self.matrix + self.head

    @property
    def no_decay(self) -> NamedParams:
        return self.table + self.other


def _head_module(model: nn.Module) -> nn.Module | None:
    head = getattr(model, "lm_head", None)
    if head is None and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
    return head if isinstance(head, nn.Module) else None


def classify_parameters(model: nn.Module) -> ParameterClasses:
    """Split the trainable parameters of `model` into matrix / head / table / other (see module doc)."""
    # a Linear may hold no weight of its own: model.weights=hyper's layers 1… compute with generated ones
    linear_weights = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and "weight" in m._parameters
    }
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    positional = getattr(model, "positional", None)
    if isinstance(positional, nn.Module):
        tables |= {id(p) for p in positional.parameters()}
    head = _head_module(model)
    head_ids = (
        {id(head.weight)} if head is not None and isinstance(getattr(head, "weight", None), Tensor) else set()
    )

    classes = ParameterClasses()
    for name, param in model.named_parameters():  # deduplicated: a tied tensor appears once
        if not param.requires_grad:
            continue
        if id(param) in tables:
            classes.table.append((name, param))
        elif id(param) in linear_weights and param.ndim >= 2:
            (classes.head if id(param) in head_ids else classes.matrix).append((name, param))
        else:
            classes.other.append((name, param))
    return classes


def _decay_groups(
    classes: ParameterClasses, weight_decay: float, include_matrices: bool
) -> list[dict[str, Any]]:
    decay = classes.decay if include_matrices else classes.head
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": classes.no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


class AdEMAMix(torch.optim.Optimizer):
    """AdEMAMix (Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older", 2024).

    Adam whose numerator mixes a fast EMA of the gradient (β1, bias-corrected) with a slow one (β3, not
    bias-corrected) weighted by α, so old gradients keep contributing for ~1/(1-β3) steps:

        m1 ← β1 m1 + (1-β1) g          m2 ← β3(t) m2 + (1-β3(t)) g          ν ← β2 ν + (1-β2) g²
        θ ← θ - lr · [ (m1 / (1-β1^t) + α(t) m2) / (sqrt(ν / (1-β2^t)) + ε) + λ θ ]

    with the paper's warmups over `warmup_steps` = T (0 disables them): α(t) = α · min(1, t/T) linearly,
    and β3(t) interpolates the *half-life* of the slow EMA linearly from β1's to β3's,
    β3(t) = 0.5 ** (1 / (h(t) + 1)), h(t) = (1 - t/T) h(β1) + (t/T) h(β3), h(β) = ln 0.5 / ln β - 1.
    Without these the slow EMA destabilises early training. `t` is 1-based and counted per parameter.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 5.0,
        warmup_steps: int = 0,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or alpha < 0 or warmup_steps < 0:
            raise ValueError("AdEMAMix: lr, eps, weight_decay, alpha and warmup_steps must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 3:
            raise ValueError(f"AdEMAMix: betas must be three values in [0, 1), got {betas}")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "alpha": alpha,
            "warmup_steps": warmup_steps,
            "eps": eps,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)

    @staticmethod
    def alpha_at(step: int, alpha: float, warmup_steps: int) -> float:
        return alpha if warmup_steps <= 0 else alpha * min(1.0, step / warmup_steps)

    @staticmethod
    def beta3_at(step: int, beta_start: float, beta_end: float, warmup_steps: int) -> float:
        if warmup_steps <= 0 or step >= warmup_steps:
            return beta_end

        def half_life(beta: float) -> float:
            return math.log(0.5) / math.log(beta + 1e-8) - 1.0

        frac = step / warmup_steps
        return 0.5 ** (1.0 / ((1.0 - frac) * half_life(beta_start) + frac * half_life(beta_end) + 1.0))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2, beta3_final = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdEMAMix does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg_fast"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_slow"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                alpha = self.alpha_at(t, group["alpha"], group["warmup_steps"])
                beta3 = self.beta3_at(t, beta1, beta3_final, group["warmup_steps"])
                grad = p.grad
                fast, slow, sq = state["exp_avg_fast"], state["exp_avg_slow"], state["exp_avg_sq"]
                fast.lerp_(grad, 1.0 - beta1)
                slow.lerp_(grad, 1.0 - beta3)
                sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = (sq.sqrt() / math.sqrt(1.0 - beta2**t)).add_(eps)
                numer = fast / (1.0 - beta1**t) + alpha * slow
                # Decoupled weight decay (AdamW-style), scaled by the scheduled lr.
                p.mul_(1.0 - lr * wd)
                p.addcdiv_(numer, denom, value=-lr)
        return loss


def newton_schulz_orthogonalize(matrix: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximate U Vᵀ of `matrix` = U S Vᵀ with Jordan's quintic Newton–Schulz iteration (the coefficients
    (3.4445, -4.7750, 2.0315) maximise the slope at zero; singular values land in ~[0.7, 1.2]). In bf16 on
    CUDA (tensor cores; the iteration tolerates it), in fp32 elsewhere (CPU bf16 matmuls are not faster)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix.to(torch.bfloat16 if matrix.is_cuda else torch.float32)
    transposed = x.shape[0] > x.shape[1]
    if transposed:  # iterate on the short side: X Xᵀ is then the smaller Gram matrix
        x = x.T
    x = x / x.norm().clamp(min=eps)  # Frobenius norm ≥ spectral norm, so singular values ≤ 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if transposed else x).to(matrix.dtype)


class NewtonSchulzMuon(torch.optim.Optimizer):
    """Muon (Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024) for exactly-2-D
    parameters, used when this torch has no `torch.optim.Muon`; same conventions as torch's: EMA momentum
    `B ← μB + (1-μ)g`, Nesterov update `(1-μ)g + μB`, orthogonalised by Newton–Schulz, scaled by
    `lr · sqrt(max(1, rows/cols))`, decoupled weight decay `θ ← θ(1 - lr·λ)`."""

    def __init__(
        self,
        params: Any,
        lr: float = 0.02,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov}
        )
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1.0 - mu)
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                update = newton_schulz_orthogonalize(update)
                p.mul_(1.0 - lr * wd)
                p.add_(update, alpha=-lr * math.sqrt(max(1.0, p.shape[0] / p.shape[1])))
        return loss


class _StateView(Mapping):
    """Read-only view of the per-parameter state of several optimizers (never creates entries)."""

    def __init__(self, owner: CombinedOptimizer) -> None:
        self._owner = owner

    def _maps(self) -> list[Mapping]:
        return [opt.state for opt in self._owner.optimizers]

    def __getitem__(self, key: Tensor) -> Any:
        for state in self._maps():
            if key in state:
                return state[key]
        raise KeyError(key)

    def __iter__(self) -> Iterator[Tensor]:
        for state in self._maps():
            yield from state

    def __len__(self) -> int:
        return sum(len(state) for state in self._maps())


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, driven as one (Muon for matrices + AdamW for the rest).

    `param_groups` is the concatenation of the inner optimizers' group dicts (the same objects), so an LR
    scheduler scales every group from its own `initial_lr`; `state_dict()` holds one entry per inner
    optimizer, in order.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        self.optimizers = list(optimizers)
        super().__init__([g for opt in self.optimizers for g in opt.param_groups], defaults={})
        self.state = _StateView(self)  # type: ignore[assignment]

    def _sync_groups(self) -> None:
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        saved = state_dict.get("optimizers")
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            raise ValueError(
                f"optimizer state holds {len(saved) if isinstance(saved, list) else 'no'} inner optimizers, "
                f"expected {len(self.optimizers)} ({', '.join(type(o).__name__ for o in self.optimizers)})"
            )
        for opt, opt_state in zip(self.optimizers, saved):
            opt.load_state_dict(opt_state)
        self._sync_groups()  # load_state_dict replaces the inner group dicts


def _is_sharded(param: Tensor) -> bool:
    """A DTensor split across ranks (FSDP2): each rank holds only a slice of the matrix."""
    placements = getattr(param, "placements", None)
    return placements is not None and any(p.is_shard() for p in placements)


def _muon_class() -> type[torch.optim.Optimizer]:
    return getattr(torch.optim, "Muon", NewtonSchulzMuon)


def build_optimizer(
    model: nn.Module, cfg: Any, device_type: str, total_steps: int | None = None
) -> torch.optim.Optimizer:
    """The optimizer named by `cfg.optimizer` over the trainable parameters of `model`.

    `cfg` is a `TrainerConfig` (or anything with its fields). `total_steps` is needed only by `ademamix`
    when `cfg.ademamix_warmup_steps` is None (its α/β3 warmups then span the whole run).
    """
    name = str(cfg.optimizer)
    if name not in OPTIMIZERS:
        raise ArchiFactoryError(f"unknown trainer.optimizer={name!r}; choose one of {', '.join(OPTIMIZERS)}")
    classes = classify_parameters(model)
    if not (classes.decay or classes.no_decay):
        raise ArchiFactoryError("the model has no trainable parameters to optimize")
    betas = (float(cfg.beta1), float(cfg.beta2))
    wd, eps = float(cfg.weight_decay), float(cfg.eps)

    def adamw(groups: list[dict[str, Any]]) -> torch.optim.AdamW:
        return torch.optim.AdamW(groups, lr=float(cfg.lr), betas=betas, eps=eps, fused=device_type == "cuda")

    if name == "adamw":
        return adamw(_decay_groups(classes, wd, include_matrices=True))
    if name == "ademamix":
        warmup = cfg.ademamix_warmup_steps if cfg.ademamix_warmup_steps is not None else total_steps
        if warmup is None:
            raise ArchiFactoryError(
                "trainer.optimizer=ademamix needs the run length for its alpha/beta3 warmup: "
                "set trainer.ademamix_warmup_steps (or pass total_steps to build_optimizer)"
            )
        return AdEMAMix(
            _decay_groups(classes, wd, include_matrices=True),
            lr=float(cfg.lr),
            betas=(*betas, float(cfg.ademamix_beta3)),
            alpha=float(cfg.ademamix_alpha),
            warmup_steps=int(warmup),
            eps=eps,
            weight_decay=wd,
        )
    # muon: hidden matrices to Muon, the head / tables / vectors to AdamW.
    if any(_is_sharded(p) for _, p in classes.matrix):
        raise ArchiFactoryError(
            "trainer.optimizer=muon orthogonalises whole matrices and cannot step FSDP-sharded parameters; "
            "use trainer.strategy=ddp, or another optimizer with fsdp"
        )
    if not classes.matrix:
        return adamw(_decay_groups(classes, wd, include_matrices=True))
    muon = _muon_class()(
        [{"params": classes.matrix, "weight_decay": wd}],
        lr=float(cfg.muon_lr),
        momentum=float(cfg.muon_momentum),
        nesterov=True,
    )
    rest = _decay_groups(classes, wd, include_matrices=False)
    return CombinedOptimizer([muon, adamw(rest)] if rest else [muon])
