"""Captioning through an OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp, Ollama).

Each image travels inline as a base64 JPEG data URL in an ``image_url`` content part, next to
the platform's instruction. Requests go through the shared ``engine.openai_client`` (a bounded
thread pool; transient failures such as timeouts, dropped connections, HTTP 429 and 5xx retried
with exponential backoff, other HTTP errors reported at once). Every image gets its own
outcome, so one refusal fails one image only.
"""

from cgrs_ros.engine.captioners.base import Captioner, CaptionOutcome
from cgrs_ros.engine.captioners.prompts import PromptSet
from cgrs_ros.engine.errors import ConfigError
from cgrs_ros.engine.openai_client import encode_image, OpenAIClient


def _message_text(payload):
    """Pull the assistant text out of a chat-completions response body."""
    content = payload['choices'][0]['message']['content']
    if isinstance(content, list):  # some servers return content parts
        content = ''.join(part.get('text', '') for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise TypeError(f'message content is {type(content).__name__}')
    return ' '.join(content.split())


class OpenAICaptioner(Captioner):
    """Caption images with a VLM served behind an OpenAI-compatible HTTP API."""

    def __init__(self, settings):
        """Check the endpoint settings and start the request pool (no request is sent yet)."""
        client = OpenAIClient(settings, 'captioner', thread_name_prefix='cgrs-caption')
        if settings.prompt_style == 'prefix':
            raise ConfigError(
                "captioner.prompt_style 'prefix' does not apply to chat endpoints; use 'auto'.")
        self._settings = settings
        self.batch_size = settings.batch_size
        self.prompts = PromptSet('chat', settings.prompts, settings.system_prompt,
                                 version=settings.prompt_version)
        self._client = client
        self.url = client.url

    @property
    def identity(self):
        """Return 'openai:<model>:greedy:max_tokens=<n>:max_side=<px>' (not the URL)."""
        # The server address is left out on purpose: the same model moved to another host
        # writes the same captions.
        s = self._settings
        return f'openai:{s.model}:greedy:max_tokens={s.max_new_tokens}:max_side={s.max_image_side}'

    @property
    def prompt_version(self):
        """Return the prompt version (configured, or a hash of the prompts in use)."""
        return self.prompts.version

    def caption(self, images, platforms):
        """Caption images concurrently (at most ``concurrency`` requests in flight)."""
        self._check_inputs(images, platforms)
        prompts = [self.prompts.text(platform) for platform in platforms]
        futures = [self._client.submit(self._caption_one, image, prompt)
                   for image, prompt in zip(images, prompts)]
        return [future.result() for future in futures]

    def close(self):
        """Stop the request pool and close the HTTP connections."""
        self._client.close()

    def _body(self, image, prompt):
        s = self._settings
        messages = [{'role': 'system', 'content': self.prompts.system}] \
            if self.prompts.system else []
        messages.append({'role': 'user', 'content': [
            {'type': 'text', 'text': prompt},
            {'type': 'image_url', 'image_url': {'url': encode_image(image, s.max_image_side)}},
        ]})
        return {'model': s.model, 'messages': messages, 'max_tokens': s.max_new_tokens,
                'temperature': 0}

    def _caption_one(self, image, prompt):
        try:
            body = self._body(image, prompt)
        except Exception as exc:  # noqa: B902 - PIL raises many types for a bad image
            return CaptionOutcome(error=f'cannot encode image: {exc}')
        reply = self._client.post(body)
        if not reply.ok:
            return CaptionOutcome(error=reply.error)
        return self._parse(reply.payload)

    def _parse(self, payload):
        try:
            text = _message_text(payload)
        except (KeyError, IndexError, TypeError) as exc:
            return CaptionOutcome(
                error=f'{self.url} answered 200 but not with a chat completion ({exc!r})')
        if not text:
            return CaptionOutcome(error='the endpoint returned an empty caption')
        limit = self._settings.max_caption_chars
        if len(text) > limit:  # keep whole words; the store and the text encoder stay bounded
            text = text[:limit].rsplit(' ', 1)[0] if ' ' in text[:limit] else text[:limit]
        return CaptionOutcome(caption=text)
