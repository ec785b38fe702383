"""Building blocks of decoder models: linear, norms, rotary embedding, attention, activations."""
