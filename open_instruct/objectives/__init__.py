"""Log-probs (chunked, full, Liger) and the preference-loss registry."""
