"""Contrastive losses over a batch similarity matrix (texts x images).

All losses take ``logits`` (n_text, n_image) = similarity * learnable scale and a target
matrix of the same shape, and are symmetric: text->image rows and image->text columns.

- group-aware multi-positive InfoNCE: every image of the query's place is a positive (the
  building-level metric counts any of them as a hit). The target of a row is uniform over its
  positives; the loss is the cross-entropy of the row's softmax against it (with one positive
  per row this is CLIP's InfoNCE).
- soft labels (SkyLink): a wrong place that shares most attributes with the right one, or lies
  within ``radius_m`` of it, gets partial credit ``weight * similarity`` in the target instead
  of a hard zero, so near-duplicates are not pushed apart as hard as unrelated places.

Targets are built by :func:`batch_targets` from per-sample group indices and an optional
group-to-group credit matrix.
"""

import torch
from torch.nn import functional


def soft_cross_entropy(logits, target):
    """Mean over rows of -sum(target * log_softmax(logits)); rows of target sum to 1."""
    return -(target * functional.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _rows_normalized(matrix):
    return matrix / matrix.sum(dim=1, keepdim=True).clamp_min(1e-12)


def symmetric_contrastive_loss(logits, target):
    """Symmetric soft-target InfoNCE: text->image over rows, image->text over columns.

    ``target`` (n_text, n_image) holds non-negative credit (1 for a positive, a fraction for a
    near-positive, 0 otherwise); each direction normalizes it over its own axis. Rows or
    columns without any credit are left out of that direction.
    """
    t2i_rows = target.sum(dim=1) > 0
    i2t_rows = target.sum(dim=0) > 0
    t2i = soft_cross_entropy(logits[t2i_rows], _rows_normalized(target[t2i_rows]))
    i2t = soft_cross_entropy(logits.t()[i2t_rows], _rows_normalized(target.t()[i2t_rows]))
    return 0.5 * (t2i + i2t)


def batch_targets(text_groups, image_groups, credit=None, weight=0.0):
    """Target matrix (n_text, n_image): 1 where the groups match, soft credit elsewhere.

    ``credit`` is an optional (G, G) tensor of partial credit between groups in [0, 1]
    (diagonal ignored); ``weight`` scales it. Returns float32.
    """
    same = (text_groups[:, None] == image_groups[None, :]).float()
    if credit is None or weight <= 0:
        return same
    soft = credit[text_groups[:, None], image_groups[None, :]].float() * weight
    return torch.where(same > 0, same, soft)
