"""Classic recurrent baselines over the time axis: LSTM and Elman RNN, on torch's fused cuDNN/CPU kernels.

The inner recurrent network runs with `batch_first=True` over [B, T, D], so every sequence in the batch is
its own recurrence (running it with the default time-first layout on batch-first tensors would recur over
the batch axis and mix sequences). States are stored batch-first, [B, layers, size], like every other
mixin's state, and transposed to torch's [layers, B, size] at the call.

Padded batches (`ctx.pad_mask`): an LSTM/RNN moves its state on every input, a zero one included, so a pad
cannot be made an identity step by zeroing inputs. Instead each row's real tokens are gathered to the
front in order (`compact`), run as a packed sequence (torch's own length-aware kernels, cuDNN on CUDA),
which stops every row's recurrence at its last real token, and the outputs are scattered back to their
positions (zeros at the pads). The state thus holds across every pad, wherever the pads are, exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles

NONLINEARITIES = ("tanh", "relu")


def _check_positive(name: str, **sizes: int) -> None:
    for key, value in sizes.items():
        if value < 1:
            raise ArchiFactoryError(f"mixin={name}: {key}={value} must be a positive integer")


def compact(pad_mask: Tensor) -> tuple[Tensor, Tensor]:
    """For pad_mask [B, T] (True = real token): the positions of each row's real tokens in order, then its
    pads ([B, T], a stable sort), and the number of real tokens per row [B]."""
    order = torch.sort((~pad_mask).to(torch.uint8), dim=1, stable=True).indices
    return order, pad_mask.sum(1)


class _TorchRecurrentMixin(Mixin):
    """Shared plumbing: run `self.rnn` batch-first from an explicit state, then `out_proj` to hidden."""

    match_option = "inner_size"  # the expansion parameter matching may re-solve

    rnn: nn.RNNBase
    state_names: tuple[str, ...]

    def _state_sizes(self) -> dict[str, int]:
        raise NotImplementedError

    def init_roles(self) -> InitRoles:
        # torch's RNN init (plus the LSTM's forget-gate bias of 1) is kept
        return InitRoles(residual=(self.out_proj,), keep=(self.rnn,))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        return {
            name: torch.zeros(batch_size, self.rnn.num_layers, size, device=device, dtype=dtype)
            for name, size in self._state_sizes().items()
        }

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        if ctx.pad_mask is not None:
            return self._forward_padded(x, ctx.pad_mask, state)
        if state is None:
            out, _ = self.rnn(x)  # zero initial state
            return self.out_proj(out), None
        out, final = self.rnn(x, self._torch_state(state))  # out [B, T, size]
        return self.out_proj(out), self._mixin_state(final)

    def _torch_state(self, state: MixinState) -> Tensor | tuple[Tensor, ...]:
        """Our batch-first state -> torch's ([layers, B, size], one tensor or the LSTM's (h, c))."""
        torch_state = tuple(state[name].transpose(0, 1).contiguous() for name in self.state_names)
        return torch_state if len(torch_state) > 1 else torch_state[0]

    def _mixin_state(self, final: Tensor | tuple[Tensor, ...]) -> MixinState:
        """torch's final state -> ours, batch-first [B, layers, size]."""
        final = final if isinstance(final, tuple) else (final,)
        return {name: t.transpose(0, 1) for name, t in zip(self.state_names, final)}

    def _forward_padded(
        self, x: Tensor, pad_mask: Tensor, state: MixinState | None
    ) -> tuple[Tensor, MixinState | None]:
        """The recurrence over each row's real tokens only (see the module docstring); a row with no real
        token keeps its state. Reads the row lengths back to the host (pack_padded_sequence needs them)."""
        order, lengths = compact(pad_mask)  # [B, T], [B]
        packed_x = x.gather(1, order[..., None].expand_as(x))  # real tokens first, in order
        cpu_lengths = lengths.clamp(min=1).cpu()  # an all-pad row runs one step, discarded below
        packed = pack_padded_sequence(packed_x, cpu_lengths, batch_first=True, enforce_sorted=False)
        torch_state = None if state is None else self._torch_state(state)
        out, final = self.rnn(packed, torch_state)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])  # zeros past a length
        out = torch.zeros_like(out).scatter(1, order[..., None].expand_as(out), out)  # back to positions
        if state is None:
            return self.out_proj(out), None
        new_state = self._mixin_state(final)
        empty = (lengths == 0)[:, None, None]
        return self.out_proj(out), {name: torch.where(empty, state[name], t) for name, t in new_state.items()}

    def backend_name(self) -> str:
        device = self.out_proj.weight.device
        return "cudnn" if device.type == "cuda" and torch.backends.cudnn.is_available() else "torch"

    def state_size(self, seq_len: int) -> int:
        return self.rnn.num_layers * sum(self._state_sizes().values())


@register_mixin("lstm")
class LSTMMixin(_TorchRecurrentMixin):
    """Long short-term memory (Hochreiter & Schmidhuber, "Long Short-Term Memory", 1997), with the forget
    gate of Gers et al. (2000) as in torch's `nn.LSTM`, run over time per sequence.

    c_t = f ⊙ c_{t-1} + i ⊙ tanh(W_c [x, h]),  h_t = o ⊙ tanh(c_t) (then h_t W_hr with a projection,
    Sak et al. 2014); y = out_proj(h). Decode state: {h [B, layers, proj or inner], c [B, layers, inner]}.
    Init: torch's U(-1/sqrt(inner), 1/sqrt(inner)) for the LSTM weights, forget-gate bias 1
    (Jozefowicz et al. 2015) so that memories persist early in training; `out_proj` per the model scheme.

    Options:
        inner_size: LSTM cell size (None = hidden size); proj_size: project h to this size (0 = off);
        rnn_layers: stacked LSTM layers inside this one mixin (1).
    """

    state_names = ("h", "c")

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        inner_size: int | None = None,
        proj_size: int = 0,
        rnn_layers: int = 1,
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        self.inner_size = inner_size or hidden_size
        _check_positive("lstm", inner_size=self.inner_size, rnn_layers=rnn_layers)
        if not 0 <= proj_size < self.inner_size:
            raise ArchiFactoryError(
                f"mixin=lstm: proj_size={proj_size} must be 0 (off) or below inner_size={self.inner_size}"
            )
        self.proj_size = proj_size
        self.rnn = nn.LSTM(hidden_size, self.inner_size, rnn_layers, batch_first=True, proj_size=proj_size)
        with torch.no_grad():
            for layer in range(rnn_layers):
                getattr(self.rnn, f"bias_ih_l{layer}")[self.inner_size : 2 * self.inner_size].fill_(1.0)
                getattr(self.rnn, f"bias_hh_l{layer}")[self.inner_size : 2 * self.inner_size].zero_()
        self.out_proj = nn.Linear(proj_size or self.inner_size, hidden_size, bias=False)

    def _state_sizes(self) -> dict[str, int]:
        return {"h": self.proj_size or self.inner_size, "c": self.inner_size}

    def flops_per_token(self, seq_len: int) -> float:
        inner, out = self.inner_size, self.proj_size or self.inner_size
        flops = 0.0
        for layer in range(self.rnn.num_layers):
            in_size = self.hidden_size if layer == 0 else out
            flops += 2 * 4 * inner * (in_size + out) + 8 * inner  # four gates; sigmoid/tanh and products
            flops += 2 * inner * self.proj_size
        return flops + 2 * out * self.hidden_size


@register_mixin("rnn")
class ElmanRNNMixin(_TorchRecurrentMixin):
    """Elman recurrent network (Elman, "Finding Structure in Time", 1990), torch's `nn.RNN`, run over time
    per sequence: h_t = act(W_ih x_t + W_hh h_{t-1} + b), y = out_proj(h).
    Decode state: {h [B, layers, inner]}.
    Init: torch's U(-1/sqrt(inner), 1/sqrt(inner)); `out_proj` per the model scheme.

    Options:
        inner_size: recurrent state size (None = hidden size); nonlinearity: `tanh` (Elman) or `relu`;
        rnn_layers: stacked RNN layers inside this one mixin (1).
    """

    state_names = ("h",)

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        inner_size: int | None = None,
        nonlinearity: str = "tanh",
        rnn_layers: int = 1,
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        self.inner_size = inner_size or hidden_size
        _check_positive("rnn", inner_size=self.inner_size, rnn_layers=rnn_layers)
        if nonlinearity not in NONLINEARITIES:
            raise ArchiFactoryError(
                f"mixin=rnn: nonlinearity={nonlinearity!r} is not one of {', '.join(NONLINEARITIES)}"
            )
        self.rnn = nn.RNN(
            hidden_size, self.inner_size, rnn_layers, nonlinearity=nonlinearity, batch_first=True
        )
        self.out_proj = nn.Linear(self.inner_size, hidden_size, bias=False)

    def _state_sizes(self) -> dict[str, int]:
        return {"h": self.inner_size}

    def flops_per_token(self, seq_len: int) -> float:
        inner = self.inner_size
        flops = 0.0
        for layer in range(self.rnn.num_layers):
            in_size = self.hidden_size if layer == 0 else inner
            flops += 2 * inner * (in_size + inner) + 2 * inner  # both matmuls; bias and activation
        return flops + 2 * inner * self.hidden_size
