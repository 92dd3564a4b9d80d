"""Callbacks that only use the task/net interfaces: run summaries, image logging, probes."""

from lit_papers.callbacks.summary import RunSummary

__all__ = ["RunSummary"]
