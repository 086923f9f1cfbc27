"""Evaluation of trained runs: `archifactory eval <name>[,<name>…] [run=…] [eval.<key>=value …]`.

Modules:
- `cli`        — the dispatcher: parses the command, resolves runs, `RUNNERS` (name -> runner; the place to
                 plug a new evaluation in), results files and the table.
- `job`        — `EvalConfig` (the `eval.*` options), `EvalJob` (what a runner gets), `TaskResult`.
- `harness`    — lm-evaluation-harness tasks and groups by name (`mmlu`, `hellaswag`, local YAML tasks).
- `adapter`    — `ArchiFactoryLM`, the lm-eval `TemplateLM` over our model and tokenizer.
- `scoring`    — batched continuation log-likelihoods (logits only where scored).
- `generation` — lm-eval's `generate_until` through `archifactory.generate.sampling`.
- `perplexity` — loss, perplexity and bits per byte on a validation split.
- `probe`      — accuracy on answer positions for the synthetic probes (MQAR, MAD): `probe_metrics`.
- `results`    — `<run>/eval/<name>.json`, the `eval` section of `summary.json`, the terminal table.
- `humaneval`, `sandbox`, `sandbox_launcher` — HumanEval completions executed in a bubblewrap sandbox.
"""
