"""Training: the one loop (`train.loop.fit`) and its tasks (tokenizer, student, distillation)."""
