"""Training models for the engine: ``cgrs train dual`` (the coarse stage's dual encoder).

- ``data``: described galleries and GeoText-1652 as (text, image, place) pairs; validation sets;
  partial credit between places for soft labels.
- ``towers``: the frozen offline towers (ImageNet EfficientNet-Lite0, MiniLM) and the feature
  cache, shared with the engine's ``learned`` image encoder.
- ``heads``: the trained projection heads (shared or per-platform experts) and the model folder.
- ``losses``: group-aware multi-positive symmetric InfoNCE with soft targets.
- ``backends``: what trains (heads on frozen towers, or an open_clip model with LiT locks).
- ``trainer``: batches of places, hard-negative mining, validation, checkpoints and resume,
  the model card.
- ``config``: the train YAML (``config/train.yaml`` documents every key).
"""
