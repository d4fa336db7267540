"""Figures of the voice interface (issue 13): word error rates and end-of-speech latencies.

1. WER on spoken goals: ``--goals`` goals made of the demo gallery's description sentences
   (every other one with a command phrase, "fly to ..."), spoken by espeak-ng in each of
   ``--voices``, run through the real pipeline (Silero VAD, utterance cuts, pocketsphinx while
   the audio arrives), with the gallery vocabulary and without it (pocketsphinx's general
   English model). Also on ``--queries`` held-out phrasings from the demo's queries.csv
   (synonyms the descriptions do not use: "rotary", "oblong"), which the gallery vocabulary
   does not contain.
2. Latency over DDS: the stack (`cgrs launch ... voice:=true`, config/demo_engine.yaml) with
   voice_node on the audio topic; the probe publishes each spoken goal in real time in 100 ms
   chunks and measures from the end of speech (the Transcript stamp: when the last voiced
   audio reached voice_node) to goal_text and to /goal_pose arriving at the probe.

    .venv/bin/python benchmarks/voice_figures.py [--goals 24] [--skip-dds | --skip-wer]
"""

import argparse
import csv
import json
import os
from pathlib import Path
import subprocess
import sys
import tempfile
import time

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'test'))

from cgrs_ros.engine.speech.listener import open_listener  # noqa: E402
import numpy as np  # noqa: E402
from spoken_goals import feed_file, gallery_goals, speak, word_error_rate  # noqa: E402


def parse_args(argv=None):
    """Return the command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--world', type=Path, default=ROOT / 'demo' / 'world')
    parser.add_argument('--goals', type=int, default=24)
    parser.add_argument('--queries', type=int, default=20)
    parser.add_argument('--voices', default='en-us,en-us+f3,en-us+m3')
    parser.add_argument('--latency-goals', type=int, default=12)
    parser.add_argument('--skip-dds', action='store_true')
    parser.add_argument('--skip-wer', action='store_true')
    parser.add_argument('--json', type=Path, default=None, help='also write the figures here')
    return parser.parse_args(argv)


def _percentile(values, q):
    return float(np.percentile(values, q)) if values else float('nan')


def recognise(gallery, wavs, vocabulary):
    """Return (texts, seconds of recogniser time after each utterance ended)."""
    heard = []
    listener = open_listener({'vocabulary': vocabulary}, gallery, min_confidence=0.0,
                             on_utterance=heard.append)
    texts, finish = [], []
    for wav in wavs:
        before = len(heard)
        feed_file(listener, wav)
        texts.append(' '.join(u.text for u in heard[before:]))
        finish.extend(u.recognition_s for u in heard[before:])
    return texts, finish


def wer_figures(args, work):
    """WER with and without the gallery vocabulary, per voice and on held-out phrasings."""
    goals = gallery_goals(args.world, args.goals, seed=1)
    with open(args.world / 'queries.csv', newline='') as handle:
        queries = [row['query'] for row in csv.DictReader(handle)][:args.queries]
    figures = {}
    for voice in args.voices.split(','):
        for name, texts in (('descriptions', goals), ('held_out_queries', queries)):
            wavs = [speak(t, work / f'{voice}_{name}_{i}.wav', voice=voice)
                    for i, t in enumerate(texts)]
            row = {}
            for vocabulary in ('gallery', 'none'):
                started = time.monotonic()
                hyps, finish = recognise(args.world, wavs, vocabulary)
                row[vocabulary] = {'wer': round(word_error_rate(texts, hyps), 4),
                                   'finish_p50_ms': round(1000 * _percentile(finish, 50), 1),
                                   'wall_s': round(time.monotonic() - started, 1)}
            figures[f'{voice} {name} ({len(texts)})'] = row
            print(f'{voice:10s} {name:17s} n={len(texts):3d}  WER gallery '
                  f'{row["gallery"]["wer"]:.3f}  none {row["none"]["wer"]:.3f}  '
                  f'(recogniser after end of utterance p50 {row["gallery"]["finish_p50_ms"]} ms '
                  f'/ {row["none"]["finish_p50_ms"]} ms)', flush=True)
    return figures


def dds_latency(args, work):
    """End of speech -> goal_text and -> /goal_pose over DDS in a launched stack."""
    import math

    from cgrs_ros.msg import Transcript
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseStamped
    from ros_probe import launched_stack
    from std_msgs.msg import String
    from test_voice_node import Probe as VoiceProbe

    world = json.loads((args.world / 'world.json').read_text())
    datum = world['datum']
    params = work / 'params.yaml'
    common = (f'    gallery_dir: "{args.world}"\n'
              f'    config: "{ROOT / "config" / "demo_engine.yaml"}"\n')
    params.write_text(
        '/**/retrieval_node:\n  ros__parameters:\n' + common
        + f'    datum: {{latitude: {datum["lat"]}, longitude: {datum["lon"]}, '
        f'altitude: {datum["alt"]}}}\n    caption_poll_period: 0.0\n'
        '/**/voice_node:\n  ros__parameters:\n' + common + '    audio_source: topic\n')
    goals = gallery_goals(args.world, args.latency_goals, seed=7)
    wavs = [speak(goal, work / f'latency_{i}.wav') for i, goal in enumerate(goals)]

    class Probe(VoiceProbe):
        def __init__(self):
            super().__init__()
            self.arrivals = {'goal_text': [], 'pose': [], 'transcript': []}
            for key, msg_type, topic in (('goal_text', String, '/cgrs/goal_text'),
                                         ('pose', PoseStamped, '/goal_pose'),
                                         ('transcript', Transcript, '/cgrs/transcript')):
                self.node.create_subscription(
                    msg_type, topic, lambda msg, key=key: self.arrivals[key].append(
                        (time.time(), msg)), 10)

    del DiagnosticArray  # the probe listens to /diagnostics itself
    to_text, to_pose, missed = [], [], 0
    log = work / 'stack.log'
    with launched_stack(params, log, Probe, ready_timeout=900.0,
                        args=('voice:=true',)) as (probe, proc):
        probe.wait_for(lambda h: probe.voice_value('recogniser_state', h) == 'ready', timeout=120,
                       what='voice_node ready', proc=proc)
        for wav in wavs:
            counts = {key: len(value) for key, value in probe.arrivals.items()}
            probe.play(wav, speed=1.0, tail_s=2.0)
            deadline = time.time() + 15.0
            while time.time() < deadline and len(probe.arrivals['pose']) <= counts['pose']:
                time.sleep(0.02)
            transcripts = probe.arrivals['transcript'][counts['transcript']:]
            sent = [msg for _, msg in transcripts if msg.sent]
            texts = probe.arrivals['goal_text'][counts['goal_text']:]
            poses = probe.arrivals['pose'][counts['pose']:]
            if not sent or not texts or not poses:
                missed += 1
                continue
            stamp = sent[0].header.stamp
            end = stamp.sec + stamp.nanosec * 1e-9
            to_text.append(texts[0][0] - end)
            to_pose.append(poses[0][0] - end)
    figures = {'goals': len(goals), 'measured': len(to_pose), 'missed': missed}
    for name, values in (('end_of_speech_to_goal_text_s', to_text),
                         ('end_of_speech_to_goal_pose_s', to_pose)):
        figures[name] = {'p50': round(_percentile(values, 50), 3),
                         'p95': round(_percentile(values, 95), 3)}
    print(f'DDS latency over {len(to_pose)} goals ({missed} without a pose): end of speech -> '
          f'goal_text p50 {figures["end_of_speech_to_goal_text_s"]["p50"]:.3f} s '
          f'p95 {figures["end_of_speech_to_goal_text_s"]["p95"]:.3f} s; -> /goal_pose p50 '
          f'{figures["end_of_speech_to_goal_pose_s"]["p50"]:.3f} s '
          f'p95 {figures["end_of_speech_to_goal_pose_s"]["p95"]:.3f} s', flush=True)
    assert math.isfinite(figures['end_of_speech_to_goal_pose_s']['p50']) or not to_pose
    return figures


def main(argv=None):
    """Print the figures (and write them to --json)."""
    args = parse_args(argv)
    if not (args.world / 'gallery.csv').is_file():
        subprocess.run([sys.executable, '-m', 'cgrs_ros.cli', 'gallery', 'demo',
                        str(args.world)], check=True)
    print(f'{time.strftime("%Y-%m-%d %H:%M")} UTC, {os.cpu_count()} cores, load '
          f'{os.getloadavg()[0]:.1f}; demo world {args.world}', flush=True)
    with tempfile.TemporaryDirectory(prefix='cgrs-voice-') as folder:
        work = Path(folder)
        figures = {} if args.skip_wer else {'wer': wer_figures(args, work)}
        if not args.skip_dds:
            figures['dds'] = dds_latency(args, work)
    figures['load'] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + '\n')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
