"""What a run reports: console and metrics.jsonl tracking, wandb, curve plots, Hub push."""
