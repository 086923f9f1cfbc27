#!/bin/bash
# the matched residual sweep (docs/model.md): 4 variants x 2 seeds, tiny shapes, Shakespeare
set -x
export PYTHONPATH=/work/wt-resid
A="/work/main/.venv/bin/python -m archifactory train -m experiment=shakespeare_tiny dataset.path=/work/shared/data/shakespeare dataset.vocab_size=2048 model.target_params=443k model.num_layers=4 ffn.multiple_of=8 trainer.seq_len=64 trainer.micro_batch_size=16 trainer.max_steps=80 trainer.warmup_steps=10 trainer.eval_every=20 trainer.eval_tokens=8192 trainer.log_every=10 trainer.checkpoint_every=80 trainer.keep_checkpoints=1 trainer.num_threads=1"
nice -n 10 $A residual=standard,hyper,mhc seed=0,1 hydra.sweep.dir=/tmp/resid-sweep/residual
nice -n 10 $A model.value_residual=true seed=0,1 hydra.sweep.dir=/tmp/resid-sweep/value_residual
echo DONE
