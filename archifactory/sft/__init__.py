"""Supervised fine-tuning (`archifactory sft`): the pretrained run's architecture and weights, chat data,
the training loop of `archifactory.train`."""
