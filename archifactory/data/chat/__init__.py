"""Chat data for instruction tuning: conversation sources (`sources`), the chat template (`template`) and
the padded conversation batches the training loop reads (`dataset`)."""
