"""Reinforcement learning with verifiable rewards: `archifactory grpo` (GRPO, Dr. GRPO, DAPO) after SFT.

objective.py (advantages, clipped ratio, KL, loss types), rollout.py (sampling with the exact decode state,
log-probs), rewards.py (the `reward=` registry), run.py (what comes from the init run), loop.py (the loop).
"""
