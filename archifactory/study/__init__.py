"""The study: one command runs the seed's protocol — pretrain, post-training stages, evaluations, one
report — over every variant of a sweep (`archifactory study …`, issue 27). See `run.py`."""
