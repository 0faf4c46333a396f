"""Measurement: eval (baselines with document-level CIs), splice, audit, SAE ladder."""
