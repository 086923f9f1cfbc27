"""`archifactory list --params [overrides…]`: the shape, parameters and FLOPs/token of every mixin × FFN.

Nothing is trained or allocated: each variant is composed from the real configs with the given
overrides, matched to `model.target_params` when it is set (`model/match.py`), and built on PyTorch's
meta device. `mixin=a,b` / `ffn=a,b` restrict the rows; other overrides apply to every row. The LM
head and embedding use `model.vocab_size` or, when it is unset, the dataset's `vocab_size` (the BPE
size; a Hub tokenizer's real vocabulary is only known once it is loaded).
"""

from __future__ import annotations

import torch

from archifactory.config.compose import composer
from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import components
from archifactory.model.build import build_model
from archifactory.model.match import apply_match


def _split(args: list[str]) -> tuple[list[str] | None, list[str] | None, list[str]]:
    mixins = ffns = None
    rest = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key == "mixin":
            mixins = value.split(",")
        elif key == "ffn":
            ffns = value.split(",")
        else:
            rest.append(arg)
    return mixins, ffns, rest


def params_rows(args: list[str]) -> list[dict[str, object]]:
    """One dict per mixin × FFN: the resolved shape and its accounting, or the reason it has none."""
    mixins, ffns, rest = _split(args)
    mixins = mixins or sorted(components("mixin"))
    ffns = ffns or sorted(components("ffn"))
    rows = []
    with composer() as compose:
        for mixin in mixins:
            for ffn in ffns:
                row: dict[str, object] = {"mixin": mixin, "ffn": ffn}
                try:
                    cfg = compose([f"mixin={mixin}", f"ffn={ffn}", *rest])
                    cfg, match = apply_match(cfg)
                    vocab = cfg.model.vocab_size or cfg.dataset.vocab_size
                    with torch.device("meta"):
                        model = build_model(cfg, vocab)
                except ArchiFactoryError as error:
                    row["error"] = str(error)
                    rows.append(row)
                    continue
                breakdown = model.parameter_breakdown()
                row |= {
                    "hidden": cfg.model.hidden_size,
                    "layers": cfg.model.num_layers,
                    "ffn_hidden": match.ffn_hidden_size
                    if match
                    else getattr(model.blocks[0].ffn, "intermediate_size", None),
                    "set": " ".join(f"{k}={v}" for k, v in match.shape.mixin_options.items())
                    if match
                    else "",
                    "params": breakdown["total"],
                    "non_embedding": breakdown["non_embedding"],
                    "active": breakdown["active"],
                    "vs_target": None if match is None else match.error,
                    "flops_per_token": model.flops_per_token(cfg.trainer.seq_len),
                }
                rows.append(row)
    return rows


def list_params(args: list[str]) -> int:
    rows = params_rows(args)
    header = ("mixin", "ffn", "hidden", "layers", "ffn hidden", "mixin options", "params", "non-emb", "active",
              "vs target", "FLOPs/token")  # fmt: skip
    lines = [header]
    for row in rows:
        if "error" in row:
            lines.append((row["mixin"], row["ffn"], *["—"] * (len(header) - 2)))
            continue
        error = row["vs_target"]
        lines.append(
            (
                row["mixin"], row["ffn"], str(row["hidden"]), str(row["layers"]), str(row["ffn_hidden"] or "—"),
                row["set"] or "",
                f"{row['params']:,}", f"{row['non_embedding']:,}", f"{row['active']:,}",
                "" if error is None else f"{error:+.2%}", f"{row['flops_per_token'] / 1e6:,.2f}M",
            )
        )  # fmt: skip
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print(
            "  ".join(
                str(c).ljust(w) if j < 6 else str(c).rjust(w) for j, (c, w) in enumerate(zip(line, widths))
            )
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    failed = [row for row in rows if "error" in row]
    for row in failed:
        print(f"{row['mixin']}/{row['ffn']}: {row['error']}")
    hint = no_shape_hint(failed, args)
    if hint:
        print(hint)
    return 1 if failed and len(failed) == len(rows) else 0


def no_shape_hint(failed: list[dict[str, object]], args: list[str]) -> str | None:
    """What fixes the pairs with no shape in one line: the FFN-width step that closes the width grid's gap
    (`model.match_multiple_of`, 16 by default, halved down to a quarter by the solver) may still be worth
    more parameters than the tolerance allows, so a finer step is the usual fix; a wider
    `model.match_tolerance` or the other `model.match` the rest."""
    unmatched = [row for row in failed if "no shape of" in str(row["error"])]
    if not unmatched:
        return None
    fixes = []
    if not any(arg.startswith("model.match_multiple_of=") for arg in args):
        fixes.append("a finer model.match_multiple_of=4 (the FFN hidden-size step that closes the gap)")
    fixes += ["a wider model.match_tolerance=0.05", "the other model.match (width|layers)"]
    return f"hint: {len(unmatched)} pair(s) have no shape within the tolerance; try " + ", or ".join(fixes)
