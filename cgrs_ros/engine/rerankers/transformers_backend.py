"""Reranking with a local chat VLM (Qwen2-VL, SmolVLM, Idefics, LLaVA) by its yes/no logits.

The VLM is asked the configured yes/no question about each candidate image, and instead of
letting it write an answer we read its next-token distribution once: P(match) is the softmax of
the best "Yes" logit against the best "No" logit. That is one forward pass per batch of
candidates (no ``generate``, no sampling, no parsing of free text), it gives a graded score
rather than a hard yes/no, and it is the same quantity the ``openai`` backend reads from a
server's logprobs, so the two backends are interchangeable for the stage.

Several spellings of the answer are read ("Yes", " Yes", "yes", " yes") because tokenizers
differ in whether the first answer token carries a leading space or capital; the best of them
stands for the answer. The model is loaded exactly as the captioner loads it
(:mod:`cgrs_ros.engine.hf_loading`).
"""

import hashlib
import inspect
import logging

from cgrs_ros.engine import hf_loading
from cgrs_ros.engine.errors import ModelLoadError
from cgrs_ros.engine.rerankers.base import LocalModelReranker, yes_probability

logger = logging.getLogger(__name__)

SECTION = 'reranker'
WHAT = 'reranking model'
YES_SPELLINGS = ('Yes', ' Yes', 'yes', ' yes')
NO_SPELLINGS = ('No', ' No', 'no', ' no')


def answer_token_ids(tokenizer, spellings):
    """Return the ids of those spellings that the tokenizer encodes as one token (deduplicated)."""
    ids = []
    for text in spellings:
        encoded = tokenizer(text, add_special_tokens=False)['input_ids']
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


class TransformersReranker(LocalModelReranker):
    """P(match) per candidate from a local chat VLM's next-token Yes/No logits."""

    def __init__(self, settings):
        """Load processor and model named by ``settings.model`` (ModelLoadError if missing)."""
        self._settings = settings
        self.batch_size = settings.batch_size
        model = settings.model
        self._torch, self._processor, self._model, self.device = hf_loading.load_model(
            settings, SECTION, WHAT,
            ('a chat vision-language model',
             'a chat VLM such as Qwen2-VL, SmolVLM or LLaVA (or the itm backend for BLIP)'))
        try:
            self._setup(model)
        except BaseException:
            self.close()
            raise
        logger.info('reranker %s on %s (yes ids %s, no ids %s)', model, self.device,
                    self._yes_ids, self._no_ids)

    def _setup(self, model):
        if not getattr(self._processor, 'chat_template', None):
            raise ModelLoadError(
                f'Cannot use reranking model {model!r}: it has no chat template, so it cannot be '
                'asked the yes/no question; use a chat VLM (Qwen2-VL, SmolVLM, LLaVA) or, for '
                'BLIP / BLIP-2 matching heads, reranker.backend: itm.')
        if getattr(self._model.config, 'is_encoder_decoder', False):
            raise ModelLoadError(
                f'Cannot use reranking model {model!r}: it is an encoder-decoder model; the '
                'transformers reranker reads the next token of a decoder-only chat VLM.')
        tokenizer = hf_loading.processor_tokenizer(
            self._processor, model, SECTION, WHAT, 'the Yes and No answers cannot be found')
        # The answer follows the last prompt token: pad on the left so that it is the last
        # position of every row in a batch.
        tokenizer.padding_side = 'left'
        self._yes_ids = answer_token_ids(tokenizer, YES_SPELLINGS)
        self._no_ids = answer_token_ids(tokenizer, NO_SPELLINGS)
        if not self._yes_ids or not self._no_ids:
            raise ModelLoadError(
                f'Cannot use reranking model {model!r}: its tokenizer has no single token for '
                f'{"Yes" if not self._yes_ids else "No"}, so the answer cannot be read from one '
                'next-token distribution; use another chat VLM or the openai backend.')
        self._drop_keys = hf_loading.unused_input_keys(self._model)
        self._forward_kwargs = {}
        if 'logits_to_keep' in inspect.signature(self._model.forward).parameters:
            # Only the last position is read: skip the (rows x length x vocab) logits.
            self._forward_kwargs['logits_to_keep'] = 1

    compares_images = True   # an image goal: the photo and the candidate in one chat

    @property
    def identity(self):
        """Return 'transformers:<model>:yesno:prompt=<sha256 of both prompts, 12 hex>'."""
        prompts = f'{self._settings.prompt}\n{self._settings.image_prompt}'
        digest = hashlib.sha256(prompts.encode('utf-8')).hexdigest()[:12]
        return f'transformers:{self._settings.model}:yesno:prompt={digest}'

    def _shrunk(self, image):
        rgb = image.convert('RGB')
        side = self._settings.max_image_side
        if side and max(rgb.size) > side:
            # Processors that tile large images (SmolVLM/Idefics3 split into up to 16 tiles)
            # cost per pixel: bound the cost per candidate here.
            rgb = rgb.copy()
            rgb.thumbnail((side, side))
        return rgb

    _prepare_photo = _shrunk

    def _prepare(self, image, platform, query, photo=None):
        """Return the (image(s), yes/no question) of one candidate.

        For an image goal the chat holds the photo, then the candidate, then ``image_prompt``.
        """
        rgb = self._shrunk(image)
        platform = platform or 'unknown'
        if photo is None:
            return rgb, self._settings.prompt.format(platform=platform, query=query)
        picture, photo_platform = photo
        return (picture, rgb), self._settings.image_prompt.format(
            platform=platform, query_platform=photo_platform or 'unknown', query=query)

    def next_token_logits(self, images, texts):
        """Return the float32 next-token logits (rows, vocab) after each chat prompt.

        Each entry of ``images`` is one image or a tuple of them (shown in that order).
        """
        torch = self._torch
        conversations = [hf_loading.conversation(image, text)
                         for image, text in zip(images, texts)]
        inputs = hf_loading.apply_chat_template(self._processor, conversations)
        inputs = hf_loading.to_model(inputs, self._model, self.device, self._drop_keys)
        with torch.inference_mode():
            logits = self._model(**inputs, **self._forward_kwargs).logits
        return logits[:, -1, :].float()

    def _score_batch(self, pairs):
        # Logits and log-probabilities differ by one constant per row (the log-partition), which
        # cancels in the two-way softmax, so the logits can go to yes_probability as they are.
        logits = self.next_token_logits([image for image, _ in pairs],
                                        [text for _, text in pairs])
        yes = logits[:, self._yes_ids].max(dim=1).values.cpu().numpy()
        no = logits[:, self._no_ids].max(dim=1).values.cpu().numpy()
        return [yes_probability(y, n) for y, n in zip(yes, no)]
