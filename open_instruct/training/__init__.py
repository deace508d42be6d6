"""The training stages by name (``train_sft``, ``train_dpo``) and the machinery they run: the loop, the reference
cache, evaluation, checkpoints and resume, the non-finite guard, perf."""
