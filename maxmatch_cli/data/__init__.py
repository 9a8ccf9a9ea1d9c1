"""Training data: tokenizers and vocabulary, image sources, datasets, samplers and batches."""
