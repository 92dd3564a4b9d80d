"""lit_papers: the papers that shaped deep learning as PyTorch Lightning experiments."""

__version__ = "0.1.0"
