"""`archifactory eval mqar`: zero-shot multi-query associative recall of a text-pretrained model.

A text model was never trained on MQAR, so it is scored the way one probes an LM for in-context recall
(Zoology's argument: the recall gap explains most of the perplexity gap between attention and efficient
mixers): MQAR examples (`data.synthetic.mqar.mqar_example`, Zoology's generator) are written in the
run's own vocabulary — keys and values are ordinary token ids of its tokenizer (special tokens never
appear) — and the model must, with no training on the task, predict at each query key the value that
followed that key in the context: `k1 v1 k2 v2 … k1 -> v1`, the induction pattern text teaches.

Reported per run (`eval/mqar.json`, summary `eval.mqar`):
- `acc_among_values` (the headline, the value a study reports): at each query position, is the bound
  value the one the model scores highest among the example's P context values (chance 1/P)? A small
  model pretrained for minutes recalls little, and this keeps its score graded above the floor;
- `acc`: the argmax over the whole vocabulary is the bound value — MQAR's own accuracy, as `accuracy`
  scores a probe run (chance about 1/vocabulary; 0 for every variant until a model really recalls).

Shape and size: `eval.mqar_seq_len` (default 64), `eval.mqar_pairs` (4), `eval.mqar_examples` (500);
the examples are drawn from `eval.seed`, so every run of a study sees the same ones.
"""

from __future__ import annotations

import numpy as np
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.data.synthetic.mqar import IGNORE, check_mqar, mqar_example
from archifactory.eval.job import EvalJob, TaskResult


def ordinary_ids(vocab_size: int, special: set[int]) -> np.ndarray:
    """The token ids of a tokenizer that are not special tokens, ascending."""
    return np.array([i for i in range(vocab_size) if i not in special], dtype=np.int64)


def recall_examples(
    ids: np.ndarray, seq_len: int, pairs: int, count: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` MQAR examples (inputs, targets) [count, seq_len] over the token ids `ids`: Zoology's generator
    on the vocabulary `0..len(ids)-1`, each id then mapped to `ids[id]` (targets keep -100)."""
    check_mqar(len(ids), seq_len, pairs, 0.01)
    rows = [mqar_example(np.random.default_rng([seed, j]), len(ids), seq_len, pairs) for j in range(count)]
    inputs = ids[np.stack([r[0] for r in rows])]
    raw = np.stack([r[1] for r in rows])
    targets = np.where(raw == IGNORE, IGNORE, ids[np.maximum(raw, 0)])
    return torch.from_numpy(inputs), torch.from_numpy(targets)


@torch.no_grad()
def recall_scores(
    model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, job: EvalJob
) -> tuple[float, float]:
    """(accuracy over the whole vocabulary, accuracy among each example's context values) at the
    query positions (targets != -100), in batches of `eval.batch_size`."""
    pairs = int((targets[0] != IGNORE).sum())
    correct = among = answers = 0
    for start in range(0, len(inputs), job.options.batch_size):
        x = inputs[start : start + job.options.batch_size].to(job.device)
        y = targets[start : start + job.options.batch_size].to(job.device)
        with job.autocast():
            logits = model(x).logits.float()
        mask = y != IGNORE
        correct += int(((logits.argmax(-1) == y) & mask).sum())
        values = x[:, 1 : 2 * pairs : 2]  # the context's values, [B, P]
        scores = logits.gather(-1, values[:, None, :].expand(-1, x.shape[1], -1))  # [B, T, P]
        chosen = values.gather(1, scores.argmax(-1))  # the best-scored context value at every position
        among += int(((chosen == y) & mask).sum())
        answers += int(mask.sum())
    return correct / answers, among / answers


def check_options(seq_len: int, pairs: int, examples: int, run_name: str, max_len: int) -> None:
    """Refuse `eval.mqar_*` values that cannot make an example, in one line naming the option."""
    if seq_len > max_len or seq_len % 2:
        raise ArchiFactoryError(
            f"eval.mqar_seq_len={seq_len} must be even and at most run {run_name}'s context ({max_len})"
        )
    if not 1 <= pairs <= seq_len // 4:
        raise ArchiFactoryError(
            f"eval.mqar_pairs={pairs} must be in [1, eval.mqar_seq_len / 4 = {seq_len // 4}] (context plus one "
            "query slot per key)"
        )
    if examples < 1:
        raise ArchiFactoryError(f"eval.mqar_examples={examples} must be positive")


def run_mqar(job: EvalJob) -> list[TaskResult]:
    """The eval runner (`archifactory.cli.eval.RUNNERS["mqar"]`) for text-trained runs."""
    run, options = job.run, job.options
    if run.tokenizer is None:
        raise ArchiFactoryError(
            f"run {run.name} is a synthetic probe: score it with `accuracy` (mqar is zero-shot recall of text models)"
        )
    check_options(options.mqar_seq_len, options.mqar_pairs, options.mqar_examples, run.name,
                  int(run.config.model.get("max_seq_len") or run.config.trainer.seq_len))  # fmt: skip
    special = set(run.tokenizer.backend.get_added_tokens_decoder())
    ids = ordinary_ids(run.tokenizer.vocab_size, special)
    inputs, targets = recall_examples(
        ids, options.mqar_seq_len, options.mqar_pairs, options.mqar_examples, options.seed
    )
    run.model.eval()
    acc, among = recall_scores(run.model, inputs, targets, job)
    setting = {"seq_len": options.mqar_seq_len, "pairs": options.mqar_pairs, "examples": len(inputs)}
    details = {"acc": acc, "acc_among_values": among, "zero_shot": True, "seed": options.seed, **setting}
    extra = {"acc": acc, **setting}
    return [TaskResult("mqar", "acc_among_values", among, None, details, extra)]
