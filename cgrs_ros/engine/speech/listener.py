"""The voice pipeline: audio chunks in, utterances (text, confidence, goal or not) out.

:class:`VoiceListener` takes chunks from any source at any rate (``feed``; thread-safe, never
blocks the caller), and on its own worker thread resamples them to 16 kHz, runs the VAD frame
by frame, cuts utterances and hands their audio to the recogniser while it arrives. When an
utterance ends it decides, in this order, whether its text becomes a goal:

1. the recogniser failed or heard nothing -> not sent, with the reason;
2. trigger ``wake_phrase``: the text must start with the wake phrase (which the vocabulary
   teaches the recogniser); the rest is the goal. The phrase alone opens a window of
   ``wake_timeout_s`` for the next utterance. Trigger ``push_to_talk``: only utterances that
   start while :meth:`arm` is in force are recognised at all;
3. confidence under ``min_confidence`` -> reported, not sent.

Bad audio never stops it: malformed chunks are reported by the caller (``problem``), clipping
and levels are measured per chunk, a backlog beyond ``max_queue_s`` drops the oldest audio
(counted), and an endless utterance is cut at ``max_utterance_s``.
"""

import collections
import dataclasses
import threading
import time

from cgrs_ros.engine.errors import ConfigError
from cgrs_ros.engine.speech.audio import clipped_share, level_db, RATE, Resampler, to_mono
from cgrs_ros.engine.speech.recognisers import make_recogniser, Recognition
from cgrs_ros.engine.speech.settings import SpeechSettings
from cgrs_ros.engine.speech.vad import FRAME, Segmenter, SileroVAD
from cgrs_ros.engine.speech.vocabulary import COMMAND_PHRASES, spoken_form, Vocabulary
import numpy as np

TRIGGERS = ('always', 'push_to_talk', 'wake_phrase')
WAKE_WEIGHT = 20          # the wake phrase counts as this many sentences in the vocabulary
CLIPPED_SHARE = 0.01      # more clipped samples than this in a chunk: report the input gain


@dataclasses.dataclass
class Utterance:
    """One utterance and what became of it."""

    text: str                  # what was heard, in the gallery's spelling
    goal: str                  # the goal text (wake phrase removed); '' when not sent
    confidence: float
    audio_s: float             # length of the utterance's audio
    recognition_s: float       # recogniser time after the utterance ended
    end_of_speech: float       # wall time (time.time()) the last voiced audio arrived
    trigger: str
    sent: bool
    reason: str                # why it was not sent; '' when sent
    backend: str
    ended: str                 # silence | max_length | flush


class Listening:
    """A push-to-talk request: waits for the next utterance (see VoiceListener.arm)."""

    def __init__(self, deadline):
        self.deadline = deadline          # speech must start before this (monotonic)
        self.state = 'waiting'            # waiting | speech | recognising | done
        self.speech_s = 0.0
        self.result = None                # the Utterance, when one was heard
        self.error = ''
        self.done = threading.Event()

    def finish(self, result=None, error=''):
        """Complete the request with an utterance or an error."""
        self.result, self.error, self.state = result, error, 'done'
        self.done.set()


class VoiceListener:
    """Audio chunks in; ``on_utterance(Utterance)`` for every utterance heard."""

    def __init__(self, settings, recogniser, vad=None, vocabulary=None, trigger='always',
                 wake_phrase='', wake_timeout_s=5.0, min_confidence=0.5, on_utterance=None,
                 max_queue_s=30.0):
        if trigger not in TRIGGERS:
            raise ConfigError(f'trigger {trigger!r} is not one of {", ".join(TRIGGERS)}')
        self.settings = SpeechSettings.from_section(settings)
        s = self.settings
        self.recogniser = recogniser
        self.vad = vad or SileroVAD()
        self.vocabulary = vocabulary or Vocabulary()
        self.trigger = trigger
        self.wake_words = spoken_form(wake_phrase).split()
        if trigger == 'wake_phrase' and not self.wake_words:
            raise ConfigError('trigger wake_phrase needs a wake_phrase, e.g. "hello drone"')
        self.wake_timeout_s = wake_timeout_s
        self.min_confidence = min_confidence
        self.on_utterance = on_utterance or (lambda utterance: None)
        self.segmenter = Segmenter(s.vad_threshold, s.silence_timeout_s, s.max_utterance_s,
                                   s.min_speech_s, s.preroll_s)
        self._resample = Resampler()
        self._pending = np.zeros(0, np.float32)
        self._queue = collections.deque()
        self._queued = 0                       # samples waiting, at their own rates' seconds
        self._max_queue_s = max_queue_s
        self._cv = threading.Condition()
        self._stop = False
        self._thread = None
        self._listening = None                 # Listening of push-to-talk, or None
        self._wake_until = 0.0                 # monotonic end of a window opened by the phrase
        self._recognising = False              # the recogniser has the current utterance
        self._utterance_trigger = trigger
        self.stats = {'level_db': -120.0, 'clipped_share': 0.0, 'vad': 'silence',
                      'vad_probability': 0.0, 'input_rate': 0, 'utterances': 0, 'sent': 0,
                      'dropped_audio_s': 0.0, 'last_transcript': '', 'last_reason': '',
                      'last_confidence': 0.0, 'problem': '', 'problem_at': 0.0,
                      'problems': 0, 'chunks': 0}

    # ---- input (any thread) --------------------------------------------------------------
    def feed(self, samples, rate, arrival=None):
        """Queue a chunk ``(frames,)`` or ``(frames, channels)`` at ``rate`` Hz; never blocks."""
        arrival = time.time() if arrival is None else arrival
        with self._cv:
            self._queue.append((samples, rate, arrival))
            self._queued += len(samples) / rate
            while self._queued > self._max_queue_s and len(self._queue) > 1:
                old, old_rate, _ = self._queue.popleft()
                self._queued -= len(old) / old_rate
                self.stats['dropped_audio_s'] += len(old) / old_rate
            self._cv.notify()

    def problem(self, text):
        """Record a problem with the input (a malformed chunk, a source error) for status."""
        self.stats['problem'] = text
        self.stats['problem_at'] = time.monotonic()
        self.stats['problems'] += 1

    def arm(self, timeout_s):
        """Listen for the next utterance (push-to-talk); return the :class:`Listening`."""
        with self._cv:
            if self._listening is None or self._listening.done.is_set():
                self._listening = Listening(time.monotonic() + timeout_s)
            else:
                self._listening.deadline = max(self._listening.deadline,
                                               time.monotonic() + timeout_s)
            return self._listening

    def cancel(self, listening, error):
        """End a push-to-talk request that its caller gave up on."""
        with self._cv:
            if not listening.done.is_set():
                listening.finish(error=error)

    # ---- worker --------------------------------------------------------------------------
    def start(self):
        """Start the worker thread that processes queued chunks."""
        self._thread = threading.Thread(target=self._work, name='cgrs-voice', daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop the worker (an utterance in progress is finished first) and the recogniser."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30.0)
        self.recogniser.close()

    def _work(self):
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait(0.2)
                    self._check_listening()
                if self._stop and not self._queue:
                    break
                samples, rate, arrival = self._queue.popleft()
                self._queued -= len(samples) / rate
            try:
                self.process(samples, rate, arrival)
            except Exception as exc:  # noqa: B902 - one bad chunk must not end the listener
                self.problem(f'audio chunk failed: {type(exc).__name__}: {exc}')
        self.flush()

    def process(self, samples, rate, arrival=None):
        """Run one chunk through the pipeline now (the worker's step; tests call it directly)."""
        arrival = time.time() if arrival is None else arrival
        mono = to_mono(samples)
        self.stats['chunks'] += 1
        self.stats['input_rate'] = int(rate)
        self.stats['level_db'] = level_db(mono)
        self.stats['clipped_share'] = share = clipped_share(mono)
        if share > CLIPPED_SHARE:
            self.problem(f'clipped audio ({share:.0%} of samples at full scale); lower the '
                         'input gain')
        audio = np.concatenate([self._pending, self._resample(mono, rate)])
        whole = len(audio) // FRAME * FRAME
        self._pending = audio[whole:]
        for frame in audio[:whole].reshape(-1, FRAME):
            probability = self.vad(frame)
            self.stats['vad_probability'] = probability
            for kind, payload in self.segmenter.push(frame, probability, arrival):
                self._on_event(kind, payload)
        self.stats['vad'] = 'speech' if self.segmenter.in_speech else 'silence'
        self._check_listening()

    def flush(self):
        """End an utterance in progress (the audio stopped)."""
        for kind, payload in self.segmenter.flush():
            self._on_event(kind, payload)

    def _check_listening(self):
        listening = self._listening
        if (listening is not None and listening.state == 'waiting'
                and time.monotonic() > listening.deadline):
            listening.finish(error='no speech started before the listen timeout')

    def _on_event(self, kind, payload):
        if kind == 'start':
            self._recognising = self._wants(time.monotonic())
            if self._recognising:
                self.recogniser.start()
                for frame in payload:
                    self.recogniser.feed(frame)
            if self._listening is not None and self._listening.state == 'waiting':
                self._listening.state = 'speech'
        elif kind == 'frame':
            if self._recognising:
                self.recogniser.feed(payload)
            if self._listening is not None and self._listening.state == 'speech':
                self._listening.speech_s += len(payload) / RATE
        elif self._recognising:
            self._recognising = False
            self._finish(payload, dropped=kind == 'drop')

    def _wants(self, now):
        """Whether the utterance starting now is recognised (and under which trigger)."""
        listening = self._listening
        if listening is not None and listening.state == 'waiting':
            self._utterance_trigger = 'push_to_talk'
            return True
        if self.trigger == 'wake_phrase' and now < self._wake_until:
            self._utterance_trigger = 'wake_window'
            return True
        self._utterance_trigger = self.trigger
        return self.trigger != 'push_to_talk'

    def _finish(self, segment, dropped):
        listening = self._listening if (
            self._listening is not None and self._listening.state == 'speech') else None
        if listening is not None:
            listening.state = 'recognising'
        started = time.monotonic()
        try:
            recognition = self.recogniser.finish()
        except Exception as exc:  # noqa: B902 - a backend failure is this utterance's
            recognition = Recognition(error=f'{type(exc).__name__}: {exc}')
        took = time.monotonic() - started
        if dropped:
            if listening is not None:
                listening.state = 'waiting'  # a click: keep waiting for the real utterance
            return
        utterance = self._decide(recognition, segment, took)
        self.stats['utterances'] += 1
        self.stats['sent'] += utterance.sent
        self.stats['last_transcript'] = utterance.text
        self.stats['last_reason'] = utterance.reason
        self.stats['last_confidence'] = utterance.confidence
        if listening is not None:
            listening.finish(utterance)
        self.on_utterance(utterance)

    def _decide(self, recognition, segment, took):
        heard = ' '.join(recognition.text.split())
        goal, reason = heard, ''
        trigger = self._utterance_trigger
        if recognition.error:
            reason = f'recogniser failed: {recognition.error}'
        elif not heard:
            reason = 'nothing recognised'
        elif trigger == 'wake_phrase':
            goal = self._after_wake_phrase(heard)
            if goal is None:
                reason = f'no wake phrase ("{" ".join(self.wake_words)}") at the start'
            elif not goal:
                self._wake_until = time.monotonic() + self.wake_timeout_s
                reason = f'wake phrase heard; listening {self.wake_timeout_s:g} s for the goal'
        if not reason and recognition.confidence < self.min_confidence:
            reason = (f'confidence {recognition.confidence:.2f} is under min_confidence '
                      f'{self.min_confidence:g}; say it again')
        if trigger == 'wake_window' and not reason:
            self._wake_until = 0.0
        return Utterance(
            text=self.vocabulary.written(heard), goal='' if reason else self.vocabulary.written(
                goal), confidence=recognition.confidence, audio_s=segment.duration_s,
            recognition_s=took, end_of_speech=segment.end_of_speech, trigger=trigger,
            sent=not reason, reason=reason, backend=self.recogniser.name, ended=segment.reason)

    def _after_wake_phrase(self, heard):
        """Return the words after the wake phrase when the text starts with it, else None."""
        words = spoken_form(heard).split()
        size = len(self.wake_words)
        # The phrase may follow a word the recogniser made of a breath or a click.
        for start in range(0, min(2, len(words) - size + 1)):
            if words[start:start + size] == self.wake_words:
                return ' '.join(words[start + size:])
        return None


def open_listener(section, gallery_dir='', trigger='always', wake_phrase='', **kwargs):
    """Build a VoiceListener for a ``speech`` section: vocabulary, recogniser and VAD.

    The vocabulary comes from the gallery's descriptions when ``gallery_dir`` is given and the
    section asks for it; the wake phrase is added to it so the recogniser expects it. Raises
    ConfigError, GalleryError or ModelLoadError with the fix.
    """
    settings = SpeechSettings.from_section(section)
    phrases = list(settings.phrases)
    if wake_phrase:
        # Weighted like a frequent sentence: goals start with it, so "<s> hello drone" must be
        # likelier than the gallery's "<s> a drone ...".
        phrases += [wake_phrase] * WAKE_WEIGHT
        phrases += [f'{wake_phrase} {command}' for command in COMMAND_PHRASES]
    if settings.vocabulary == 'gallery' and gallery_dir:
        vocabulary = Vocabulary.from_gallery(gallery_dir, phrases)
    elif settings.vocabulary == 'gallery' and settings.phrases:
        vocabulary = Vocabulary.from_texts([], phrases, source='phrases')
    else:
        vocabulary = Vocabulary()  # the recogniser's general English model
    recogniser = make_recogniser(settings, vocabulary)
    missing = [w for w in spoken_form(wake_phrase).split() if w in getattr(recogniser, 'oov', ())]
    if trigger == 'wake_phrase' and missing:
        recogniser.close()
        raise ConfigError(f'wake_phrase {wake_phrase!r}: {", ".join(missing)} is not in the '
                          'pronunciation dictionary; choose other words or add them with '
                          'speech.dictionary')
    return VoiceListener(settings, recogniser, SileroVAD(), vocabulary, trigger, wake_phrase,
                         **kwargs)
