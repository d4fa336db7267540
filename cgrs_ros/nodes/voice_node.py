"""voice_node: speak a goal. Audio in, a transcript out, the goal on ``goal_text`` when confident.

Topics (relative names live in the node's namespace, ``cgrs`` in the launch file, beside
retrieval_node, whose ``goal_text`` this node publishes on):

- audio from ``audio_source``: ``microphone`` (PortAudio, ``audio_device``), ``topic`` (sub
  ``audio``, cgrs_ros/AudioData: PCM chunks from a microphone bridge or the web console) or
  ``file`` (``audio_file``: a WAV file or folder, played in real time; for replays and tests).
- pub ``goal_text`` (std_msgs/String): the goal, when the utterance was triggered and its
  confidence >= ``min_confidence``.
- pub ``transcript`` (cgrs_ros/Transcript): every utterance recognised, sent or not, and why.
- pub ``/diagnostics``: audio level, clipping, VAD state, last transcript, input problems.
- service ``~/listen`` (std_srvs/Trigger): push-to-talk; the next utterance that starts within
  ``listen_timeout_s`` is recognised (the only way in with ``trigger: push_to_talk``).
- action ``~/listen_for_goal`` (cgrs_ros/Listen): the same, with feedback and the transcript.

The engine (cgrs_ros.engine.speech) does the work on its own threads; this node wires it up.
"""

import threading
import time

from cgrs_ros.action import Listen
from cgrs_ros.engine.errors import CgrsError
from cgrs_ros.msg import AudioData, Transcript
from cgrs_ros.nodes.parameters import declare_parameters, Param
from cgrs_ros.nodes.spin import spin_node
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.time import Time
from std_msgs.msg import String
from std_srvs.srv import Trigger

SOURCES = ('microphone', 'topic', 'file')
TRIGGERS = ('always', 'push_to_talk', 'wake_phrase')

PARAMETERS = (
    Param('gallery_dir', '', 'Gallery whose descriptions bias the recogniser (speech.vocabulary '
          'gallery); empty = no gallery vocabulary.', read_only=True),
    Param('config', '', 'Engine config YAML; its speech section picks the recogniser.',
          read_only=True),
    Param('audio_source', 'microphone', 'Where audio comes from.', choices=SOURCES,
          read_only=True),
    Param('audio_device', '', 'PortAudio input device (name or index); empty = the default.',
          read_only=True),
    Param('audio_file', '', 'WAV file or folder of them (audio_source file).', read_only=True),
    Param('file_realtime', True, 'Play audio_file at real-time pace (false: as fast as it goes).',
          read_only=True),
    Param('file_loop', False, 'Play audio_file again and again.', read_only=True),
    Param('trigger', 'always', 'always: every utterance; push_to_talk: only after ~/listen; '
          'wake_phrase: utterances starting with wake_phrase.', choices=TRIGGERS, read_only=True),
    Param('wake_phrase', 'hello drone', 'Words that open a goal (trigger wake_phrase).',
          read_only=True),
    Param('wake_timeout_s', 5.0, 'After the wake phrase alone, seconds to wait for the goal.',
          minimum=0.5, maximum=120.0),
    Param('min_confidence', 0.3, 'Transcripts under this confidence are reported, not sent.',
          minimum=0.0, maximum=1.0),
    Param('listen_timeout_s', 10.0, 'Push-to-talk: seconds for speech to start.',
          minimum=0.5, maximum=600.0),
    Param('max_queue_s', 30.0, 'Audio allowed to wait for processing; older audio is dropped.',
          minimum=1.0, maximum=600.0),
)


def _stamp(wall_time):
    return Time(nanoseconds=int(wall_time * 1e9)).to_msg()


class VoiceNode(Node):
    """Listens, recognises and sends goals; all audio work runs on the engine's threads."""

    def __init__(self, **kwargs):
        super().__init__('voice_node', **kwargs)
        self.params = declare_parameters(self, PARAMETERS, on_change=self._on_parameter)
        self._listener = None
        self._source = None
        self._state, self._error = 'loading', ''
        self._goal_pub = self.create_publisher(String, 'goal_text', 10)
        self._transcript_pub = self.create_publisher(Transcript, 'transcript', 10)
        self._diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        if self.params['audio_source'] == 'topic':
            self.create_subscription(AudioData, 'audio', self._on_audio, 100)
        reentrant = ReentrantCallbackGroup()
        self.create_service(Trigger, '~/listen', self._on_listen, callback_group=reentrant)
        self._action = ActionServer(
            self, Listen, '~/listen_for_goal', execute_callback=self._execute,
            goal_callback=lambda goal: GoalResponse.ACCEPT,
            cancel_callback=lambda handle: CancelResponse.ACCEPT, callback_group=reentrant)
        self.create_timer(1.0, self._publish_diagnostics,
                          callback_group=MutuallyExclusiveCallbackGroup())
        threading.Thread(target=self._load, name='cgrs-voice-load', daemon=True).start()

    def _on_parameter(self, name, value):
        self.params[name] = value
        if self._listener is not None and name in ('min_confidence', 'wake_timeout_s'):
            setattr(self._listener, name, value)

    # ---- start-up (its own thread: models load in seconds) --------------------------------
    def _load(self):
        from cgrs_ros.engine.config import load_config
        from cgrs_ros.engine.speech.listener import open_listener
        p = self.params
        try:
            section = load_config(p['config'] or None).speech
            listener = open_listener(
                section, p['gallery_dir'], p['trigger'], p['wake_phrase'],
                wake_timeout_s=p['wake_timeout_s'], min_confidence=p['min_confidence'],
                on_utterance=self._on_utterance, max_queue_s=p['max_queue_s'])
            self._listener = listener.start()
            oov = getattr(listener.recogniser, 'oov', [])
            self.get_logger().info(
                f'{listener.recogniser.name} ready; vocabulary: {listener.vocabulary.source} '
                f'({len(listener.vocabulary.words)} words'
                + (f', {len(oov)} without pronunciation: {" ".join(oov[:10])}' if oov else '')
                + f'); trigger {p["trigger"]}, audio from {p["audio_source"]}')
            self._source = self._open_source()
            self._state = 'ready'
        except CgrsError as exc:
            self._state, self._error = 'failed', str(exc)
            self.get_logger().error(str(exc))

    def _open_source(self):
        from cgrs_ros.engine.speech.audio import FileSource, MicrophoneSource
        p = self.params
        if p['audio_source'] == 'file':
            if not p['audio_file']:
                raise CgrsError('audio_source is file but audio_file is empty; set audio_file '
                                'to a WAV file or folder')
            return FileSource(p['audio_file'], self._listener.feed, realtime=p['file_realtime'],
                              loop=p['file_loop'], on_error=self._listener.problem).start()
        if p['audio_source'] == 'microphone':
            return MicrophoneSource(self._listener.feed, p['audio_device']).start()
        return None

    # ---- audio and utterances ---------------------------------------------------------------
    def _on_audio(self, msg):
        from cgrs_ros.engine.speech.audio import AudioError, decode_pcm
        if self._listener is None:
            return
        try:
            samples = decode_pcm(msg.data, msg.sample_rate, msg.channels, msg.encoding)
        except AudioError as exc:
            self._listener.problem(f'audio message dropped: {exc}')
            return
        self._listener.feed(samples, msg.sample_rate)

    def _on_utterance(self, utterance):
        """Publish the transcript and, when it was sent, the goal (listener thread)."""
        if utterance.sent:
            self._goal_pub.publish(String(data=utterance.goal))
        self._transcript_pub.publish(self._transcript_msg(utterance))
        log = self.get_logger().info if utterance.sent else self.get_logger().warning
        log(f'heard "{utterance.text}" ({utterance.confidence:.2f})'
            + (' -> goal_text' if utterance.sent else f': {utterance.reason}'))

    @staticmethod
    def _transcript_msg(utterance):
        msg = Transcript(text=utterance.text, confidence=float(utterance.confidence),
                         audio_duration=float(utterance.audio_s),
                         recognition_time=float(utterance.recognition_s),
                         backend=utterance.backend, trigger=utterance.trigger,
                         sent=utterance.sent, reason=utterance.reason)
        msg.header.stamp = _stamp(utterance.end_of_speech)
        return msg

    # ---- push-to-talk ------------------------------------------------------------------------
    def _not_ready(self):
        if self._listener is None:
            return (f'voice_node is not ready ({self._state}'
                    + (f': {self._error}' if self._error else '') + ')')
        return ''

    def _on_listen(self, request, response):
        problem = self._not_ready()
        if problem:
            response.success, response.message = False, problem
            return response
        timeout = self.params['listen_timeout_s']
        self._listener.arm(timeout)
        response.success = True
        response.message = f'listening: speak within {timeout:g} s'
        return response

    def _execute(self, goal_handle):
        result = Listen.Result()
        problem = self._not_ready()
        if problem:
            result.error = problem
            goal_handle.abort()
            return result
        timeout = goal_handle.request.timeout_s or self.params['listen_timeout_s']
        listening = self._listener.arm(timeout)
        # Audio that stops arriving cannot time the request out from the worker: give up here.
        give_up = time.monotonic() + timeout + self._listener.settings.max_utterance_s + 30.0
        while not listening.done.wait(0.1):
            if goal_handle.is_cancel_requested:
                self._listener.cancel(listening, 'canceled')
                goal_handle.canceled()
                result.error = 'canceled'
                return result
            if time.monotonic() > give_up:
                self._listener.cancel(listening, 'no audio arrived; is the audio source running?')
            state = listening.state  # read once: the worker may finish it meanwhile
            if state != 'done':
                goal_handle.publish_feedback(Listen.Feedback(
                    state=state, level_db=float(self._listener.stats['level_db']),
                    speech_s=float(listening.speech_s)))
        if listening.result is not None:
            result.transcript = self._transcript_msg(listening.result)
            goal_handle.succeed()
        else:
            result.error = listening.error
            goal_handle.abort()
        return result

    # ---- diagnostics ------------------------------------------------------------------------
    def _publish_diagnostics(self):
        status = DiagnosticStatus(name=f'{self.get_fully_qualified_name()}: voice',
                                  hardware_id=self.params['audio_source'])
        values = {'recogniser_state': self._state, 'trigger': self.params['trigger'],
                  'audio_source': self.params['audio_source']}
        listener = self._listener
        if listener is not None:
            s = listener.stats
            values.update(
                backend=listener.recogniser.name, vocabulary=listener.vocabulary.source,
                level_db=f'{s["level_db"]:.1f}', clipped=f'{s["clipped_share"]:.3f}',
                vad=s['vad'], vad_probability=f'{s["vad_probability"]:.2f}',
                input_rate=s['input_rate'], chunks=s['chunks'], utterances=s['utterances'],
                sent=s['sent'], last_transcript=s['last_transcript'],
                last_confidence=f'{s["last_confidence"]:.2f}', last_reason=s['last_reason'],
                dropped_audio_s=f'{s["dropped_audio_s"]:.1f}', problems=s['problems'],
                problem=s['problem'])
        if self._state == 'failed':
            status.level, status.message = DiagnosticStatus.ERROR, self._error
        elif listener is None:
            status.level, status.message = DiagnosticStatus.WARN, 'loading the recogniser'
        elif listener.stats['problem'] and time.monotonic() - listener.stats['problem_at'] < 10:
            status.level, status.message = DiagnosticStatus.WARN, listener.stats['problem']
        elif not listener.stats['chunks']:
            status.level, status.message = DiagnosticStatus.WARN, 'waiting for audio'
        else:
            status.level, status.message = DiagnosticStatus.OK, f'listening ({values["vad"]})'
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(array)

    def destroy_node(self):
        """Stop the audio source and the listener, then destroy the node."""
        if self._source is not None:
            self._source.stop()
        if self._listener is not None:
            self._listener.stop()
        return super().destroy_node()


def main(args=None):
    """Run voice_node until Ctrl-C or shutdown."""
    return spin_node(VoiceNode, 'voice_node', threads=4, args=args)


if __name__ == '__main__':
    raise SystemExit(main())
