"""Loading the model and tokenizer: attention choice, Liger patches, LoRA, MoE, packed attention."""
