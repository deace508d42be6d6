"""The training stages by name: ``train_sft`` (supervised fine-tuning) and ``train_dpo`` (preference tuning)."""
