"""Reranking with BLIP / BLIP-2 image-text matching (ITM) heads.

An ITM head is a small cross-encoder trained for exactly this question: given an image and a
sentence, do they match? It reads the query as it is (no yes/no prompt), costs one forward
pass of a base-sized model per batch, and its two-way softmax is the match probability the
stage fuses. That makes it the cheap reranker: far below a chat VLM in latency, at the price of
BLIP's short text window and weaker reading of long, spatial descriptions.

The head class is chosen from the checkpoint's own config, and a checkpoint that has no
trained matching head (a BLIP captioning model, say) is refused rather than loaded with a
randomly initialized head that would score by chance.
"""

import logging

from cgrs_ros.engine import hf_loading
from cgrs_ros.engine.errors import ModelLoadError
from cgrs_ros.engine.rerankers.base import LocalModelReranker
import numpy as np

logger = logging.getLogger(__name__)

SECTION = 'reranker'
WHAT = 'image-text matching model'
# model_type -> the transformers class with the matching head, and the forward() switch for it.
HEADS = {
    'blip': ('BlipForImageTextRetrieval', 'use_itm_head'),
    'blip-2': ('Blip2ForImageTextRetrieval', 'use_image_text_matching_head'),
}
FETCH_HINT = ('a BLIP or BLIP-2 image-text matching checkpoint such as '
              'Salesforce/blip-itm-base-coco or Salesforce/blip2-itm-vit-g')


def head_class_name(config, model):
    """Return the matching-head class name for a checkpoint config (ModelLoadError if none)."""
    model_type = getattr(config, 'model_type', None)
    if model_type not in HEADS:
        raise ModelLoadError(
            f'Cannot use {model!r} as an image-text matching model: its model_type is '
            f'{model_type!r}, not blip or blip-2; use {FETCH_HINT}.')
    wanted = HEADS[model_type][0]
    architectures = getattr(config, 'architectures', None) or []
    if architectures and wanted not in architectures:
        raise ModelLoadError(
            f'Cannot use {model!r} as an image-text matching model: it was saved as '
            f'{", ".join(architectures)}, which has no trained matching head; use {FETCH_HINT}.')
    return wanted


class ITMReranker(LocalModelReranker):
    """P(match) per candidate from a BLIP / BLIP-2 image-text matching head."""

    def __init__(self, settings):
        """Load processor and matching model named by ``settings.model`` (ModelLoadError)."""
        self._settings = settings
        self.batch_size = settings.batch_size
        model = settings.model

        def choose(config):
            import transformers
            return getattr(transformers, head_class_name(config, model))

        self._torch, self._processor, self._model, self.device = hf_loading.load_model(
            settings, SECTION, WHAT, ('a BLIP or BLIP-2 model', FETCH_HINT), model_class=choose)
        try:
            tokenizer = hf_loading.processor_tokenizer(
                self._processor, model, SECTION, WHAT, 'the query cannot be encoded')
        except ModelLoadError:
            self.close()
            raise
        self._model_type = self._model.config.model_type
        self._switch = HEADS[self._model_type][1]
        self._drop_keys = hf_loading.unused_input_keys(self._model)
        text_config = getattr(self._model.config, 'text_config', None)
        if self._model_type == 'blip-2':
            text_config = self._model.config.qformer_config
        limit = getattr(text_config, 'max_position_embeddings', None) or 512
        self._max_length = min(limit, tokenizer.model_max_length or limit)
        logger.info('reranker %s (%s matching head) on %s', model, self._model_type, self.device)

    @property
    def identity(self):
        """Return 'itm:<model>:<model_type>'."""
        return f'itm:{self._settings.model}:{self._model_type}'

    def match_logits(self, query, images):
        """Return the (rows, 2) float32 no-match / match logits of the head."""
        torch = self._torch
        inputs = self._processor(images=images, text=[query] * len(images), return_tensors='pt',
                                 padding=True, truncation=True, max_length=self._max_length)
        inputs = hf_loading.to_model(inputs, self._model, self.device, self._drop_keys)
        with torch.inference_mode():
            output = self._model(**inputs, **{self._switch: True})
        logits = output.itm_score if self._model_type == 'blip' else output.logits_per_image
        return logits.float()

    def _score_batch(self, pairs):
        # Every pair of one score() call holds the same text: the query.
        images = [image for image, _ in pairs]
        probs = self._torch.softmax(self.match_logits(pairs[0][1], images), dim=-1)[:, 1]
        return probs.cpu().numpy().astype(np.float64).tolist()
