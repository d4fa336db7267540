"""Voice activity: Silero VAD per 32 ms frame, and utterances cut from it.

:class:`SileroVAD` runs the ONNX model that ships inside PyPI's ``silero-vad`` wheel with
onnxruntime. The wheel's own wrappers take torch tensors (and importing the package imports
torch); the streaming step below is the same computation on numpy arrays (64 samples of
context before each 512-sample frame, the recurrent state carried between frames), so the node
runs without torch.

:class:`Segmenter` turns per-frame probabilities into utterances: speech starts at the first
frame over the threshold (with ``preroll_s`` of audio from before it), and ends after
``silence_timeout_s`` under it or at ``max_utterance_s``. Bursts with less than
``min_speech_s`` of speech are dropped.
"""

import collections
import dataclasses
import importlib.util
from pathlib import Path

from cgrs_ros.engine.errors import ModelLoadError
import numpy as np

FRAME = 512             # samples per VAD frame at 16 kHz (32 ms)
CONTEXT = 64            # samples of the previous frame the model sees before each frame
FRAME_S = FRAME / 16000


def silero_model_path():
    """Return the path of the Silero VAD ONNX model inside the installed silero-vad wheel."""
    spec = importlib.util.find_spec('silero_vad')  # finds the package without importing torch
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError('Silero VAD is not installed; run `pip install silero-vad '
                             'onnxruntime` (requirements/voice.txt)')
    path = Path(list(spec.submodule_search_locations)[0]) / 'data' / 'silero_vad.onnx'
    if not path.is_file():
        raise ModelLoadError(f'{path} is missing from the silero-vad package; reinstall it '
                             'with `pip install --force-reinstall silero-vad`')
    return path


class SileroVAD:
    """Speech probability of each 512-sample frame of a 16 kHz stream."""

    def __init__(self):
        try:
            import onnxruntime
        except ImportError:
            raise ModelLoadError('Silero VAD needs onnxruntime; run `pip install onnxruntime`') \
                from None
        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            str(silero_model_path()), sess_options=options, providers=['CPUExecutionProvider'])
        self._rate = np.array(16000, dtype=np.int64)
        self.reset()

    def reset(self):
        """Forget the stream so far (a new, unrelated stream follows)."""
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)

    def __call__(self, frame):
        """Return P(speech) of one frame of FRAME float32 samples."""
        x = np.concatenate([self._context, frame])[None, :]
        out, self._state = self._session.run(
            None, {'input': x, 'state': self._state, 'sr': self._rate})
        self._context = frame[-CONTEXT:]
        return float(out[0, 0])


@dataclasses.dataclass
class Segment:
    """A finished utterance: why it ended and how much of it was speech."""

    reason: str             # 'silence' | 'max_length' | 'flush'
    frames: int             # frames in the utterance (preroll included)
    speech_frames: int      # frames over the threshold
    end_of_speech: float    # arrival time of the last frame over the threshold

    @property
    def duration_s(self):
        """Return the utterance length in seconds."""
        return self.frames * FRAME_S

    @property
    def speech_s(self):
        """Return the seconds of speech in it."""
        return self.speech_frames * FRAME_S


class Segmenter:
    """Frames and their P(speech) in; start/frame/end events out (a small state machine).

    ``push(frame, probability, arrival)`` returns a list of events: ``('start', [frames])``
    with the preroll and the first speech frame, ``('frame', frame)`` while in speech, and
    ``('end', Segment)`` or ``('drop', Segment)`` (too little speech) when it ends.
    """

    def __init__(self, threshold=0.5, silence_timeout_s=0.5, max_utterance_s=20.0,
                 min_speech_s=0.25, preroll_s=0.3):
        self.threshold = threshold
        # Silero's own hysteresis: once in speech, a frame counts as silence only well under
        # the threshold, so a soft syllable does not end the utterance.
        self.off_threshold = max(0.01, threshold - 0.15)
        self.silence_frames = max(1, round(silence_timeout_s / FRAME_S))
        self.max_frames = max(1, round(max_utterance_s / FRAME_S))
        self.min_speech_frames = round(min_speech_s / FRAME_S)
        self._preroll = collections.deque(maxlen=max(0, round(preroll_s / FRAME_S)))
        self.in_speech = False
        self._frames = self._speech = self._silence = 0
        self._end_of_speech = 0.0

    def push(self, frame, probability, arrival):
        """Advance by one frame; return the events it causes."""
        if not self.in_speech:
            if probability < self.threshold:
                self._preroll.append(frame)
                return []
            self.in_speech = True
            start = [*self._preroll, frame]
            self._preroll.clear()
            self._frames, self._speech, self._silence = len(start), 1, 0
            self._end_of_speech = arrival
            return [('start', start)]
        self._frames += 1
        if probability >= self.off_threshold:
            self._speech += 1
            self._silence = 0
            self._end_of_speech = arrival
        else:
            self._silence += 1
        events = [('frame', frame)]
        if self._silence >= self.silence_frames:
            events.append(self._finish('silence'))
        elif self._frames >= self.max_frames:
            events.append(self._finish('max_length'))
        return events

    def flush(self):
        """End an utterance in progress (the stream stopped); return its events."""
        return [self._finish('flush')] if self.in_speech else []

    def _finish(self, reason):
        segment = Segment(reason, self._frames, self._speech, self._end_of_speech)
        self.in_speech = False
        return ('end' if self._speech >= self.min_speech_frames else 'drop', segment)
