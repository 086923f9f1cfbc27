"""The stacked decoder-only LM and its swappable parts."""
