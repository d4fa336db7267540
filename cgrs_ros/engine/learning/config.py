"""``cgrs train`` configuration: one YAML file, validated like the engine config.

``config/train.yaml`` documents every key. Sections: ``model`` (which towers, which parts
train), ``loss`` (multi-positive InfoNCE, soft labels, hard negatives), ``train`` (epochs,
batch, optimizer, seed, device).
"""

from typing import Literal, Optional

from cgrs_ros.engine.config import _first_error, _Section, read_config_data
from pydantic import Field, ValidationError


class ModelSection(_Section):
    """Which dual encoder is trained, and which of its parts move."""

    # lite0_minilm: the offline towers (frozen EfficientNet-Lite0 + frozen MiniLM) with
    #   trained projection heads; open_clip: fine-tune an open_clip model you hold.
    backend: Literal['lite0_minilm', 'open_clip'] = 'lite0_minilm'
    # lite0_minilm: shared space size, hidden width of the heads (0 = linear), input dropout,
    # the image size the image tower sees, and the sentence encoder of the text tower.
    dim: int = Field(256, ge=8, le=4096)
    hidden: int = Field(1024, ge=0, le=16384)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    image_size: int = Field(256, ge=64, le=1024)
    text_model: str = 'all-MiniLM-L6-v2'
    # mean: the sentence embedding; attention: a learned attention pooling over the sentence
    # encoder's word pieces (at most max_tokens), beside their mean (heads.TokenPool).
    text_pooling: Literal['mean', 'attention'] = 'mean'
    max_tokens: int = Field(64, ge=4, le=512)
    # Gaussian noise (std) added to the frozen, normalized text features while training, so
    # the text head does not fit the exact sentences of the training register.
    text_noise: float = Field(0.0, ge=0.0, le=1.0)
    # Platform experts (TeleAI PE-MoE): one head pair per platform seen in training.
    experts: bool = False
    # Precision of the exported heads: float16 halves the file (loaded back as float32).
    weights_dtype: Literal['float32', 'float16'] = 'float32'
    # Training descriptions kept in the model folder for the `learned` captioner (0 = none).
    caption_bank: int = Field(4000, ge=0, le=1_000_000)
    # open_clip: an architecture (ViT-B-32) + pretrained (tag or file), or 'local-dir:DIR'.
    name: str = 'ViT-B-32'
    pretrained: Optional[str] = None
    # LiT: lock_image keeps the image tower frozen except its last unlocked_image_groups
    # layer groups; lock_text likewise with unlocked_text_layers.
    lock_image: bool = True
    unlocked_image_groups: int = Field(0, ge=0, le=100)
    lock_text: bool = False
    unlocked_text_layers: int = Field(0, ge=0, le=100)


class SoftLabels(_Section):
    """SkyLink-style partial credit for near-positive places."""

    enabled: bool = False
    weight: float = Field(0.3, ge=0.0, le=1.0)
    min_jaccard: float = Field(0.6, ge=0.0, le=1.0)
    radius_m: float = Field(0.0, ge=0.0)


class HardNegatives(_Section):
    """TeleAI-style two stages: random batches, then batches of mined confusable places."""

    enabled: bool = False
    start_epoch: int = Field(3, ge=1)        # first epoch (1-based) of stage two
    neighbours: int = Field(8, ge=1, le=256)  # mined wrong places kept per place
    geo_radius_m: float = Field(0.0, ge=0.0)  # also places within this radius (Sample4Geo)
    refresh_every: int = Field(1, ge=1)       # epochs between re-mining


class CrossView(_Section):
    """Sample4Geo-style image-image term: drone/ground images against satellite tiles."""

    enabled: bool = False
    # Share of the cross-view InfoNCE in the loss (added to the text-image loss).
    weight: float = Field(1.0, ge=0.0, le=100.0)


class LossSection(_Section):
    """Group-aware multi-positive symmetric InfoNCE, with optional extras."""

    temperature: float = Field(0.07, gt=0.0, le=1.0)
    learn_temperature: bool = True
    soft_labels: SoftLabels = Field(default_factory=SoftLabels)
    hard_negatives: HardNegatives = Field(default_factory=HardNegatives)
    cross_view: CrossView = Field(default_factory=CrossView)


class TrainSection(_Section):
    """The optimization loop."""

    epochs: int = Field(20, ge=1, le=10000)
    batch_size: int = Field(256, ge=2, le=65536)
    # images of one place per batch (texts are drawn for each), so a batch has positives
    images_per_place: int = Field(2, ge=1, le=64)
    # full: each description as written; clauses: also each of its clauses (data.py)
    text_views: Literal['full', 'clauses'] = 'full'
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(0.01, ge=0.0, le=1.0)
    seed: int = 0
    device: str = 'cpu'
    threads: int = Field(0, ge=0, le=256)     # torch CPU threads; 0 = torch's default
    feature_batch: int = Field(32, ge=1, le=4096)
    # the validation figure the exported epoch is chosen by: text->image R@1, drone->satellite
    # R@1 (a cross-view matcher), or their mean
    select: Literal['text', 'cross_view', 'both'] = 'text'


class TrainConfig(_Section):
    """The whole training configuration."""

    model: ModelSection = Field(default_factory=ModelSection)
    loss: LossSection = Field(default_factory=LossSection)
    train: TrainSection = Field(default_factory=TrainSection)


def load_train_config(path=None, overrides=None):
    """Return the validated :class:`TrainConfig` of a YAML file (None = defaults) + overrides."""
    source = 'train config' if path is None else str(path)
    data = read_config_data(path, overrides, 'train config', 'model, loss, train')
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, source) from None
