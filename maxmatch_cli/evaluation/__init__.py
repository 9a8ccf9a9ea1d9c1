"""Evaluation: encoding a split, similarity blocks, Recall@K protocols, ECCV/CxC, ensembles, collapse analysis.

``evaluate`` (one checkpoint) and ``ensemble`` (several) sit on ``protocols`` (which metrics a similarity matrix
gets), ``encoding`` (sets of a split, blockwise scores), ``cache`` (embeddings encoded once per checkpoint) and
``results`` (what is reported and written); ``metrics`` and ``eccv`` compute the numbers, ``collapse`` analyses
the sets.
"""
