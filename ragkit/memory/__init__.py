"""Memory models (Infini-attention, HMT) and their training: streaming readers whose state does not grow with
the length read."""
