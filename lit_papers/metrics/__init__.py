"""Evaluation metrics the papers report that torchmetrics does not provide."""
