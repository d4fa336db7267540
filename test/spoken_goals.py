"""Spoken goals for the voice tests and benchmarks/voice_figures.py.

espeak-ng (Debian; tools/setup_env.sh installs it) speaks goal texts into WAV files, and the
goals come from a gallery's own descriptions, as a user reading out what a place looks like
would say them. Word error rates compare the spoken forms (lower case, hyphens as spaces,
numbers as words), so "L-shaped" and "l shaped" are the same words.
"""

import random
import shutil
import subprocess

from cgrs_ros.engine.gallery import load_gallery
from cgrs_ros.engine.speech.audio import read_audio
from cgrs_ros.engine.speech.vocabulary import COMMAND_PHRASES, spoken_form
import numpy as np

ESPEAK = shutil.which('espeak-ng')
NO_ESPEAK = ('espeak-ng is not installed; `make setup` as root installs it (apt-get install '
             'espeak-ng)')


def speak(text, path, voice='en-us', speed=150):
    """Write ``text`` spoken by espeak-ng to the WAV file ``path`` and return the path."""
    subprocess.run([ESPEAK, '-v', voice, '-s', str(speed), '-w', str(path), text], check=True,
                   capture_output=True)
    return path


def gallery_goals(gallery_dir, count, seed=0):
    """Return ``count`` goals made of the gallery's description sentences (deterministic).

    Every other goal starts with a command phrase ("fly to ..."), as spoken goals do.
    """
    sentences = set()
    for item in load_gallery(gallery_dir, check_images='none'):
        for text in item.descriptions:
            sentences.update(part.strip() for part in text.replace(';', '.').split('.')
                             if len(part.split()) >= 4)
    rng = random.Random(seed)
    goals = rng.sample(sorted(sentences), count)
    return [f'{rng.choice(COMMAND_PHRASES[:5])} {goal[0].lower()}{goal[1:]}' if i % 2 else goal
            for i, goal in enumerate(goals)]


def feed_file(listener, path, chunk_s=0.1, tail_s=1.0):
    """Run a WAV file through ``listener.process`` in chunks, with ``tail_s`` of silence after."""
    samples, rate = read_audio(path)
    samples = np.concatenate([samples, np.zeros((int(tail_s * rate), samples.shape[1]),
                                                np.float32)])
    step = int(chunk_s * rate)
    for start in range(0, len(samples), step):
        listener.process(samples[start:start + step], rate)


def word_error_rate(references, hypotheses):
    """Return the corpus word error rate of hypotheses against references (spoken forms)."""
    import jiwer
    refs = [spoken_form(text) for text in references]
    hyps = [spoken_form(text) for text in hypotheses]
    return jiwer.wer(refs, hyps)
