"""Dataset settings of each stage: pretraining text, instruction (chat) data, preference pairs."""
