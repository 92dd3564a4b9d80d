"""LightningDataModules, one per dataset family, and the papers' named transform pipelines."""
