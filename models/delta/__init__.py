"""Delta tuning: small trainable modules applied to a frozen base model from outside."""
