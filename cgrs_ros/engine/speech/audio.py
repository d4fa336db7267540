"""Audio in: PCM chunks checked and turned into 16 kHz mono float32, and where they come from.

Every source (a WAV file or folder, the microphone through PortAudio, chunks from a ROS topic)
hands the listener ``(samples, sample_rate)`` with samples shaped ``(frames,)`` or
``(frames, channels)``. :func:`decode_pcm` turns the bytes of an ``AudioData`` message into that
and refuses a malformed chunk with one sentence; :class:`Resampler` brings any rate to 16 kHz
with soxr's streaming resampler (state kept between chunks, so chunk edges leave no clicks).
"""

import math
from pathlib import Path
import threading
import time

from cgrs_ros.engine.errors import CgrsError
import numpy as np

RATE = 16000                      # what the VAD and the recognisers take
MIN_RATE, MAX_RATE = 8000, 192000
MAX_CHANNELS = 32
ENCODINGS = {'S16LE': np.dtype('<i2'), 'F32LE': np.dtype('<f4')}
CLIP_LEVEL = 0.999                # |sample| at or above this counts as clipped
SILENCE_DB = -120.0               # level reported for digital silence
AUDIO_SUFFIXES = ('.wav', '.flac', '.ogg')


class AudioError(CgrsError):
    """Audio that cannot be used (malformed chunk, unreadable file, no microphone)."""


def decode_pcm(data, sample_rate, channels, encoding):
    """Return the samples of one PCM chunk as float32 ``(frames, channels)``; AudioError if bad."""
    if encoding not in ENCODINGS:
        raise AudioError(f'audio encoding {encoding!r} is not one of {", ".join(ENCODINGS)}; '
                         'send raw PCM (S16LE int16 or F32LE float32)')
    if not MIN_RATE <= sample_rate <= MAX_RATE:
        raise AudioError(f'sample_rate {sample_rate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz; '
                         'set the rate the audio was captured at')
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f'channels {channels} is not 1-{MAX_CHANNELS}; set the channel count')
    frame_bytes = ENCODINGS[encoding].itemsize * channels
    if len(data) % frame_bytes:
        raise AudioError(f'{len(data)} bytes are not whole frames of {channels} x {encoding} '
                         f'({frame_bytes} bytes each); send whole frames')
    samples = np.frombuffer(bytes(data), dtype=ENCODINGS[encoding]).reshape(-1, channels)
    if encoding == 'S16LE':
        return samples.astype(np.float32) / 32768.0
    samples = samples.astype(np.float32)
    if not np.isfinite(samples).all():
        raise AudioError('F32LE audio holds NaN or infinite samples; send finite samples '
                         'in -1..1')
    return samples


def to_mono(samples):
    """Return float32 mono samples from ``(frames,)`` or ``(frames, channels)`` audio."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    elif samples.ndim != 1:
        raise AudioError(f'audio has shape {samples.shape}; pass (frames,) or '
                         '(frames, channels)')
    return np.clip(np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)


def level_db(samples):
    """Return the RMS level of ``samples`` in dBFS (SILENCE_DB for digital silence)."""
    if samples.size == 0:
        return SILENCE_DB
    rms = math.sqrt(float(np.mean(np.square(samples, dtype=np.float64))))
    return max(SILENCE_DB, 20.0 * math.log10(rms)) if rms > 0 else SILENCE_DB


def clipped_share(samples):
    """Return the share of samples at full scale (a sign of an input gain set too high)."""
    return float(np.mean(np.abs(samples) >= CLIP_LEVEL)) if samples.size else 0.0


class Resampler:
    """Any input rate to 16 kHz mono, chunk by chunk (a new stream when the rate changes)."""

    def __init__(self):
        import soxr
        self._soxr = soxr
        self._stream = None
        self.rate = None

    def __call__(self, mono, rate):
        """Return ``mono`` (float32 at ``rate``) resampled to RATE."""
        if rate == RATE:
            self._stream, self.rate = None, rate
            return mono
        if self._stream is None or rate != self.rate:
            self._stream = self._soxr.ResampleStream(rate, RATE, 1, dtype='float32')
            self.rate = rate
        return self._stream.resample_chunk(mono)


# ---- sources ------------------------------------------------------------------------------

def audio_files(path):
    """Return the audio files of ``path`` (one file, or a folder's files sorted by name)."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
        if not files:
            raise AudioError(f'audio folder {path} holds no {"/".join(AUDIO_SUFFIXES)} files; '
                             'put the recordings there or name one file')
        return files
    if not path.is_file():
        raise AudioError(f'audio file {path} does not exist; pass a WAV file or a folder of them')
    return [path]


def read_audio(path):
    """Return ``(samples float32 (frames, channels), rate)`` of a whole audio file."""
    import soundfile
    try:
        samples, rate = soundfile.read(str(path), dtype='float32', always_2d=True)
    except (RuntimeError, OSError, soundfile.LibsndfileError) as exc:
        raise AudioError(f'cannot read audio file {path} ({exc}); pass a WAV/FLAC/OGG '
                         'file') from None
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f'audio file {path} has {rate} Hz, outside {MIN_RATE}-{MAX_RATE} Hz; '
                         'resample it first')
    return samples, rate


class FileSource:
    """Plays audio files (one, or a folder's in name order) into ``deliver(samples, rate)``.

    ``realtime`` paces chunks as a microphone would (for replays and latency figures);
    otherwise as fast as the listener takes them. ``gap_s`` of silence follows each file so
    one recording's utterance ends before the next begins. Runs on its own thread.
    """

    def __init__(self, path, deliver, chunk_s=0.1, realtime=True, gap_s=1.0, loop=False,
                 on_error=None):
        self.files = audio_files(path)
        self._deliver = deliver
        self._chunk_s = chunk_s
        self._realtime = realtime
        self._gap_s = gap_s
        self._loop = loop
        self._on_error = on_error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name='cgrs-audio-file', daemon=True)
        self.finished = threading.Event()

    def start(self):
        """Start playing on the source's thread."""
        self._thread.start()
        return self

    def stop(self):
        """Stop playing (returns once the thread has ended)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    def _run(self):
        started = time.monotonic()
        played = 0.0
        try:
            while not self._stop.is_set():
                for path in self.files:
                    try:
                        samples, rate = read_audio(path)
                    except AudioError as exc:
                        if self._on_error:
                            self._on_error(str(exc))
                        continue
                    gap = np.zeros((int(self._gap_s * rate), samples.shape[1]), np.float32)
                    samples = np.concatenate([samples, gap])
                    step = max(1, int(self._chunk_s * rate))
                    for start in range(0, len(samples), step):
                        if self._stop.is_set():
                            return
                        if self._realtime:
                            delay = started + played - time.monotonic()
                            if delay > 0:
                                self._stop.wait(delay)
                        chunk = samples[start:start + step]
                        self._deliver(chunk, rate)
                        played += len(chunk) / rate
                if not self._loop:
                    return
        finally:
            self.finished.set()


class MicrophoneSource:
    """The default (or a named) input device through PortAudio, via ``sounddevice``."""

    def __init__(self, deliver, device='', rate=None, chunk_s=0.1):
        try:
            import sounddevice
        except (ImportError, OSError) as exc:
            raise AudioError(f'the microphone needs sounddevice and PortAudio ({exc}); run '
                             '`pip install sounddevice` and `apt-get install libportaudio2`, '
                             'or use audio_source:=topic or file') from None
        device = device or None
        if isinstance(device, str) and device.isdigit():
            device = int(device)

        def callback(indata, frames, time_info, status):
            deliver(indata.copy(), rate)

        try:
            # The device's own rate (many refuse 16 kHz); the listener resamples.
            rate = rate or int(sounddevice.query_devices(device, 'input')['default_samplerate'])
            self._stream = sounddevice.InputStream(
                device=device, channels=1, samplerate=rate, dtype='float32',
                blocksize=int(chunk_s * rate), callback=callback)
        except (sounddevice.PortAudioError, ValueError) as exc:
            raise AudioError(f'cannot open microphone {device or "(default)"} ({exc}); list the '
                             'devices with `python -m sounddevice` and set audio_device, or use '
                             'audio_source:=topic or file') from None

    def start(self):
        """Start capturing (PortAudio calls back on its own thread)."""
        self._stream.start()
        return self

    def stop(self):
        """Stop capturing and release the device."""
        self._stream.stop()
        self._stream.close()
