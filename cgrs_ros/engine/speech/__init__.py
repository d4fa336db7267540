"""Spoken goals: audio sources, voice activity detection, recognisers and the listener.

Pure Python (no rclpy); ``cgrs_ros/nodes/voice_node.py`` is the ROS shell around it.

- ``audio``: PCM chunks checked and resampled to 16 kHz; WAV file/folder and microphone sources.
- ``vad``: Silero VAD (ONNX, no torch) and the utterance segmenter.
- ``vocabulary``: the gallery's words, as a language model or a prompt for the recogniser.
- ``recognisers``: the ``speech.backend`` registry (pocketsphinx, faster_whisper, whisper_cpp,
  openai).
- ``listener``: the pipeline and its trigger policy (always, push-to-talk, wake phrase).
"""

from cgrs_ros.engine.speech.settings import BACKENDS, SpeechSettings

__all__ = ['BACKENDS', 'SpeechSettings']
