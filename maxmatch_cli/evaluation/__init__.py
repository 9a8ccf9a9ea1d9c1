"""Evaluation: encoding a split, similarity blocks, Recall@K protocols, ECCV/CxC, ensembles, collapse analysis."""
