"""What ``cgrs train dual`` trains: the offline towers with heads, or an open_clip model.

Both backends give the train loop the same small surface: ``module`` (the torch module whose
trainable parameters the optimizer moves), ``images(index, train)`` and ``texts(index,
train)`` returning normalized embeddings (texts: one row set per expert), ``expert_ids`` of
images, ``logit_scale``, and ``export(out_dir)`` writing a folder the engine loads.

- :class:`HeadsBackend` (``model.backend: lite0_minilm``): frozen EfficientNet-Lite0 and
  MiniLM features are computed once (and cached by file content / text hash), so an epoch only
  runs the small heads: minutes on a laptop CPU.
- :class:`OpenClipBackend` (``model.backend: open_clip``): any open_clip model the user holds,
  fine-tuned end to end with LiT-style locks (open_clip's own ``lock_image_tower`` /
  ``lock_text_tower``); exported as an open_clip ``local-dir`` folder.
"""

import json
import os
from pathlib import Path

from cgrs_ros.engine.errors import ConfigError, ModelLoadError
from cgrs_ros.engine.learning.heads import DualHeads, save_model_folder
from cgrs_ros.engine.learning.towers import FeatureCache, Lite0Tower
from cgrs_ros.engine.storage import (atomic_replace, atomic_write_json, EmbeddingStore,
                                     sha256_text)
from cgrs_ros.engine.torch_compat import ensure_torchvision
import numpy as np
from PIL import Image
import torch
from tqdm import tqdm


def text_features(texts, text_model, cache_root, device='cpu'):
    """Frozen sentence-encoder features (normalized) of texts, cached by text hash.

    The cache is the text embedding store the engine keeps for captions, filled by the same
    function (indexer.embed_caption_texts), here under ``cache_root``.
    """
    from cgrs_ros.engine.config import TextEncoderConfig
    from cgrs_ros.engine.encoders import text_encoder_identity
    from cgrs_ros.engine.indexer import embed_caption_texts

    cfg = TextEncoderConfig(model=text_model, device=device)
    embed_caption_texts(cache_root, cfg, texts)
    identity = text_encoder_identity(cfg)
    keys = [sha256_text(t) for t in texts]
    found_keys, found = EmbeddingStore.for_encoder(cache_root, 'text', identity).lookup(
        set(keys))
    row_of = {key: row for row, key in enumerate(found_keys)}
    return np.ascontiguousarray(found[[row_of[k] for k in keys]], dtype=np.float32), identity


class HeadsBackend:
    """Frozen offline towers, trained projection heads (see the module docstring)."""

    def __init__(self, cfg, platforms, cache_root, progress=None):
        model = cfg.model
        self.cfg = cfg
        self.cache_root = Path(cache_root)
        self.tower = Lite0Tower(model.image_size, cfg.train.device)
        self._feature_cache = FeatureCache(self.cache_root / 'image', self.tower)
        self._say = progress or (lambda *a: None)
        present = [p for p in ('satellite', 'drone', 'ground') if p in set(platforms)]
        self._experts, self._expert_of = None, None
        if model.experts:
            if len(present) < 2:
                raise ConfigError(
                    f'model.experts needs images of at least two platforms, the training data '
                    f'has only {", ".join(present)}; set model.experts: false')
            self._experts = present
            # A platform without training images goes to the expert of the nearest viewpoint
            # that has them: ground <-> drone (oblique, close), then satellite.
            nearest = {'satellite': ('drone', 'ground'), 'drone': ('ground', 'satellite'),
                       'ground': ('drone', 'satellite')}
            self._expert_of = {
                p: p if p in present else next(q for q in nearest[p] if q in present)
                for p in nearest}
        self.text_identity = None
        self.module = None

    # ---- data
    def _text_inputs(self, texts):
        """Frozen text features: sentence embeddings, or (word pieces, mask) for attention."""
        from cgrs_ros.engine.config import TextEncoderConfig
        from cgrs_ros.engine.encoders import load_text_encoder

        model = self.cfg.model
        if model.text_pooling == 'mean':
            feats, self.text_identity = text_features(texts, model.text_model, self.cache_root,
                                                      self.cfg.train.device)
            return torch.from_numpy(feats), feats.shape[1]
        encoder = load_text_encoder(TextEncoderConfig(model=model.text_model,
                                                      device=self.cfg.train.device))
        self.text_identity = encoder.identity
        chunks = [encoder.encode_tokens(texts[s:s + 512], model.max_tokens)
                  for s in range(0, len(texts), 512)]
        length = max(c[0].shape[1] for c in chunks)
        tokens = torch.zeros(len(texts), length, encoder.dim, dtype=torch.float16)
        mask = torch.zeros(len(texts), length, dtype=torch.bool)
        row = 0
        for tok, msk in chunks:
            tokens[row:row + len(tok), :tok.shape[1]] = torch.from_numpy(tok)
            mask[row:row + len(tok), :tok.shape[1]] = torch.from_numpy(msk)
            row += len(tok)
        return (tokens, mask), encoder.dim

    def set_data(self, image_paths, image_platforms, texts):
        """Compute (or load cached) frozen features of the images and texts used."""
        self._say(f'image features: {len(image_paths)} images ({self.tower.identity})')
        # A bar in a terminal only (tqdm's disable=None): the first run computes them all.
        with tqdm(total=len(image_paths), desc='image features', unit='img',
                  disable=None, leave=False) as bar:
            self.image_feats = torch.from_numpy(self._feature_cache.features(
                image_paths, self.cfg.train.feature_batch,
                progress=lambda done: bar.update(done - bar.n)))
        self._say(f'text features: {len(texts)} texts ({self.cfg.model.text_model}, '
                  f'{self.cfg.model.text_pooling} pooling)')
        self.text_feats, text_dim = self._text_inputs(list(texts))
        model, loss = self.cfg.model, self.cfg.loss
        self.module = DualHeads(self.tower.dim, text_dim, model.dim, model.hidden,
                                model.dropout, self._experts, self._expert_of,
                                loss.temperature, loss.learn_temperature, model.text_pooling)
        # Features live on the training device with the heads (they fit: ~10 kB per image).
        device = self.cfg.train.device
        self.module.to(device)
        self.image_feats = self.image_feats.to(device)
        self.text_feats = (tuple(t.to(device) for t in self.text_feats)
                           if isinstance(self.text_feats, tuple) else self.text_feats.to(device))
        self.image_experts = self._expert_ids(image_platforms)

    def _expert_ids(self, platforms):
        return torch.tensor([self.module.expert_index(p) for p in platforms],
                            dtype=torch.int64, device=self.cfg.train.device)

    def encode_extra(self, image_paths, image_platforms, texts):
        """Frozen features of another set (validation); returns (image feats, experts, texts)."""
        device = self.cfg.train.device
        feats = torch.from_numpy(self._feature_cache.features(
            image_paths, self.cfg.train.feature_batch)).to(device)
        text, _ = self._text_inputs(list(texts))
        text = tuple(t.to(device) for t in text) if isinstance(text, tuple) else text.to(device)
        return feats, self._expert_ids(image_platforms), text

    # ---- forward
    def images(self, index, feats=None, experts=None):
        """Return normalized embeddings (n, dim) of images ``index`` (or of given features)."""
        feats = self.image_feats[index] if feats is None else feats
        experts = self.image_experts[index] if experts is None else experts
        return self.module.images(feats, experts)

    def texts(self, index, feats=None):
        """Return normalized embeddings (E, n, dim) of texts ``index`` (or given features)."""
        feats = feats if feats is not None else (
            (self.text_feats[0][index], self.text_feats[1][index])
            if isinstance(self.text_feats, tuple) else self.text_feats[index])
        if isinstance(feats, tuple):
            tokens, mask = feats
            return self.module.texts((tokens.float(), mask))
        noise = self.cfg.model.text_noise
        if noise and self.module.training:
            feats = torch.nn.functional.normalize(feats + noise * torch.randn_like(feats),
                                                  dim=-1)
        return self.module.texts(feats)

    def expert_ids(self, index):
        """Return the expert of each image ``index``."""
        return self.image_experts[index]

    @property
    def logit_scale(self):
        """The learnable log inverse temperature."""
        return self.module.logit_scale

    def export(self, out_dir, extra=None):
        """Write the model folder the engine's ``learned`` backend loads."""
        towers = {'image': {'name': 'efficientnet_lite0', 'identity': self.tower.identity,
                            'image_size': self.tower.image_size},
                  'text': {'model': self.cfg.model.text_model, 'identity': self.text_identity,
                           'pooling': self.cfg.model.text_pooling,
                           'max_tokens': self.cfg.model.max_tokens}}
        save_model_folder(out_dir, self.module, towers, extra, self.cfg.model.weights_dtype)


class OpenClipBackend:
    """Fine-tune an open_clip model end to end, with LiT-style locks."""

    def __init__(self, cfg, platforms, cache_root, progress=None):
        from cgrs_ros.engine.encoders import _open_clip_parts
        ensure_torchvision()
        import open_clip
        model = cfg.model
        if model.experts:
            raise ConfigError('model.experts is only available with model.backend: '
                              'lite0_minilm; set model.experts: false for open_clip')
        self.cfg = cfg
        schema, target = _open_clip_parts(model.name, model.pretrained)
        if schema == 'random':
            raise ConfigError(
                f'model.pretrained is empty for open_clip model {model.name!r}; fine-tuning '
                'random weights is not what you want: set a checkpoint file, a pretrained tag '
                "or model.name: 'local-dir:DIR'")
        try:
            created = open_clip.create_model_and_transforms(
                model.name, pretrained=target if schema in ('tag', 'file') else None,
                device=cfg.train.device)
        except Exception as exc:  # hub, checkpoint and architecture errors come as many types
            raise ModelLoadError(f'open_clip model {model.name} (pretrained {model.pretrained}) '
                                 f'could not be loaded ({exc}); check the path or tag') from None
        self.module, self._preprocess = created[0], created[2]
        self._tokenizer = open_clip.get_tokenizer(model.name)
        self._source = (schema, target)
        if model.lock_image:
            self.module.lock_image_tower(unlocked_groups=model.unlocked_image_groups,
                                         freeze_bn_stats=True)
        if model.lock_text:
            self.module.lock_text_tower(unlocked_layers=model.unlocked_text_layers)

    def set_data(self, image_paths, image_platforms, texts):
        """Remember the files and texts; open_clip reads them batch by batch."""
        self.image_paths = list(image_paths)
        self.all_texts = list(texts)

    def _pixels(self, paths):
        out = []
        for path in paths:
            with Image.open(path) as image:
                out.append(self._preprocess(image.convert('RGB')))
        return torch.stack(out).to(self.cfg.train.device)

    def encode_extra(self, image_paths, image_platforms, texts):
        """Return validation inputs: the files and texts themselves (encoded when scored)."""
        return list(image_paths), self.expert_ids(image_paths), list(texts)

    def images(self, index, feats=None, experts=None):
        """Return normalized embeddings of images ``index`` (or of the given paths)."""
        paths = feats if feats is not None else [self.image_paths[i] for i in index.tolist()]
        out = []
        for start in range(0, len(paths), 64):
            out.append(self.module.encode_image(self._pixels(paths[start:start + 64]),
                                                normalize=True))
        return torch.cat(out)

    def texts(self, index, feats=None):
        """Return normalized embeddings (1, n, dim) of texts ``index`` (or given texts)."""
        texts = feats if feats is not None else [self.all_texts[i] for i in index.tolist()]
        out = []
        for start in range(0, len(texts), 256):
            tokens = self._tokenizer(texts[start:start + 256]).to(self.cfg.train.device)
            out.append(self.module.encode_text(tokens, normalize=True))
        return torch.cat(out)[None]

    def expert_ids(self, index):
        """Return zeros: an open_clip model has one shared space."""
        return torch.zeros(len(index), dtype=torch.int64, device=self.cfg.train.device)

    @property
    def logit_scale(self):
        """The model's learnable log inverse temperature."""
        return self.module.logit_scale

    def export(self, out_dir, extra=None):
        """Write an open_clip folder (open_clip_config.json + safetensors) plus cgrs_model.json."""
        import open_clip
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        schema, target = self._source
        if schema == 'local-dir':
            config = json.loads((Path(target) / 'open_clip_config.json').read_text())
        else:
            config = {'model_cfg': open_clip.get_model_config(self.cfg.model.name),
                      'preprocess_cfg': {}}
        atomic_write_json(out / 'open_clip_config.json', config)
        state = {k: v.detach().contiguous().cpu() for k, v in self.module.state_dict().items()}
        with atomic_replace(out / 'open_clip_model.safetensors') as tmp:
            save_file(state, tmp)
        atomic_write_json(out / 'cgrs_train.json', dict(
            {'backend': 'open_clip', 'source': self.cfg.model.name,
             'pretrained': self.cfg.model.pretrained}, **(extra or {})))


BACKENDS = {'lite0_minilm': HeadsBackend, 'open_clip': OpenClipBackend}


def make_backend(cfg, platforms, cache_root, progress=None):
    """Build the backend ``model.backend`` names."""
    return BACKENDS[cfg.model.backend](cfg, platforms, cache_root, progress)


def default_cache_root():
    """Feature cache used when none is given: ``$XDG_CACHE_HOME/cgrs/train-features``."""
    base = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache')
    return base / 'cgrs' / 'train-features'
