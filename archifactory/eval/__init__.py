"""Evaluation: the lm-eval adapter (adapter.py, scoring.py) and HumanEval through a sandbox (humaneval.py,
sandbox.py, sandbox_launcher.py)."""
