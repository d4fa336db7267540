"""Score fusion of the coarse (image-text) and caption (text-text) channels.

Both functions work on the candidate set of one query: arrays of equal length, one entry per
candidate, ``NaN`` where a channel has no score for that candidate (an image without a caption,
or one whose image could not be embedded).

weighted (default)
    Each channel's scores are min-max normalized over the candidate set,
    ``n = (s - min) / (max - min)`` (all equal -> 1), then
    ``fused = (1 - w) * n_coarse + w * n_caption`` with ``w = caption_weight``.
    Cosine similarities of two different models live on different scales (CLIP text-image
    cosines sit around 0.2-0.35, MiniLM text-text ones spread over 0-0.8), so raw scores cannot
    be added; normalizing over the candidates compares each channel's preference among them.
    A missing score counts as the channel's minimum (normalized 0).

rrf (reciprocal rank fusion, Cormack et al. 2009)
    ``fused = (1 - w) / (k + rank_coarse) + w / (k + rank_caption)`` with 1-based ranks within
    the candidate set (ties share the better rank) and ``k = rrf_k`` (60, as in the paper).
    At ``w = 0.5`` this is half the textbook RRF sum, so it ranks identically. Uses ranks
    only, so it is immune to score scales; a missing score contributes 0.

When only one channel ran, the fused score is that channel's raw score.
"""

import numpy as np

FUSIONS = ('weighted', 'rrf')


def minmax(scores):
    """Min-max normalize over the finite entries; all-equal -> 1.0; NaN stays NaN."""
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(scores)
    if not finite.any():
        return scores.copy()
    lo, hi = scores[finite].min(), scores[finite].max()
    if hi - lo <= 1e-12:
        out = np.where(finite, 1.0, np.nan)
    else:
        out = (scores - lo) / (hi - lo)
    return out


def ranks_desc(scores):
    """Return 1-based ranks by descending score (ties share the better rank); NaN -> NaN."""
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(scores)
    out = np.full(scores.shape, np.nan)
    valid = np.sort(scores[finite])
    # rank = 1 + number of scores strictly greater (competition ranking, vectorized).
    out[finite] = 1 + len(valid) - np.searchsorted(valid, scores[finite], side='right')
    return out


def fuse_weighted(coarse, caption, caption_weight):
    """Weighted fusion of min-max normalized scores (see the module docstring)."""
    n_coarse = np.nan_to_num(minmax(coarse), nan=0.0)
    n_caption = np.nan_to_num(minmax(caption), nan=0.0)
    return (1.0 - caption_weight) * n_coarse + caption_weight * n_caption


def fuse_rrf(coarse, caption, caption_weight, k=60.0):
    """Weighted reciprocal rank fusion (see the module docstring)."""
    r_coarse = ranks_desc(coarse)
    r_caption = ranks_desc(caption)
    part_coarse = np.where(np.isfinite(r_coarse), (1.0 - caption_weight) / (k + r_coarse), 0.0)
    part_caption = np.where(np.isfinite(r_caption), caption_weight / (k + r_caption), 0.0)
    return part_coarse + part_caption


def fuse(coarse, caption, method='weighted', caption_weight=0.5, rrf_k=60.0):
    """Fuse two channels' candidate scores; either may be None when its channel did not run."""
    if coarse is None and caption is None:
        raise ValueError('fuse() needs at least one channel')
    if caption is None:
        return np.asarray(coarse, dtype=np.float64)
    if coarse is None:
        return np.asarray(caption, dtype=np.float64)
    if method == 'weighted':
        return fuse_weighted(coarse, caption, caption_weight)
    if method == 'rrf':
        return fuse_rrf(coarse, caption, caption_weight, rrf_k)
    raise ValueError(f'unknown fusion {method!r}; use one of {", ".join(FUSIONS)}')
