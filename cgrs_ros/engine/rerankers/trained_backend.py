"""The ``trained`` reranker: the cross-encoder of ``cgrs train reranker`` (learning/cross.py).

It reads the query against each candidate's caption word by word, together with the scores
the earlier stages gave the candidate, and needs no image decoding (the coarse score already
carries the pixel evidence), so the stage costs milliseconds. The whole candidate list is
scored in one call (``batch_size`` is unbounded) because the prior features are min-max
normalized over the list, exactly as in training.

Caption word pieces and caption sentence vectors are kept in a bounded LRU cache (by caption
text): the same gallery images come back as candidates across queries, and MiniLM over a
100-word caption is the expensive part of a call.
"""

import collections
import hashlib
import threading

from cgrs_ros.engine.errors import ConfigError
from cgrs_ros.engine.rerankers.base import Reranker
import numpy as np

CACHE_CAPTIONS = 2048


class TrainedReranker(Reranker):
    """Score candidate lists with a trained cross-encoder folder (``reranker.model``)."""

    batch_size = 1_000_000
    needs_images = False
    uses_priors = True

    def __init__(self, settings):
        """Load the model folder and its sentence encoder (ModelLoadError if missing)."""
        if not settings.model:
            raise ConfigError('reranker.model is empty; set it to a folder written by '
                              '`cgrs train reranker`.')
        import torch

        from cgrs_ros.engine.config import TextEncoderConfig
        from cgrs_ros.engine.encoders import load_text_encoder
        from cgrs_ros.engine.learning.cross import load_reranker_folder

        self._torch = torch
        self.module, self.config = load_reranker_folder(settings.model)
        device = 'cpu' if settings.device == 'auto' else settings.device
        self._text = load_text_encoder(TextEncoderConfig(model=self.config['text_model'],
                                                         device=device))
        self._digest = hashlib.sha256(
            (self.config.get('trained_at', '') + str(self.config['module'])).encode()
        ).hexdigest()[:10]
        self._model_path = settings.model
        self._cache = collections.OrderedDict()
        self._lock = threading.Lock()
        self.last_errors = []

    @property
    def identity(self):
        """Return 'trained:<folder>:<hash of the model config and training date>'."""
        return f'trained:{self._model_path}:{self._digest}'

    def prepare(self, captions):
        """Compute the cached inputs of a gallery's captions now (at open), not per query."""
        distinct = list(dict.fromkeys(c for c in captions if c))[:CACHE_CAPTIONS]
        for start in range(0, len(distinct), 256):
            self._caption_inputs(distinct[start:start + 256])

    def _tokens(self, texts, max_tokens):
        tokens, mask = self._text.encode_tokens(texts, max_tokens, threads=1)
        return [(tokens[i, :mask[i].sum()].astype(np.float16)) for i in range(len(texts))]

    def _caption_inputs(self, captions):
        """(word pieces, sentence vectors) per caption (None: no caption), cached."""
        out, missing = {}, []
        with self._lock:
            for text in {c for c in captions if c}:
                if text in self._cache:
                    self._cache.move_to_end(text)
                    out[text] = self._cache[text]
                else:
                    missing.append(text)
        if missing:
            from cgrs_ros.engine.learning.cross import caption_sentences

            fresh = self._tokens(missing, self.config['max_caption_tokens'])
            sentences = [caption_sentences(text) for text in missing]
            flat = [x for parts in sentences for x in parts]
            vectors = self._text.encode_texts(flat, threads=1) if flat else []
            start = 0
            with self._lock:
                for text, tok, parts in zip(missing, fresh, sentences):
                    entry = (tok, np.asarray(vectors[start:start + len(parts)]))
                    start += len(parts)
                    out[text] = self._cache[text] = entry
                while len(self._cache) > CACHE_CAPTIONS:
                    self._cache.popitem(last=False)
        return [out.get(c) if c else None for c in captions]

    def score(self, query, images, platforms, captions=None, priors=None):
        """Return sigmoid(logit) per candidate: the model's P(match) for the whole list."""
        from cgrs_ros.engine.learning.cross import prior_features, sentence_scores

        self._check_inputs(images, platforms, captions)
        n = len(images)
        captions = list(captions) if captions is not None else [None] * n
        priors = priors or {}
        fused = priors.get('fused')
        fused = np.zeros(n) if fused is None else np.asarray(fused, dtype=np.float64)
        q_tok = self._tokens([query], self.config['max_query_tokens'])[0]
        # all-MiniLM's sentence vector is the normalized mean of its word pieces: no second
        # forward pass for the query.
        q_vec = q_tok.astype(np.float32).mean(axis=0)
        q_vec /= max(float(np.linalg.norm(q_vec)), 1e-12)
        inputs = self._caption_inputs(captions)
        sentences = sentence_scores(q_vec, [np.zeros((0, len(q_vec))) if x is None else x[1]
                                            for x in inputs])
        feats = prior_features(priors.get('coarse'), priors.get('caption'), fused, sentences)
        logits = score_pairs(self.module, [q_tok] * n,
                             [None if x is None else x[0] for x in inputs], feats)
        self.last_errors = []
        return 1.0 / (1.0 + np.exp(-logits))

    def close(self):
        """Drop the model and the caption cache."""
        self._cache.clear()


def pad_tokens(rows, dim):
    """Stack variable-length (L, dim) arrays (None = empty) into (n, Lmax, dim) + mask."""
    import torch

    length = max([1] + [len(r) for r in rows if r is not None])
    tokens = torch.zeros(len(rows), length, dim)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        if row is not None and len(row):
            tokens[i, :len(row)] = torch.from_numpy(np.asarray(row, dtype=np.float32))
            mask[i, :len(row)] = True
    return tokens, mask


def score_pairs(module, q_rows, c_rows, priors):
    """Return float64 logits of a CrossScorer for aligned (query, caption, priors) rows."""
    import torch

    dim = module.config['text_dim']
    q, q_mask = pad_tokens(q_rows, dim)
    c, c_mask = pad_tokens(c_rows, dim)
    with torch.inference_mode():
        logits = module(q, q_mask, c, c_mask, torch.from_numpy(np.asarray(priors)))
    return logits.double().numpy()
