"""voice_node in a launched stack: a spoken goal becomes a /goal_pose over DDS.

`cgrs launch ... voice:=true` starts retrieval_node and voice_node as separate processes. The
probe publishes espeak-ng speech as cgrs_ros/AudioData chunks on the voice node's `audio` topic
(as a microphone bridge or the web console would), presses push-to-talk through `~/listen` and
the `~/listen_for_goal` action, and checks the transcript, the goal text and where /goal_pose
puts the drone (against the manifest position computed here with pyproj).
"""

import math
import time

from cgrs_ros.action import Listen
from cgrs_ros.engine.speech.audio import read_audio
from cgrs_ros.msg import AudioData, Transcript
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped
import numpy as np
from PIL import Image
import pyproj
import pytest
from rclpy.action import ActionClient
from ros_probe import launched_stack, RosProbe
from spoken_goals import ESPEAK, NO_ESPEAK, speak, word_error_rate
from std_msgs.msg import String
from std_srvs.srv import Trigger

pytestmark = [pytest.mark.ros, pytest.mark.skipif(ESPEAK is None, reason=NO_ESPEAK)]

DATUM = (47.3977, 8.5456, 488.0)
PLACES = [  # image_id, d_east, d_north, description
    ('pond', -200.0, 150.0, 'a small round pond of blue water surrounded by tall green trees'),
    ('pitch', 60.0, -240.0, 'a football pitch with white lines next to a running track'),
    ('church', 150.0, 90.0, 'a white church with a tall pointed clock tower in a village square'),
    ('parking', -90.0, -60.0, 'a large parking lot full of cars beside a supermarket'),
]
GOAL = 'fly to the small round pond surrounded by tall green trees'
OTHER = 'go to the white church with the tall clock tower'


@pytest.fixture(scope='module')
def stack(tmp_path_factory, module_ros_domain):
    root = tmp_path_factory.mktemp('voice_stack')
    (root / 'images').mkdir()
    geod = pyproj.Geod(ellps='WGS84')
    rows = ['image_id,path,lat,lon,alt,heading_deg,platform,group_id,description']
    rng = np.random.default_rng(0)
    for image_id, de, dn, text in PLACES:
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            root / 'images' / f'{image_id}.png')
        lon, lat, _ = geod.fwd(DATUM[1], DATUM[0], math.degrees(math.atan2(de, dn)),
                               math.hypot(de, dn))
        rows.append(f'{image_id},images/{image_id}.png,{lat!r},{lon!r},{DATUM[2]},0.0,'
                    f'satellite,{image_id},"{text}"')
    (root / 'gallery.csv').write_text('\n'.join(rows) + '\n')
    engine = root / 'engine.yaml'
    engine.write_text('image_encoder: {backend: none}\ncaptioner: {backend: manifest}\n')
    params = root / 'params.yaml'
    common = f'    gallery_dir: "{root}"\n    config: "{engine}"\n'
    params.write_text(
        '/**/retrieval_node:\n  ros__parameters:\n' + common
        + f'    datum: {{latitude: {DATUM[0]}, longitude: {DATUM[1]}, altitude: {DATUM[2]}}}\n'
        '    caption_poll_period: 0.0\n'
        '/**/voice_node:\n  ros__parameters:\n' + common
        + '    audio_source: topic\n    trigger: push_to_talk\n    min_confidence: 0.1\n')
    # One espeak voice here; benchmarks/voice_figures.py measures the word error rate per voice.
    wavs = {name: speak(text, root / f'{name}.wav', voice='en-us+f3') for name, text in
            (('goal', GOAL), ('other', OTHER))}
    log = tmp_path_factory.mktemp('log') / 'launch.log'
    with launched_stack(params, log, Probe, args=('voice:=true',)) as (probe, proc):
        probe.wait_for(lambda h: probe.voice_value('recogniser_state', h) == 'ready',
                       timeout=120, what=f'voice_node ready (log: {log})', proc=proc)
        yield {'probe': probe, 'proc': proc, 'log': log, 'wavs': wavs}


class Probe(RosProbe):
    """Publishes audio to voice_node, presses push-to-talk, records what comes back."""

    def __init__(self):
        super().__init__('cgrs_voice_probe')
        self.listen('diag', DiagnosticArray, '/diagnostics')
        self.listen('pose', PoseStamped, '/goal_pose')
        self.listen('transcript', Transcript, '/cgrs/transcript')
        self.listen('goal_text', String, '/cgrs/goal_text')
        self.audio_pub = self.node.create_publisher(AudioData, '/cgrs/audio', 100)
        self.listen_srv = self.node.create_client(Trigger, '/cgrs/voice_node/listen')
        self.action = ActionClient(self.node, Listen, '/cgrs/voice_node/listen_for_goal')

    def voice_value(self, key, heard=None):
        """Return the newest value of ``key`` in voice_node's diagnostics ('' when none).

        Inside a wait_for predicate pass its ``heard`` (the lock is held there already).
        """
        if heard is None:
            with self.lock:
                return self.voice_value(key, self.heard)
        for array in reversed(heard['diag']):
            for status in array.status:
                if status.name.endswith(': voice'):
                    return {kv.key: kv.value for kv in status.values}.get(key, '')
        return ''

    def play(self, wav, chunk_s=0.1, speed=4.0, tail_s=1.5):
        """Publish a WAV file as S16LE AudioData chunks (``speed`` x real time), then silence."""
        samples, rate = read_audio(wav)
        samples = np.concatenate([samples[:, 0], np.zeros(int(tail_s * rate), np.float32)])
        step = int(chunk_s * rate)
        for start in range(0, len(samples), step):
            pcm = (samples[start:start + step] * 32767).astype('<i2')
            msg = AudioData(sample_rate=rate, channels=1, encoding=AudioData.ENCODING_S16LE,
                            data=pcm.tobytes())
            msg.header.stamp = self.node.get_clock().now().to_msg()
            self.audio_pub.publish(msg)
            time.sleep(chunk_s / speed)
        return len(samples) // step + 1


def test_a_spoken_goal_after_push_to_talk_flies_to_the_place(stack):
    probe, wavs = stack['probe'], stack['wavs']
    chunks_before = int(probe.voice_value('chunks') or 0)
    sent = probe.play(wavs['other'])          # not pressed: not recognised at all
    probe.wait_for(lambda h: int(probe.voice_value('chunks', h) or 0) >= chunks_before + sent - 2,
                   timeout=30, what='voice_node to take the unpressed audio')
    assert probe.count('transcript') == 0 and probe.count('goal_text') == 0

    response = probe.call(probe.listen_srv, Trigger.Request())
    assert response.success and 'listening' in response.message
    poses = probe.count('pose')
    probe.play(wavs['goal'])
    transcript = probe.wait_for(lambda h: h['transcript'], timeout=60,
                                what='the transcript', log=stack['log'])[-1]
    assert transcript.sent and transcript.reason == '' and transcript.trigger == 'push_to_talk'
    assert transcript.backend == 'pocketsphinx' and transcript.audio_duration > 2.0
    assert word_error_rate([GOAL], [transcript.text]) <= 0.2, transcript.text
    goal = probe.wait_for(lambda h: h['goal_text'], what='goal_text')[-1]
    assert word_error_rate([GOAL], [goal.data]) <= 0.2
    pose = probe.wait_for(lambda h: h['pose'][poses:], timeout=60, what='/goal_pose')[-1]
    # The pond lies 200 m west and 150 m north of the datum (ENU x east, y north).
    assert (pose.pose.position.x, pose.pose.position.y) == pytest.approx((-200.0, 150.0),
                                                                         abs=1.0)


def test_listen_action_reports_feedback_and_the_transcript(stack):
    probe, wavs = stack['probe'], stack['wavs']
    assert probe.action.wait_for_server(timeout_sec=30.0)
    states = []
    handle = probe.wait_future(probe.action.send_goal_async(
        Listen.Goal(timeout_s=30.0), feedback_callback=lambda fb: states.append(
            fb.feedback.state)))
    assert handle.accepted
    probe.play(wavs['other'], speed=1.0)      # real time, so feedback sees the speech
    response = probe.wait_future(handle.get_result_async(), timeout=60)
    result = response.result
    assert response.status == 4, result.error  # GoalStatus.STATUS_SUCCEEDED
    assert result.transcript.sent and word_error_rate([OTHER], [result.transcript.text]) <= 0.25
    assert 'speech' in states and set(states) <= {'waiting', 'speech', 'recognising'}


def test_malformed_audio_is_reported_and_the_node_keeps_listening(stack):
    probe, wavs = stack['probe'], stack['wavs']
    probe.audio_pub.publish(AudioData(sample_rate=16000, channels=1, encoding='MP3',
                                      data=b'\x00' * 100))
    probe.audio_pub.publish(AudioData(sample_rate=16000, channels=1, encoding='S16LE',
                                      data=b'\x00' * 101))
    probe.wait_for(lambda h: 'not whole frames' in probe.voice_value('problem', h)
                   or "'MP3'" in probe.voice_value('problem', h), timeout=30,
                   what='the malformed audio in diagnostics')
    assert int(probe.voice_value('problems')) >= 2
    seen = probe.count('transcript')
    assert probe.call(probe.listen_srv, Trigger.Request()).success
    probe.play(wavs['goal'])
    transcript = probe.wait_for(lambda h: h['transcript'][seen:], timeout=60,
                                what='a transcript after the bad audio')[-1]
    assert transcript.sent
    assert stack['proc'].poll() is None
