"""The reranker stage inside retrieval_node, over real DDS: feedback, cancel, time budget.

The stack is launched by `cgrs launch` with the `openai` reranker pointed at a local
chat-completions server (model_factories.ChatServer, 127.0.0.1) that answers with logprobs
and takes 0.3 s per candidate, so the stage is slow enough to watch, cancel and time out.
"""

import time

from action_msgs.msg import GoalStatus
from cgrs_ros.msg import RetrievalResult
from model_factories import ChatServer, dominant_colour, uploaded_image
import numpy as np
from PIL import Image
import pytest
from ros_probe import launched_stack
from test_retrieval_node import _place_latlon, DATUM, PLACES, Probe

pytestmark = pytest.mark.ros
DELAY_S = 0.3


def _logprobs(body):
    # P(yes) is high for the one red image (the church), low for the others: the stage has
    # an opinion that differs from the caption channel's.
    red = dominant_colour(uploaded_image(body)) == 'red'
    return [('Yes', -0.05), ('No', -3.0)] if red else [('No', -0.1), ('Yes', -2.5)]


@pytest.fixture(scope='module')
def server():
    chat = ChatServer()
    chat.logprobs = _logprobs
    chat.plan = [('sleep', DELAY_S)] * 10_000
    yield chat
    chat.close()


@pytest.fixture(scope='module')
def stack(tmp_path_factory, module_ros_domain, server):
    root = tmp_path_factory.mktemp('rerank_gallery')
    (root / 'images').mkdir()
    rows = ['image_id,path,lat,lon,alt,heading_deg,platform,group_id,description']
    for i, (image_id, platform, de, dn, alt, heading, group, text) in enumerate(PLACES):
        colour = (200, 30, 30) if image_id == 'church' else (30, 80 + 20 * i, 200 - 20 * i)
        Image.new('RGB', (32, 32), colour).save(root / 'images' / f'{image_id}.png')
        lat, lon = _place_latlon(de, dn)
        rows.append(f'{image_id},images/{image_id}.png,{lat!r},{lon!r},{alt},{heading},'
                    f'{platform},{group},"{text}"')
    (root / 'gallery.csv').write_text('\n'.join(rows) + '\n')
    engine = root / 'engine.yaml'
    engine.write_text(
        'image_encoder: {backend: none}\ncaptioner: {backend: manifest}\n'
        'retrieval: {min_caption_score: null}\n'
        f'reranker: {{backend: openai, model: tiny-vlm, base_url: "{server.url}", '
        'batch_size: 1, concurrency: 1, k: 10, weight: 1.0, max_retries: 0, timeout_s: 10}\n')
    params = root / 'params.yaml'
    params.write_text(
        '/**/retrieval_node:\n  ros__parameters:\n'
        f'    gallery_dir: "{root}"\n    config: "{engine}"\n'
        f'    datum: {{latitude: {DATUM[0]}, longitude: {DATUM[1]}, altitude: {DATUM[2]}}}\n'
        '    top_k: 6\n    caption_poll_period: 0.0\n')
    log = tmp_path_factory.mktemp('log') / 'launch.log'
    with launched_stack(params, log, Probe) as (probe, proc):
        yield {'probe': probe, 'proc': proc, 'log': log}


def _wait(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_feedback_per_candidate_and_the_stage_reorders(stack):
    probe = stack['probe']
    stages = []
    handle = probe.send_goal('a building with a tall tower',
                             feedback=lambda fb: stages.append(fb.feedback.stage))
    response = probe.wait_future(handle.get_result_async(), timeout=60.0)
    result = response.result.result
    assert response.status == GoalStatus.STATUS_SUCCEEDED, result.error
    # Feedback is a topic and the result a service reply: 'done', sent just before the result,
    # may land after it, and rclpy drops feedback for a goal whose result it already has
    # (seen under load). The stages before 'publish' were sent long before the result.
    _wait(lambda: 'done' in stages, timeout=2.0)
    rerank = [s for s in stages if s.startswith('rerank ')]
    assert rerank == [f'rerank {i}/6' for i in range(7)]
    assert stages.index('captions') < stages.index('rerank 0/6') < stages.index('publish')
    assert result.rerank_scored == 6
    assert result.rerank_ms > 6 * DELAY_S * 1000 * 0.9
    assert result.candidates[0].image_id == 'church'  # the server's Yes moved it first
    assert result.candidates[0].rerank_score > 0.9
    assert all(0.0 <= c.rerank_score <= 1.0 for c in result.candidates)


def test_cancel_between_candidates_stops_the_stage(stack):
    probe = stack['probe']
    stages, cancelled = [], []

    def on_feedback(fb):
        stages.append(fb.feedback.stage)
        if fb.feedback.stage == 'rerank 2/6' and not cancelled:
            cancelled.append(handle.cancel_goal_async())

    handle = probe.send_goal('the white church', feedback=on_feedback)
    response = probe.wait_future(handle.get_result_async(), timeout=60.0)
    assert response.status == GoalStatus.STATUS_CANCELED
    assert response.result.result.status == RetrievalResult.STATUS_CANCELED
    assert cancelled
    # Abandoned between model calls: at most the call in flight when the cancel arrived ran.
    assert not any(s in stages for s in ('rerank 5/6', 'rerank 6/6', 'publish', 'done'))


def test_time_budget_scores_a_prefix_and_still_answers(stack, server):
    probe = stack['probe']
    assert probe.set_param('rerank_timeout_ms', 700.0).successful
    try:
        poses = probe.count('pose')
        result = probe.say('the football pitch with a running track', timeout=60.0)
    finally:
        assert probe.set_param('rerank_timeout_ms', 0.0).successful
    assert result.status == RetrievalResult.STATUS_OK, result.error
    n = result.rerank_scored
    assert 1 <= n < 6
    assert all(np.isfinite(c.rerank_score) for c in result.candidates[:n])
    assert all(np.isnan(c.rerank_score) for c in result.candidates[n:])
    tail = [c.fused_score for c in result.candidates[n:]]
    assert tail == sorted(tail, reverse=True)  # the unscored keep the earlier order
    probe.wait_for(lambda h: len(h['pose']) > poses, what='/goal_pose')
