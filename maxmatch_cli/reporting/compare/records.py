"""What ``maxmatch compare`` reads and builds: the columns and groupings it knows, one run's result
(:class:`RunResult`) and the table across runs (:class:`Comparison`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from maxmatch_cli.evaluation.eccv import CXC_KEYS, ECCV_KEYS

METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
"""The recalls (%) and RSUM every row reports, in the paper's column order."""
EXTRAS = ("log_var_image", "log_var_text")
"""Further per-run figures shown when an input has them (demo_results.json: log circular variance, Table 4)."""
COCO_EXTRAS = {"eccv": ECCV_KEYS, "cxc": CXC_KEYS}
"""The ECCV Caption and CxC metrics of evaluation files (``evaluate`` / ``ensemble --protocol eccv|cxc``): the
columns of the layouts of the same names."""
GROUP_BY = ("config", "recipe", "run")
"""config: runs whose resolved recipes differ only in the seed share a row; recipe: runs of the same recipe name
share a row, whatever their overrides; run: one row per run."""
LAYOUTS = ("recall", "table3", "eccv", "cxc")
"""recall: label, n, the six recalls, RSUM, ΔRSUM, source; table3: the paper's Table 3 (similarity, which
regularisers are on, RSUM); eccv: ECCV Caption mAP@R, R-Precision and R@1 per direction, the COCO 5K RSUM; cxc:
CxC R@1/5/10 per direction, the COCO 5K RSUM."""
NOT_CONFIG = frozenset({"train.seed", "train.device", "train.log_every", "train.report_to", "data.num_workers",
                        "eval.batch_size", "eval.block_size"})
"""Recipe keys that do not define the configuration: the seed (averaged over) and settings of where and how fast a
run goes and where it logs. Runs differing only in these share a row under ``--group-by config``."""
PATH_KEYS = frozenset({"data.path", "data.image_root", "model.glove_path", "model.bert_path", "model.cnn_weights"})
"""Recipe keys naming files: they set a row apart, but name it only where the rows' labels would otherwise be the
same (the same data in two folders is no setting worth a label)."""
SIMILARITY_NAMES = {"maxmatch": "Maximal Pair Assignment", "chamfer": "Smooth-Chamfer", "mil": "MIL",
                    "topk": "top-k", "sinkhorn": "Sinkhorn", "cosine": "Cosine, one vector (K = 1)",
                    "cosine-vsepp": "Cosine, one vector (K = 1, VSE++: mean-pooled)"}
"""Table 3's names of the similarities."""
REGULARISERS = (("Div", "div_weight"), ("MMD", "mmd_weight"), ("GD", "gd_weight"), ("ISD", "isd_weight"))
"""Table 3's regulariser columns and the loss weight that switches each on."""
EVAL_DIR = "eval"
"""The folder of a run's evaluations (``maxmatch evaluate RUN/best.safetensors`` writes
``RUN/eval/<split>-<protocol>.json``), read with the run."""
_HINT_INPUTS = "pass evaluation JSON files (maxmatch evaluate CKPT --json F), run folders or demo_results.json"


@dataclass
class RunResult:
    """The metrics of one run and where they come from."""

    path: Path
    """The input that gave it (a JSON file or a run folder)."""
    file: Path
    """The file the numbers were read from."""
    metrics: dict[str, float]
    kind: str
    """'evaluate' (an evaluation JSON), 'val' (metrics.jsonl) or 'demo' (demo_results.json)."""
    split: str = ""
    protocol: str = ""
    name: str = ""
    """Recipe name (demo_results.json: the configuration's key)."""
    recipe: dict[str, Any] | None = None
    """The resolved recipe as dotted keys (``loss.similarity`` ...), or None when unknown."""
    seed: int | None = None
    eval_similarity: str | None = None
    """Similarity the evaluation scored with (evaluation JSONs)."""
    extras: dict[str, float] = field(default_factory=dict)
    index: int = 0
    """Position within ``file`` (demo_results.json holds several runs, an evaluation JSON several similarities)."""
    of_several: bool = False
    """One of the similarities of an evaluation JSON that holds several (``evaluate --similarity a,b``)."""

    @property
    def rescored(self) -> bool:
        """Evaluated with another similarity than the recipe's own inference (``eval.similarity``, else the training
        similarity), i.e. rescored by ``evaluate --similarity``."""
        if not (self.recipe and self.eval_similarity):
            return False
        own = self.recipe.get("eval.similarity") or self.recipe.get("loss.similarity")
        return self.eval_similarity != own

    @property
    def source(self) -> str:
        """Split and protocol of the numbers: ``test/full``, ``testall/coco5k``, or ``dev/last val`` (metrics.jsonl)."""
        return f"{self.split or '?'}/{'last val' if self.kind == 'val' else self.protocol or '?'}"


@dataclass
class Comparison:
    """One row per group of runs: ``frame`` holds the numbers (means, sample stds, ΔRSUM), one row each."""

    frame: pd.DataFrame
    baseline: str
    """Label of the row ΔRSUM is taken against."""
    group_by: str
    notes: list[str] = field(default_factory=list)
