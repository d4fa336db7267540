"""The ``speech`` section of the engine configuration (voice_node and its recognisers)."""

from typing import Literal, Optional

from cgrs_ros.engine.sections import SectionSettings
import pydantic

BACKENDS = ('pocketsphinx', 'faster_whisper', 'whisper_cpp', 'openai')


class SpeechSettings(SectionSettings):
    """How spoken goals are cut into utterances and recognised (fields of all backends)."""

    model_config = pydantic.ConfigDict(extra='forbid')
    SECTION = 'speech'

    backend: Literal['pocketsphinx', 'faster_whisper', 'whisper_cpp', 'openai'] = 'pocketsphinx'
    model: Optional[str] = pydantic.Field(
        None, description='pocketsphinx: an acoustic model folder (default: the en-us model in '
                          'the wheel); faster_whisper: a CTranslate2 model folder; whisper_cpp: '
                          'a ggml model file; openai: the model name the server serves.')
    language: str = pydantic.Field('en', description='Spoken language (whisper backends).')
    # Vocabulary biasing from the gallery: pocketsphinx gets a language model built from the
    # descriptions, whisper an initial prompt of their words.
    vocabulary: Literal['gallery', 'none'] = 'gallery'
    phrases: list[str] = pydantic.Field(
        default_factory=list, description='Extra phrases for the vocabulary (place names, '
                                          'words users say that the gallery text lacks).')
    language_model: Optional[str] = pydantic.Field(
        None, description='pocketsphinx: an ARPA or binary LM file used instead of the built one.')
    dictionary: Optional[str] = pydantic.Field(
        None, description="pocketsphinx: a pronunciation dictionary instead of the wheel's.")
    # Utterances: Silero VAD probability per 32 ms frame, cut after a silence or a length.
    vad_threshold: float = pydantic.Field(0.5, gt=0.0, lt=1.0)
    silence_timeout_s: float = pydantic.Field(
        0.5, ge=0.1, le=10.0, description='Silence that ends an utterance.')
    max_utterance_s: float = pydantic.Field(
        20.0, ge=1.0, le=300.0, description='Longest utterance; longer speech is cut here.')
    min_speech_s: float = pydantic.Field(
        0.25, ge=0.0, le=10.0, description='Shorter bursts (clicks, coughs) are ignored.')
    preroll_s: float = pydantic.Field(
        0.3, ge=0.0, le=2.0, description='Audio kept from before the VAD fired.')
    threads: int = pydantic.Field(1, ge=1, le=64, description='CPU threads (whisper backends).')
    device: str = pydantic.Field('cpu', description="faster_whisper: 'cpu', 'cuda' or 'auto'.")
    compute_type: str = pydantic.Field('int8', description='faster_whisper: int8, float16, ...')
    # openai backend: an OpenAI-compatible /audio/transcriptions server (same keys as the
    # captioner and reranker sections).
    base_url: str = 'http://127.0.0.1:8000/v1'
    api_key_env: Optional[str] = 'OPENAI_API_KEY'
    timeout_s: float = pydantic.Field(30.0, gt=0, description='Total seconds per request.')
    max_response_bytes: int = pydantic.Field(262_144, ge=1024)
    max_retries: int = pydantic.Field(2, ge=0, le=20)
    retry_backoff_s: float = pydantic.Field(0.5, ge=0)
    concurrency: int = pydantic.Field(1, ge=1, le=16)
