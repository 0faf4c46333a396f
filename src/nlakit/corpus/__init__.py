"""Documents: the readers of files/folders/datasets and the built-in corpus."""
