"""Plain torch.nn architectures, one file per paper. Nothing here imports Lightning."""
