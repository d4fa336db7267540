"""Trained projection heads of the offline dual encoder, and the model folder they live in.

A :class:`DualHeads` maps frozen image features and frozen text features into one shared,
L2-normalized space. With platform experts (TeleAI's PE-MoE) there is one image head and one
text head per platform expert: an image is projected by its platform's expert, and a query is
projected by every expert, so it can be scored against each platform's images in that
expert's space. Without experts there is one shared pair of heads.

Model folder (what ``cgrs train dual`` writes and ``image_encoder: {backend: learned,
model: DIR}`` loads)::

    cgrs_model.json     format, towers, head shapes, experts and routing
    heads.safetensors   the head weights (float32)
    model_card.md/json  data, loss, epochs, validation recall, date
"""

import json
import math
from pathlib import Path

from cgrs_ros.engine.errors import ModelLoadError
from cgrs_ros.engine.storage import atomic_replace, atomic_write_json
import torch
from torch import nn

MODEL_FILE = 'cgrs_model.json'
WEIGHTS_FILE = 'heads.safetensors'
MODEL_KIND = 'cgrs-dual'
SHARED = 'shared'


class Head(nn.Module):
    """Linear projection, or a one-hidden-layer MLP when ``hidden`` > 0."""

    def __init__(self, in_dim, dim, hidden=0, dropout=0.0):
        super().__init__()
        layers = [nn.Dropout(dropout)]  # always present: saved layer indices never shift
        if hidden:
            layers += [nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, dim)]
        else:
            layers.append(nn.Linear(in_dim, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        """Project a batch of features."""
        return self.net(x)


class TokenPool(nn.Module):
    """Attention pooling over frozen word-piece embeddings, beside their plain mean.

    A sentence encoder's mean pooling weighs "take me to the" as much as "slate-gray"; the
    learned attention lets the words that describe a place count, whatever sentence they are
    said in. Output: [attention-pooled, mean-pooled] (2 x token dim).
    """

    def __init__(self, dim, hidden=128):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, tokens, mask):
        """Pool (n, L, dim) word pieces with their (n, L) mask -> (n, 2 * dim)."""
        logits = self.score(tokens).squeeze(-1).masked_fill(~mask, float('-inf'))
        weights = torch.softmax(logits, dim=-1).unsqueeze(-1)
        counts = mask.sum(dim=1, keepdim=True).clamp_min(1)
        mean = (tokens * mask.unsqueeze(-1)).sum(dim=1) / counts
        return torch.cat([(weights * tokens).sum(dim=1), mean], dim=-1)


class DualHeads(nn.Module):
    """Image and text heads (one pair per expert) plus a learnable temperature.

    ``text_pooling`` is ``mean`` (the text input is the sentence embedding) or ``attention``
    (the input is word-piece embeddings and a mask, pooled by a shared :class:`TokenPool`).
    """

    def __init__(self, image_dim, text_dim, dim=256, hidden=0, dropout=0.0, experts=None,
                 expert_of=None, temperature=0.07, learn_temperature=True,
                 text_pooling='mean'):
        super().__init__()
        self.experts = tuple(experts) if experts else (SHARED,)
        # platform -> expert name; platforms not listed go to the first expert.
        self.expert_of = dict(expert_of or {})
        self.shape = {'image_dim': int(image_dim), 'text_dim': int(text_dim), 'dim': int(dim),
                      'hidden': int(hidden), 'dropout': float(dropout),
                      'text_pooling': text_pooling}
        self.pool = TokenPool(text_dim) if text_pooling == 'attention' else None
        text_in = 2 * text_dim if self.pool is not None else text_dim
        self.image_heads = nn.ModuleDict(
            {name: Head(image_dim, dim, hidden, dropout) for name in self.experts})
        self.text_heads = nn.ModuleDict(
            {name: Head(text_in, dim, hidden, dropout) for name in self.experts})
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)),
                                        requires_grad=learn_temperature)

    def expert_index(self, platform):
        """Return the index of the expert that projects images of ``platform``."""
        name = self.expert_of.get(platform, self.experts[0])
        return self.experts.index(name) if name in self.experts else 0

    def images(self, features, expert_ids):
        """Project image features (n, image_dim), each by its expert -> normalized (n, dim)."""
        out = torch.zeros(features.shape[0], self.shape['dim'], dtype=features.dtype,
                          device=features.device)
        for e, name in enumerate(self.experts):
            rows = (expert_ids == e).nonzero(as_tuple=True)[0]
            if len(rows):
                out = out.index_copy(0, rows, self.image_heads[name](features[rows]))
        return nn.functional.normalize(out, dim=-1)

    def texts(self, features):
        """Project text features by every expert -> normalized (E, n, dim).

        ``features``: sentence embeddings (n, text_dim), or with attention pooling a tuple
        (word-piece embeddings (n, L, text_dim), mask (n, L)).
        """
        if self.pool is not None:
            features = self.pool(*features)
        return nn.functional.normalize(
            torch.stack([self.text_heads[name](features) for name in self.experts]), dim=-1)

    @staticmethod
    def similarity(text_emb, image_emb, expert_ids):
        """Return cosine similarities (n_text, n_image), each image in its expert's space."""
        sims = torch.einsum('etd,id->eti', text_emb, image_emb)
        index = expert_ids.view(1, 1, -1).expand(1, sims.shape[1], -1)
        return sims.gather(0, index)[0]

    def config(self):
        """Return the JSON-able description needed to rebuild the heads."""
        return dict(self.shape, experts=list(self.experts), expert_of=self.expert_of)


def save_model_folder(out_dir, heads, towers, extra=None, dtype='float32'):
    """Write ``cgrs_model.json`` + ``heads.safetensors`` into ``out_dir`` (atomically each).

    ``dtype`` float16 halves the file (loading converts back to float32).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(getattr(torch, dtype)).contiguous().cpu()
             for k, v in heads.state_dict().items()}
    with atomic_replace(out / WEIGHTS_FILE) as tmp:
        save_file(state, tmp)
    atomic_write_json(out / MODEL_FILE, dict(
        {'format': 1, 'kind': MODEL_KIND, 'towers': towers, 'heads': heads.config()},
        **(extra or {})))


def read_model_config(folder):
    """Return the parsed ``cgrs_model.json`` of a model folder (ModelLoadError if unusable)."""
    folder = Path(folder)
    path = folder / MODEL_FILE
    if not path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ModelLoadError(
            f'{folder} is not a cgrs model folder (it needs {MODEL_FILE} and {WEIGHTS_FILE}); '
            'train one with `cgrs train dual GALLERY --out DIR` and set image_encoder.model '
            'to DIR')
    try:
        config = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f'{path} is not valid JSON ({exc}); retrain or restore the '
                             'model folder') from None
    if config.get('kind') != MODEL_KIND or config.get('format') != 1:
        raise ModelLoadError(f'{path} is not a format-1 {MODEL_KIND} model; retrain it with '
                             'this version of cgrs')
    return config


def load_heads(folder):
    """Rebuild :class:`DualHeads` from a model folder, in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_model_config(folder)
    shape = config['heads']
    heads = DualHeads(shape['image_dim'], shape['text_dim'], shape['dim'], shape['hidden'],
                      0.0, shape['experts'], shape.get('expert_of'),
                      text_pooling=shape.get('text_pooling', 'mean'))
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
        heads.load_state_dict({k: v.float() for k, v in state.items()})
    except Exception as exc:  # safetensors/torch raise several types on a bad file
        raise ModelLoadError(f'{folder / WEIGHTS_FILE} does not hold the heads its '
                             f'{MODEL_FILE} describes ({exc}); retrain the model') from None
    return heads.eval(), config
