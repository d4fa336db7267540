"""Captioning with Hugging Face transformers (any image-text-to-text model, by id or local dir).

One loading path serves plain captioning models (BLIP, BLIP-2, GIT, Florence-2) and chat VLMs
(SmolVLM, Qwen2.5-VL, LLaVA): ``AutoProcessor`` + ``AutoModelForImageTextToText``. Chat VLMs are
prompted through the processor's chat template; plain models get a short text prefix.
"""

import logging
import re

from cgrs_ros.engine import hf_loading
from cgrs_ros.engine.captioners.base import Captioner, CaptionOutcome
from cgrs_ros.engine.captioners.prompts import PromptSet
from cgrs_ros.engine.errors import ConfigError

logger = logging.getLogger(__name__)


class TransformersCaptioner(Captioner):
    """Greedy, batched captioning with a local transformers image-text-to-text model."""

    def __init__(self, settings):
        """Load processor and model named by ``settings.model`` (ModelLoadError if missing)."""
        self._settings = settings
        self.batch_size = settings.batch_size
        model = settings.model
        self._torch, self._processor, self._model, self.device = hf_loading.load_model(
            settings, 'captioner', 'captioning model',
            ('an image-text-to-text model',
             'a captioning or vision-language model such as BLIP, GIT or SmolVLM'))
        self._tokenizer = hf_loading.processor_tokenizer(
            self._processor, model, 'captioner', 'captioning model',
            'captions cannot be decoded')
        config = self._model.config
        self._model_type = getattr(config, 'model_type', None)
        self._encoder_decoder = bool(getattr(config, 'is_encoder_decoder', False))
        has_template = bool(getattr(self._processor, 'chat_template', None))
        style = settings.prompt_style
        if style == 'auto':
            style = 'chat' if has_template else 'prefix'
        elif style == 'chat' and not has_template:
            raise ConfigError(
                f'captioner.prompt_style is chat but {model!r} has no chat template; use '
                "prompt_style 'prefix' or 'auto'.")
        self.prompts = PromptSet(style, settings.prompts, settings.system_prompt,
                                 self._model_type, settings.prompt_version)
        if not self._encoder_decoder:
            # Decoder-only models generate after the last input token: pad on the left so
            # every row's prompt ends at the same position.
            self._tokenizer.padding_side = 'left'
        self._drop_keys = hf_loading.unused_input_keys(self._model)
        logger.info('captioner %s on %s (%s prompts)', model, self.device, style)

    @property
    def identity(self):
        """Return 'transformers:<model>:greedy:max_new_tokens=<n>'."""
        return f'transformers:{self._settings.model}:greedy:max_new_tokens=' \
               f'{self._settings.max_new_tokens}'

    @property
    def prompt_version(self):
        """Return the prompt version (configured, or a hash of the prompts in use)."""
        return self.prompts.version

    @property
    def prompt_style(self):
        """Return 'chat' or 'prefix', the way this model is prompted."""
        return self.prompts.style

    def caption(self, images, platforms):
        """Caption a batch of PIL images; one outcome per image, errors kept per image."""
        self._check_inputs(images, platforms)
        outcomes = [None] * len(images)
        ready = []
        for i, (image, platform) in enumerate(zip(images, platforms)):
            prompt = self.prompts.text(platform)
            try:
                ready.append((i, image.convert('RGB'), prompt))
            except Exception as exc:  # noqa: B902 - any decoding failure is this image's
                outcomes[i] = CaptionOutcome(error=f'cannot read image: {exc}')
        for group in self._groups(ready):
            for i, outcome in zip([g[0] for g in group], self._generate_robust(group)):
                outcomes[i] = outcome
        return outcomes

    def close(self):
        """Drop the model so its memory can be reclaimed."""
        self._model = None
        self._processor = None
        if self.device.startswith('cuda'):
            self._torch.cuda.empty_cache()

    def _groups(self, ready):
        if self.prompts.style == 'chat':
            # Chat inputs are left-padded, so mixed platforms share one generate call.
            return [ready] if ready else []
        # Prefix models (BLIP, GIT) handle padding inside their text decoder badly (BLIP
        # overwrites the first token with BOS); rows with the same prefix need no padding.
        by_prompt = {}
        for item in ready:
            by_prompt.setdefault(item[2], []).append(item)
        return list(by_prompt.values())

    def _generate_robust(self, group):
        try:
            return self._generate(group)
        except Exception as exc:  # noqa: B902 - isolate the failing image below
            if len(group) == 1:
                logger.warning('captioning failed: %s', exc)
                return [CaptionOutcome(error=f'{type(exc).__name__}: {exc}')]
            logger.warning('batch of %d failed (%s); captioning one at a time', len(group), exc)
            return [self._generate_robust([item])[0] for item in group]

    def _inputs(self, group):
        if self.prompts.style == 'chat':
            conversations = [hf_loading.conversation(image, prompt, self.prompts.system)
                             for _, image, prompt in group]
            try:
                return hf_loading.apply_chat_template(self._processor, conversations)
            except Exception as exc:  # noqa: B902 - templates without a system role raise
                if 'system' not in str(exc).lower():
                    raise
                conversations = [
                    hf_loading.conversation(image, f'{self.prompts.system}\n\n{prompt}')
                    for _, image, prompt in group]
                return hf_loading.apply_chat_template(self._processor, conversations)
        images = [image for _, image, _ in group]
        prompt = group[0][2]
        if not prompt:
            return self._processor(images=images, return_tensors='pt')
        inputs = self._processor(images=images, text=[prompt] * len(group), return_tensors='pt')
        sep = self._tokenizer.sep_token_id
        ids = inputs['input_ids']
        if (self._model_type != 'blip' and not self._encoder_decoder and sep is not None
                and ids.shape[1] > 1 and bool((ids[:, -1] == sep).all())):
            # BERT-style tokenizers end the prefix with [SEP] (end of text); a decoder-only
            # captioner (GIT) must continue the prefix, not start after an end marker.
            # BLIP drops that token inside its own generate().
            for key in ('input_ids', 'attention_mask', 'token_type_ids'):
                if key in inputs:
                    inputs[key] = inputs[key][:, :-1]
        return inputs

    def _generate(self, group):
        torch = self._torch
        inputs = hf_loading.to_model(self._inputs(group), self._model, self.device,
                                     self._drop_keys)
        kwargs = {'max_new_tokens': self._settings.max_new_tokens, 'do_sample': False,
                  'num_beams': 1}
        if self._model.generation_config.pad_token_id is None:
            kwargs['pad_token_id'] = self._tokenizer.pad_token_id
        with torch.inference_mode():
            sequences = self._model.generate(**inputs, **kwargs)
        if not isinstance(sequences, torch.Tensor):
            sequences = sequences.sequences
        prompt_ids = inputs.get('input_ids')
        if (self.prompts.style == 'chat' and prompt_ids is not None
                and not self._encoder_decoder and sequences.shape[1] >= prompt_ids.shape[1]
                and torch.equal(sequences[:, :prompt_ids.shape[1]], prompt_ids)):
            # Decoder-only generate() returns prompt + continuation: keep the continuation.
            # (Prefix captions are cut as text below: a continuation can start mid-word.)
            sequences = sequences[:, prompt_ids.shape[1]:]
        texts = self._tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return [self._outcome(text, prompt) for text, (_, _, prompt) in zip(texts, group)]

    def _outcome(self, text, prompt):
        text = ' '.join(text.split())
        if self.prompts.style == 'prefix' and prompt:
            # Models that echo the prefix (BLIP) return it re-tokenized (e.g. lower-cased).
            echoed = ' '.join(self._tokenizer.decode(
                self._tokenizer(prompt, add_special_tokens=False)['input_ids'],
                skip_special_tokens=True).split())
            for head in (echoed, prompt):
                if head and text.lower().startswith(head.lower()):
                    text = text[len(head):].strip()
                    break
        text = re.sub(r'^[\s:,.-]+', '', text)
        if not text:
            return CaptionOutcome(error='the model produced an empty caption')
        return CaptionOutcome(caption=text)
