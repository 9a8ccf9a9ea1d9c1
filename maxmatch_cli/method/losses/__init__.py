"""Training objectives of MaxMatch (paper eq. 5-8) as pure functions of tensors, one module per loss.

Laid out as pytorch-metric-learning lays out its ``losses/``: a ranking loss composes a set similarity's scores
(:mod:`maxmatch_cli.method.similarity`), a miner that says which candidates each query sees as positive and
negatives (:mod:`maxmatch_cli.method.miners`, which also documents the ``sims`` / ``positives`` / ``direction``
/ ``pos_index`` conventions) and a reducer that turns the per-query terms into one number
(:mod:`maxmatch_cli.method.reducers`). The set regularisers read the sets alone.

============================  ========================================================================
``triplet.py``                :func:`triplet_loss`, hinge with hardest (or all) negatives (eq. 6)
``contrastive.py``            :func:`contrastive_loss`, InfoNCE over the set similarity (CON of eq. 5)
``global_discriminative.py``  :func:`global_discriminative_loss`, elements vs their global (eq. 7)
``intra_set_divergence.py``   :func:`intra_set_divergence_loss`, elements of one set apart (eq. 8)
``mmd.py``                    :func:`mmd_loss`, :func:`set_mmd`, image vs text elements (SetDiv)
``diversity.py``              :func:`diversity_loss`, PVSE/SetDiv slot diversity
``base.py``                   the set regularisers' shape check and pair mask
``total.py``                  eq. 5: :class:`LossWeights`, :class:`LossInputs`, :data:`LOSS_COMPONENTS`,
                              :func:`total_loss`
============================  ========================================================================

Adding a loss component is one file plus one table entry, and the weight that entry names:

1. ``losses/<name>.py`` with the loss as a pure function of tensors (shapes in its docstring);
2. in ``total.py``, its entry in :data:`LOSS_COMPONENTS`, ``"<key>": LossComponent("<key>_weight", _<key>,
   "<help>")``, with ``_<key>(x: LossInputs, w: LossWeights) -> Tensor``, the adapter that calls the loss,
   written just above the table;
3. the field ``<key>_weight`` (default 0.0, so no existing recipe changes), and any margin the loss takes, in
   :class:`LossWeights`.

Recipes set it through ``[loss]`` once ``config.recipes.LossConfig`` has a field of the same name;
``tests/method/test_losses_total.py`` lists the components and fails until the new key is added there.
"""

from maxmatch_cli.method.losses.contrastive import contrastive_loss
from maxmatch_cli.method.losses.diversity import diversity_loss
from maxmatch_cli.method.losses.global_discriminative import global_discriminative_loss
from maxmatch_cli.method.losses.intra_set_divergence import intra_set_divergence_loss
from maxmatch_cli.method.losses.mmd import mmd_loss, set_mmd
from maxmatch_cli.method.losses.total import LOSS_COMPONENTS, LossComponent, LossInputs, LossWeights, total_loss
from maxmatch_cli.method.losses.triplet import triplet_loss
from maxmatch_cli.method.miners import same_image_mask

__all__ = [
    "LOSS_COMPONENTS",
    "LossComponent",
    "LossInputs",
    "LossWeights",
    "contrastive_loss",
    "diversity_loss",
    "global_discriminative_loss",
    "intra_set_divergence_loss",
    "mmd_loss",
    "same_image_mask",
    "set_mmd",
    "total_loss",
    "triplet_loss",
]
