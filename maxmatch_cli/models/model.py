"""The two-tower set embedding model and its builder from the recipe's ``[model]`` section.

``build_model(cfg, vocab_words)`` looks each component up by name in a registry (image encoders, text
encoders, set heads) and hands it flat constructor arguments; modules never see the config object.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from maxmatch_cli.models.common import SetOutput
from maxmatch_cli.models.heads import PooledHead, PVSEHead, SetDivHead
from maxmatch_cli.models.image import CNNEncoder, PrecomputedEncoder
from maxmatch_cli.models.registry import Registry
from maxmatch_cli.models.text import BertEncoder, build_bigru, load_bert_backbone

IMAGE_ENCODERS: Registry = Registry("image encoder", "model.image_encoder")
TEXT_ENCODERS: Registry = Registry("text encoder", "model.text_encoder")
SET_HEADS: Registry = Registry("set head", "model.set_head")


@IMAGE_ENCODERS.register("region", "precomputed BUTD regions (B, R, F): fc + MLP residual, max-pooled global")
def _region_encoder(cfg, pretrained: bool) -> nn.Module:
    return PrecomputedEncoder(cfg.image_feature_dim, cfg.embed_dim, pool=cfg.image_pool or "max", mlp=cfg.image_mlp,
                              dropout=cfg.image_dropout)


@IMAGE_ENCODERS.register("grid", "precomputed CNN grid cells (B, h*w, F): 1x1 projection (+ MLP), mean-pooled global")
def _grid_encoder(cfg, pretrained: bool) -> nn.Module:
    return PrecomputedEncoder(cfg.image_feature_dim, cfg.embed_dim, pool=cfg.image_pool or "mean",
                              mlp=cfg.image_mlp, dropout=cfg.image_dropout)


@IMAGE_ENCODERS.register("cnn", "raw pixels (B, 3, H, W) through ResNet-152 / ResNeXt-101, fine-tuned end to end")
def _cnn_encoder(cfg, pretrained: bool) -> nn.Module:
    from maxmatch_cli.models.backbones import RANDOM_WEIGHTS, build_cnn_trunk

    trunk, channels = build_cnn_trunk(cfg.cnn_backbone, cfg.cnn_weights if pretrained else RANDOM_WEIGHTS)
    return CNNEncoder(trunk, channels, cfg.embed_dim, mlp=cfg.image_mlp, freeze_epochs=cfg.cnn_freeze_epochs,
                      dropout=cfg.image_dropout, pool=cfg.image_pool or "mean")


@TEXT_ENCODERS.register("bigru", "word embeddings (GloVe if model.glove_path) + Bi-GRU, mean final state as global; "
                               "the set head attends to the words (model.text_local)")
def _bigru_encoder(cfg, vocab_words: Sequence[str] | None, pretrained: bool) -> nn.Module:
    return build_bigru(vocab_words, cfg.word_dim, cfg.embed_dim, cfg.gru_layers, cfg.glove_path if pretrained else "",
                       local=cfg.text_local, dropout=cfg.text_dropout, pos_encoding=cfg.text_pos_encoding)


@TEXT_ENCODERS.register("bert", "local BERT-family model (model.bert_path) + Linear to D, max-pooled global")
def _bert_encoder(cfg, vocab_words: Sequence[str] | None, pretrained: bool) -> nn.Module:
    backbone, hidden = load_bert_backbone(cfg.bert_path, weights=pretrained)
    return BertEncoder(backbone, hidden, cfg.embed_dim)


@SET_HEADS.register("setdiv", "SetDiv slot cross-attention (slots compete), sets = LN(E^L) + LN(global)")
def _setdiv_head(cfg, context_dim: int) -> nn.Module:
    return SetDivHead(cfg.embed_dim, cfg.num_embeds, cfg.set_depth, cfg.set_heads, cfg.set_head_dim,
                      cfg.set_ff_dim, cfg.set_dropout, cfg.set_share_weights, context_dim)


@SET_HEADS.register("pvse", "PVSE multi-head self-attention, sets = LN(global + sigmoid(fc(attended)))")
def _pvse_head(cfg, context_dim: int) -> nn.Module:
    return PVSEHead(cfg.embed_dim, cfg.num_embeds, max(cfg.embed_dim // 2, 1), cfg.set_dropout, context_dim)


@SET_HEADS.register("pooled", "one vector per item (K = 1): the encoder's global feature, L2-normalised (VSE++)")
def _pooled_head(cfg, context_dim: int) -> nn.Module:
    return PooledHead()


class SetEmbeddingModel(nn.Module):
    """Image and text towers, each an encoder followed by its own set head.

    Args:
        image_encoder: (feats, mask) -> Features.
        text_encoder: (tokens, mask) -> Features.
        image_head: (local, global, mask) -> SetOutput for images.
        text_head: the same for captions (separate weights).
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, image_head: nn.Module,
                 text_head: nn.Module, image_tower_in_set_group: bool = False):
        super().__init__()
        self.image_tower_in_set_group = image_tower_in_set_group
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.image_head = image_head
        self.text_head = text_head
        self.epoch = 0

    def encode_images(self, feats: Tensor, mask: Tensor | None = None) -> SetOutput:
        """Image sets.

        Args:
            feats: (B, R, F) float local features (regions or grid cells), or (B, 3, H, W) pixels for the
                'cnn' encoder.
            mask: (B, R) bool, True for real regions; None means all real (and must be None for pixels).

        Returns:
            SetOutput with sets and slots (B, K, D) and global_ (B, D).
        """
        f = self.image_encoder(feats, mask)
        return self.image_head(f.local, f.global_, f.mask, f.key_pos)

    def encode_texts(self, tokens: Tensor, mask: Tensor) -> SetOutput:
        """Caption sets from tokens (B, L) long and mask (B, L) bool (True = real token, right-padded)."""
        f = self.text_encoder(tokens, mask)
        return self.text_head(f.local, f.global_, f.mask, f.key_pos)

    def forward(self, feats: Tensor, feat_mask: Tensor | None, tokens: Tensor, token_mask: Tensor
                ) -> tuple[SetOutput, SetOutput]:
        """Both towers at once (what DDP wraps): returns (image SetOutput, text SetOutput)."""
        return self.encode_images(feats, feat_mask), self.encode_texts(tokens, token_mask)

    def set_epoch(self, epoch: int) -> None:
        """Tells every component the 0-based epoch (e.g. the CNN is frozen while epoch < cnn_freeze_epochs)."""
        self.epoch = epoch
        for module in (self.image_encoder, self.text_encoder, self.image_head, self.text_head):
            if hasattr(module, "set_epoch"):
                module.set_epoch(epoch)

    def _lr_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Parameters by learning-rate group: 'set', 'text' (BERT), 'cnn' (CNN trunk), 'base' (the rest).

        With ``image_tower_in_set_group`` the image encoder's own layers (projection, MLP) join the set heads
        (DivE's ``img_pie_lr_scale`` covers the whole image tower except the CNN)."""
        owner: dict[int, str] = {}
        pairs = [("set", self.image_head), ("set", self.text_head)]
        if self.image_tower_in_set_group:
            pairs.insert(0, ("set", self.image_encoder))
        for encoder in (self.image_encoder, self.text_encoder):
            group = getattr(encoder, "backbone_lr_group", None)
            if group is not None:
                pairs.append((group, encoder.backbone))
        for group, module in pairs:
            for p in module.parameters():
                owner[id(p)] = group
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"base": [], "set": [], "text": [], "cnn": []}
        for name, p in self.named_parameters():
            groups[owner.get(id(p), "base")].append((name, p))
        return groups

    def param_groups(self, lr: float, lr_scale_set: float = 1.0, lr_scale_text: float = 1.0,
                     lr_scale_cnn: float = 1.0, weight_decay: float = 0.0) -> list[dict]:
        """AdamW parameter groups covering every parameter exactly once.

        Set heads get lr x lr_scale_set, a BERT backbone lr x lr_scale_text, a CNN trunk lr x lr_scale_cnn,
        everything else (projections, Bi-GRU, word embeddings) lr. Within each, 1-D parameters (biases,
        LayerNorm/BatchNorm weights) get no weight decay. Each group also carries ``name`` and ``lr_scale``
        so a scheduler can rescale it; frozen CNN parameters are included (they get no gradient until
        unfrozen, which AdamW skips).
        """
        scales = {"base": 1.0, "set": lr_scale_set, "text": lr_scale_text, "cnn": lr_scale_cnn}
        out = []
        for group, named in self._lr_groups().items():
            decay = [p for n, p in named if p.ndim > 1]
            no_decay = [p for n, p in named if p.ndim <= 1]
            for suffix, params, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
                if params:
                    out.append({"params": params, "lr": lr * scales[group], "weight_decay": wd,
                                "name": f"{group}/{suffix}", "lr_scale": scales[group]})
        return out

    def summary(self) -> dict[str, object]:
        """Parameter counts per learning-rate group and, for GloVe-initialised Bi-GRUs, the vocabulary coverage."""
        info: dict[str, object] = {g: sum(p.numel() for _, p in named) for g, named in self._lr_groups().items()}
        coverage = getattr(self.text_encoder, "coverage", None)
        if coverage is not None:
            info["glove_coverage"] = coverage
        return info


def build_model(cfg, vocab_words: Sequence[str] | None = None, pretrained: bool = True) -> SetEmbeddingModel:
    """Builds the model a ``ModelConfig`` describes.

    Args:
        cfg: the recipe's ``[model]`` section (:class:`maxmatch_cli.config.recipes.ModelConfig`).
        vocab_words: the Bi-GRU vocabulary in index order (GloVe rows are matched to it); None for BERT.
        pretrained: load pre-trained weights (GloVe, CNN, BERT). False builds the same architecture with
            random weights and reads no weight file (BERT still needs its folder's config.json), for
            restoring a checkpoint, whose state dict then overwrites everything.

    Raises:
        MaxMatchError: for unknown component names or missing local weights/vectors.
    """
    image_encoder = IMAGE_ENCODERS.get(cfg.image_encoder)(cfg, pretrained)
    text_encoder = TEXT_ENCODERS.get(cfg.text_encoder)(cfg, vocab_words, pretrained)
    head = SET_HEADS.get(cfg.set_head)
    text_context = getattr(text_encoder, "local_dim", cfg.embed_dim)
    return SetEmbeddingModel(image_encoder, text_encoder, head(cfg, cfg.embed_dim), head(cfg, text_context),
                             image_tower_in_set_group=cfg.image_tower_lr_as_set)


def component_names() -> dict[str, dict[str, str]]:
    """Every registered component with its description, for `maxmatch` listings."""
    return {"image_encoder": IMAGE_ENCODERS.describe(), "text_encoder": TEXT_ENCODERS.describe(),
            "set_head": SET_HEADS.describe()}


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())
