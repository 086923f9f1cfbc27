"""TTT-Linear: a layer whose hidden state is a linear model trained by mini-batch gradient descent on the
sequence itself. The inner loop is `reference/ttt.py` (on CUDA, fla's `chunk_ttt_linear` for training
calls); `reference/mini_batch.py` keeps every token in its stream's mini-batch slot across padded rows,
prefills and decode steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, projection_flops
from archifactory.model.mixins.kit import check_divisible, fla_backend, fla_op
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.mini_batch import MiniBatchLayout
from archifactory.model.mixins.reference.ttt import TTTState, ttt_linear
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters

FUSED_KERNEL = ("ttt", "chunk_ttt_linear")
STATE_KEYS = ("weight", "bias", "grad_weight", "grad_bias")


@register_mixin("ttt")
class TTTLinear(Mixin):
    """TTT-Linear (Sun et al., "Learning to (Learn at Test Time): RNNs with Expressive Hidden States",
    2024), in the form of fla's `chunk_ttt_linear`.

    Per head (d = hidden / num_heads) the state is a linear model (W, b) with the inner model
    f(x) = x + LN(x W + b) and the loss ½‖LN(k W + b) − (v − k)‖² on each token's key/value (the inner
    LayerNorm's gain and shift are learned per head). Tokens form mini-batches of `chunk_size`: every
    gradient of a mini-batch is taken at the weights it entered with, query t reads the weights after one
    step of rate η_t over the mini-batch's gradients up to t, and the step of its last token carries on.
    `chunk_size` is the paper's mini-batch size b — part of the math, not a speed knob (16 as the paper).
    The rate is η_t = base_lr · token_lr[j] · sigmoid(lr_proj x_t) / d with j the token's slot in its
    mini-batch (the paper's learnable 1/(j+1) token scale, clamped at 0) — fla's per-query rate, where the
    paper's code weights each gradient by its own token's sigmoid. The output is z + LN(z) at
    z = q_t W_t + b_t (fla's; the paper adds q_t). W₀ ~ N(0, 0.02²) and b₀ = 0 are learned (the outer
    loop), as the inner LN (ones, zeros). Then the paper's layer: LayerNorm over the heads, times
    GELU(g_proj x) with `use_gate`, out_proj. The positional scheme is ignored.

    Decode state: the weights entering the current mini-batch and the gradient sums of its tokens so far
    (W, G [B, H, d, d]; b, g [B, H, 1, d], stored as offsets from W₀, b₀) and its phase (tokens of it seen,
    [B]), so any cut of a stream (prefill, decode steps, left pads) gives exactly the full forward. Pads
    of a padded batch are empty slots: no gradient, no step, no phase advance.

    Options:
        num_heads; base_lr (1.0, the paper's TTT-Linear); use_gate (true); norm_eps (1e-6: the inner and
        the output LayerNorm); chunk_size: the mini-batch size; backend: `auto` (fla's
        `chunk_ttt_linear` on CUDA for calls without a state or padding), `reference` or `fused`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        base_lr: float = 1.0,
        use_gate: bool = True,
        norm_eps: float = 1e-6,
        chunk_size: int = 16,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=ttt"
        self.head_dim = check_divisible(hidden_size, num_heads, name)
        if chunk_size < 1 or base_lr <= 0:
            raise ArchiFactoryError(
                f"{name}: need chunk_size >= 1 and base_lr > 0, got {chunk_size}, {base_lr}"
            )
        self.backend = check_backend(backend, name)
        self.num_heads, self.chunk_size, self.base_lr, self.norm_eps = (
            num_heads,
            chunk_size,
            base_lr,
            norm_eps,
        )
        heads, d = num_heads, self.head_dim
        self.qkv_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.lr_proj = nn.Linear(hidden_size, num_heads, bias=True)
        self.weight_init = nn.Parameter(torch.randn(heads, d, d).mul_(0.02))  # W₀ of every stream
        self.bias_init = nn.Parameter(torch.zeros(heads, d))
        self.ln_weight = nn.Parameter(torch.ones(heads, d))  # the inner model's LayerNorm
        self.ln_bias = nn.Parameter(torch.zeros(heads, d))
        self.token_lr = nn.Parameter(1 / torch.arange(1, chunk_size + 1, dtype=torch.float32))
        self.norm_weight = nn.Parameter(torch.ones(hidden_size))  # the output LayerNorm
        self.norm_bias = nn.Parameter(torch.zeros(hidden_size))
        self.g_proj = nn.Linear(hidden_size, hidden_size, bias=False) if use_gate else None
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        # W₀ (0.02), the LayerNorms and the token scale are drawn here; the projections take the scheme's
        return InitRoles(residual=(self.out_proj,), keep=own_parameters(self))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        dtype = compute_dtype(dtype)
        heads, d = self.num_heads, self.head_dim
        matrix = torch.zeros(batch_size, heads, d, d, device=device, dtype=dtype)
        vector = torch.zeros(batch_size, heads, 1, d, device=device, dtype=dtype)
        phase = torch.zeros(batch_size, device=device, dtype=dtype)
        return {
            "weight": matrix,
            "bias": vector,
            "grad_weight": matrix.clone(),
            "grad_bias": vector.clone(),
            "phase": phase,
        }

    def rates(self, x: Tensor) -> Tensor:
        """base_lr · sigmoid(lr_proj x) / d: [B, T, H], before the slot's token scale."""
        return self.base_lr * torch.sigmoid(self.lr_proj(x).to(compute_dtype(x.dtype))) / self.head_dim

    def slot_scale(self, length: int) -> Tensor:
        """token_lr (clamped at 0) of each grid column's mini-batch slot: [L, 1]."""
        return self.token_lr.clamp(min=0).repeat(-(-length // self.chunk_size))[:length, None]

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        q, k, v = self.qkv_proj(x).reshape(batch, seq_len, 3, self.num_heads, self.head_dim).unbind(2)
        rate = self.rates(x)  # [B, T, H]
        if state is None and ctx.pad_mask is None and self.backend_name() == "fused":
            out, new_state = self._fused(q, k, v, rate * self.slot_scale(seq_len)), None
        else:
            out, new_state = self._reference(q, k, v, rate, ctx.pad_mask, state)
        out = F.layer_norm(
            out.flatten(-2), (self.hidden_size,), self.norm_weight, self.norm_bias, self.norm_eps
        )
        if self.g_proj is not None:
            out = out * F.gelu(self.g_proj(x).to(out.dtype), approximate="tanh")
        return self.out_proj(out.to(x.dtype)), new_state

    def _reference(
        self, q: Tensor, k: Tensor, v: Tensor, rate: Tensor, mask: Tensor | None, state: MixinState | None
    ) -> tuple[Tensor, MixinState | None]:
        """The reference on the mini-batch grid (the identity layout for a plain training call)."""
        batch, seq_len = q.shape[:2]
        dtype = compute_dtype(q.dtype)
        if state is None:
            zeros = self.init_state(batch, q.device, dtype)
            past = TTTState(*(zeros[key] for key in STATE_KEYS))
            phase = zeros["phase"]
        else:
            past = TTTState(*(state[key] for key in STATE_KEYS))
            phase = state["phase"]
        weight_init, bias_init = self.weight_init.to(dtype), self.bias_init.to(dtype)[:, None]
        past = past._replace(weight=past.weight + weight_init, bias=past.bias + bias_init)
        layout = None
        if state is not None or mask is not None:
            layout = MiniBatchLayout.build(mask, phase.long(), seq_len, self.chunk_size)
            q, k, v, rate = (layout.to_grid(t) for t in (q, k, v, rate))
        rate = rate * self.slot_scale(rate.shape[1]).to(dtype)
        out, final = ttt_linear(
            q, k, v, rate, self.ln_weight, self.ln_bias, past,
            None if layout is None else layout.real, self.chunk_size, self.norm_eps,
        )  # fmt: skip
        if layout is not None:
            out = layout.from_grid(out)
        if state is None:
            return out, None
        seen = seq_len if mask is None else mask.sum(1)
        new = {"weight": final.weight - weight_init, "bias": final.bias - bias_init}
        new |= {"grad_weight": final.grad_weight, "grad_bias": final.grad_bias}
        new["phase"] = (phase + seen) % self.chunk_size
        return out, {key: t.to(state[key].dtype) for key, t in new.items()}

    def _fused(self, q: Tensor, k: Tensor, v: Tensor, eta: Tensor) -> Tensor:
        """fla's `chunk_ttt_linear` from the learned W₀, b₀ (a training call: no state, no padding)."""
        kernel = fla_op(*FUSED_KERNEL)
        batch = q.shape[0]
        weight = self.weight_init.float().expand(batch, -1, -1, -1)
        bias = self.bias_init.float()[:, None].expand(batch, -1, -1, -1)
        out, _, _ = kernel(
            q, k, v.to(q.dtype), self.ln_weight.float(), self.ln_bias.float(), eta[..., None].to(q.dtype),
            eps=self.norm_eps, chunk_size=self.chunk_size, initial_state=weight, initial_state_bias=bias,
        )  # fmt: skip
        return out

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.qkv_proj.weight, FUSED_KERNEL, "mixin=ttt")

    def flops_per_token(self, seq_len: int) -> float:
        # per head and token (d = head size, b = mini-batch): the key's and query's products with W
        # (4d²), the step's k ᵀ∇ (2d²), the in-mini-batch scores and their product with ∇ (4bd), the
        # inner LayerNorm and its backward and the output LayerNorm (~20d)
        d, b = self.head_dim, self.chunk_size
        inner = self.num_heads * (6 * d * d + 4 * b * d + 20 * d)
        return projection_flops(self) + inner + 10 * self.hidden_size

    def state_size(self, seq_len: int) -> int:
        return 2 * self.num_heads * self.head_dim * (self.head_dim + 1) + 1
