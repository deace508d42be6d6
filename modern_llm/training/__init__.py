"""The three stages: ``train_lm.run_training``, ``train_sft.run_sft``, ``train_dpo.run_dpo``."""
