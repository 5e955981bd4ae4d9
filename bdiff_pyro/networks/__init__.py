"""Networks for the reverse step: per-position features of x^t and the time t -> logits."""
