"""The machinery the stages run: the loop, each stage's step (``sft``, ``preference``), the reference cache,
evaluation, checkpoints and resume, the non-finite guard, perf."""
