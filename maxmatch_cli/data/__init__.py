"""Training data: tokenizers and vocabulary, image sources, datasets, samplers and batches.

``tokenizers`` (captions to token ids), ``images`` (the image side: stored features or decoded files), ``batches``
(collation and padding), ``datasets`` (training items and evaluation order), ``samplers`` (the epoch shuffle).
"""
