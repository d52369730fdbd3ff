"""Training: the one loop (`train.loop.fit`) with its tasks (tokenizer, student, distillation)."""
