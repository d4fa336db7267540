"""Recogniser backends: one utterance of 16 kHz mono audio in, text and a confidence out.

The listener calls ``start()`` when an utterance begins, ``feed(samples)`` as its audio arrives
and ``finish()`` when the VAD says it ended. pocketsphinx decodes while the audio arrives
(little is left to do at the end of speech); the whisper backends and the openai server take
the whole utterance at ``finish()``.

- ``pocketsphinx``: offline; the en-us acoustic model and dictionary ship in the wheel. With
  the gallery vocabulary it decodes with a trigram model of the gallery's sentences.
- ``faster_whisper``: a CTranslate2 Whisper model folder the user provides.
- ``whisper_cpp``: a ggml Whisper model file the user provides (pywhispercpp).
- ``openai``: an OpenAI-compatible ``/audio/transcriptions`` server (faster-whisper-server,
  speaches, vLLM, the whisper.cpp server) through the shared bounded client.
"""

import abc
import dataclasses
import io
import math
from pathlib import Path
import tempfile

from cgrs_ros.engine.errors import ConfigError, ModelLoadError
from cgrs_ros.engine.speech.settings import BACKENDS, SpeechSettings
from cgrs_ros.engine.speech.vocabulary import Vocabulary
import numpy as np

RATE = 16000


@dataclasses.dataclass(frozen=True)
class Recognition:
    """What a recogniser heard: the text (spoken form), a confidence in 0..1, or an error."""

    text: str = ''
    confidence: float = 0.0
    error: str = ''


def _pcm16(samples):
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype('<i2').tobytes()


class Recogniser(abc.ABC):
    """Base: collects an utterance's audio and transcribes it at ``finish()``."""

    name = ''

    def __init__(self, settings, vocabulary=None):
        self.settings = settings
        self.vocabulary = vocabulary or Vocabulary()
        self._chunks = []

    def start(self):
        """Begin an utterance."""
        self._chunks = []

    def feed(self, samples):
        """Add float32 16 kHz samples of the utterance in progress."""
        self._chunks.append(samples)

    def finish(self):
        """End the utterance and return its :class:`Recognition`."""
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)
        self._chunks = []
        return self.transcribe(audio)

    @abc.abstractmethod
    def transcribe(self, audio):
        """Return the Recognition of a whole utterance (float32 samples at 16 kHz)."""

    def close(self):
        """Release models, threads and connections."""


class PocketsphinxRecogniser(Recogniser):
    """CMU pocketsphinx, decoding while the audio arrives."""

    name = 'pocketsphinx'

    def __init__(self, settings, vocabulary=None):
        super().__init__(settings, vocabulary)
        try:
            from pocketsphinx import Decoder
        except ImportError:
            raise ModelLoadError('the pocketsphinx backend needs the pocketsphinx package; run '
                                 '`pip install pocketsphinx`') from None
        s = settings
        kwargs = {'loglevel': 'FATAL'}
        for key, value, what in (('hmm', s.model, 'acoustic model folder'),
                                 ('dict', s.dictionary, 'pronunciation dictionary'),
                                 ('lm', s.language_model, 'language model')):
            if value:
                if not Path(value).expanduser().exists():
                    raise ModelLoadError(f'speech.{"model" if key == "hmm" else key}: the '
                                         f'{what} {value} does not exist; fix the path')
                kwargs[key] = str(Path(value).expanduser())
        self.oov = []
        built = s.vocabulary == 'gallery' and not s.language_model and self.vocabulary.sentences
        if built:
            kwargs['lm'] = None  # the gallery model is added below, once the dictionary is known
        try:
            self._decoder = Decoder(**kwargs)
            if built:
                self._use_vocabulary()
        except RuntimeError as exc:
            raise ModelLoadError(f'pocketsphinx could not load its models ({exc}); check '
                                 'speech.model, speech.dictionary and speech.language_model') \
                from None

    def _use_vocabulary(self):
        words = {w for sentence in self.vocabulary.sentences for w in sentence.split()}
        oov = {w for w in words if self._decoder.lookup_word(w) is None}
        self.oov = sorted(oov)  # words without a pronunciation: cannot be recognised
        known = [' '.join(w for w in sentence.split() if w not in oov)
                 for sentence in self.vocabulary.sentences]
        with tempfile.TemporaryDirectory(prefix='cgrs-speech-') as folder:
            path = Path(folder) / 'gallery.arpa'
            path.write_text(Vocabulary([k for k in known if k]).arpa(), encoding='utf-8')
            self._decoder.add_lm_file('gallery', str(path))
        self._decoder.activate_search('gallery')

    def start(self):
        """Begin decoding an utterance."""
        self._decoder.start_utt()

    def feed(self, samples):
        """Decode the utterance's next samples now, so little is left for the end of speech."""
        self._decoder.process_raw(_pcm16(samples))

    def finish(self):
        """Return the best hypothesis and a confidence.

        The confidence is the lattice posterior of the best path taken per word (its geometric
        mean over the words), so long and short utterances compare.
        """
        self._decoder.end_utt()
        hyp = self._decoder.hyp()
        if hyp is None or not hyp.hypstr.strip():
            return Recognition('', 0.0)
        words = hyp.hypstr.split()
        probability = min(1.0, max(0.0, float(hyp.prob)))
        return Recognition(hyp.hypstr, probability ** (1.0 / len(words)))

    def transcribe(self, audio):
        """Decode a whole utterance at once."""
        self.start()
        self.feed(audio)
        return self.finish()


def _local_model(settings, backend, kind, fetch, package, module):
    """Return the checked local model path, then the imported ``module``; ModelLoadError if not."""
    if not settings.model:
        raise ModelLoadError(f'speech.model is empty; the {backend} backend needs a local {kind} '
                             f'({fetch}), then set speech.model to it')
    path = Path(settings.model).expanduser()
    exists = path.is_dir() if kind.endswith('folder') else path.is_file()
    if not exists:
        raise ModelLoadError(f'speech.model {path} is not a {kind}; the {backend} backend loads '
                             f'only local models: {fetch}, then set speech.model to it')
    try:
        return path, __import__(module, fromlist=['_'])
    except ImportError as exc:
        raise ModelLoadError(f'the {backend} backend needs the {package} package ({exc}); run '
                             f'`pip install {package}`') from None


def _mean_logprob_confidence(logprobs):
    values = [v for v in logprobs if v is not None and math.isfinite(v)]
    return math.exp(sum(values) / len(values)) if values else 1.0


class FasterWhisperRecogniser(Recogniser):
    """faster-whisper (CTranslate2) with a model folder the user provides."""

    name = 'faster_whisper'

    def __init__(self, settings, vocabulary=None):
        super().__init__(settings, vocabulary)
        path, module = _local_model(
            settings, self.name, 'model folder',
            'on a machine with internet run `huggingface-cli download Systran/faster-whisper-'
            'small.en --local-dir /models/faster-whisper-small.en` and copy the folder here',
            'faster-whisper', 'faster_whisper')
        try:
            self._model = module.WhisperModel(str(path), device=settings.device,
                                              compute_type=settings.compute_type,
                                              cpu_threads=settings.threads)
        except Exception as exc:  # noqa: B902 - CTranslate2 raises plain RuntimeErrors
            raise ModelLoadError(f'faster-whisper could not load {path} ({exc}); it must be a '
                                 'CTranslate2 Whisper model folder (model.bin, config.json)') \
                from None
        self._prompt = self.vocabulary.prompt() if settings.vocabulary == 'gallery' else None

    def transcribe(self, audio):
        """Transcribe with the vocabulary as initial prompt; confidence from avg_logprob."""
        segments, _ = self._model.transcribe(audio, language=self.settings.language,
                                             initial_prompt=self._prompt, beam_size=5)
        segments = list(segments)
        text = ' '.join(seg.text.strip() for seg in segments).strip()
        return Recognition(text, _mean_logprob_confidence([s.avg_logprob for s in segments])
                           if text else 0.0)


class WhisperCppRecogniser(Recogniser):
    """whisper.cpp through pywhispercpp, with a ggml model file the user provides."""

    name = 'whisper_cpp'

    def __init__(self, settings, vocabulary=None):
        super().__init__(settings, vocabulary)
        path, module = _local_model(
            settings, self.name, 'ggml model file',
            'download ggml-base.en.bin with models/download-ggml-model.sh base.en of whisper.cpp '
            'on a machine with internet and copy it here',
            'pywhispercpp', 'pywhispercpp.model')
        try:
            self._model = module.Model(str(path), n_threads=settings.threads,
                                       print_progress=False, print_realtime=False)
        except Exception as exc:  # noqa: B902 - whisper.cpp reports failures as RuntimeError
            raise ModelLoadError(f'whisper.cpp could not load {path} ({exc}); it must be a ggml '
                                 'Whisper model file') from None
        self._prompt = self.vocabulary.prompt() if settings.vocabulary == 'gallery' else ''

    def transcribe(self, audio):
        """Transcribe with the vocabulary as initial prompt (whisper.cpp gives no confidence)."""
        segments = self._model.transcribe(audio, language=self.settings.language,
                                          initial_prompt=self._prompt)
        text = ' '.join(seg.text.strip() for seg in segments).strip()
        return Recognition(text, 1.0 if text else 0.0)


class OpenAIRecogniser(Recogniser):
    """An OpenAI-compatible ``/audio/transcriptions`` server (the utterance sent as a WAV)."""

    name = 'openai'

    def __init__(self, settings, vocabulary=None):
        super().__init__(settings, vocabulary)
        from cgrs_ros.engine.openai_client import OpenAIClient
        self._client = OpenAIClient(settings, 'speech', thread_name_prefix='cgrs-speech',
                                    path='/audio/transcriptions')
        self._prompt = self.vocabulary.prompt() if settings.vocabulary == 'gallery' else ''

    def transcribe(self, audio):
        """POST the utterance; confidence from the segments' avg_logprob, if any."""
        import soundfile
        buffer = io.BytesIO()
        soundfile.write(buffer, audio, RATE, format='WAV', subtype='PCM_16')
        fields = {'model': self.settings.model, 'language': self.settings.language,
                  'response_format': 'verbose_json'}
        if self._prompt:
            fields['prompt'] = self._prompt
        reply = self._client.post(fields, files={
            'file': ('utterance.wav', buffer.getvalue(), 'audio/wav')})
        if not reply.ok:
            return Recognition(error=reply.error)
        payload = reply.payload
        if not isinstance(payload, dict) or not isinstance(payload.get('text'), str):
            return Recognition(error=f'{self._client.url} answered without a "text" field; is it '
                                     'an /audio/transcriptions endpoint?')
        text = payload['text'].strip()
        segments = payload.get('segments') if isinstance(payload.get('segments'), list) else []
        logprobs = [seg.get('avg_logprob') for seg in segments if isinstance(seg, dict)]
        return Recognition(text, _mean_logprob_confidence(
            [v for v in logprobs if isinstance(v, (int, float))]) if text else 0.0)

    def close(self):
        """Close the HTTP client."""
        self._client.close()


_BACKENDS = {cls.name: cls for cls in (PocketsphinxRecogniser, FasterWhisperRecogniser,
                                       WhisperCppRecogniser, OpenAIRecogniser)}


def make_recogniser(section, vocabulary=None):
    """Build the recogniser a ``speech`` config section names (ConfigError/ModelLoadError)."""
    settings = SpeechSettings.from_section(section)
    if settings.backend not in _BACKENDS:
        raise ConfigError(f'speech.backend {settings.backend!r} is unknown; use one of '
                          f'{", ".join(BACKENDS)}')
    return _BACKENDS[settings.backend](settings, vocabulary)
