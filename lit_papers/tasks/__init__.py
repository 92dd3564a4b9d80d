"""LightningModules: one per training objective (classification, masked reconstruction, adversarial)."""
