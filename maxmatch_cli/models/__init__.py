"""Encoders, set heads and the two-tower model.

Entry points: :func:`build_model` (recipe ``[model]`` section -> :class:`SetEmbeddingModel`), whose
``encode_images`` / ``encode_texts`` return a :class:`SetOutput`; the registries list the components a recipe
can name; :func:`resolve_bert_path` and :func:`resolve_local_path` turn ``pkg:<distribution>`` specs or paths
into local folders (nothing is ever downloaded).
"""

from maxmatch_cli.models.common import Features, SetOutput, masked_max, masked_mean, random_drop_mask
from maxmatch_cli.models.heads import PooledHead, PVSEHead, SetDivHead, slot_competition_attention
from maxmatch_cli.models.model import (IMAGE_ENCODERS, SET_HEADS, TEXT_ENCODERS, SetEmbeddingModel, build_model,
                                       component_names, count_parameters)
from maxmatch_cli.models.paths import resolve_bert_path, resolve_local_path

__all__ = [
    "Features",
    "IMAGE_ENCODERS",
    "PVSEHead",
    "PooledHead",
    "SET_HEADS",
    "SetDivHead",
    "SetEmbeddingModel",
    "SetOutput",
    "TEXT_ENCODERS",
    "build_model",
    "component_names",
    "count_parameters",
    "masked_max",
    "masked_mean",
    "random_drop_mask",
    "resolve_bert_path",
    "resolve_local_path",
    "slot_competition_attention",
]
