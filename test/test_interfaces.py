"""The generated interfaces construct, serialize and round-trip with every field set."""

import math

from cgrs_ros.action import Retrieve
from cgrs_ros.msg import Candidate, RetrievalResult
from geometry_msgs.msg import Point, Pose, Quaternion
import pytest
from rclpy.serialization import deserialize_message, serialize_message


def make_candidate(rank=1):
    """A candidate with every field set to a distinctive value."""
    return Candidate(
        rank=rank, image_id=f'img_{rank:04d}', platform='drone', group_id='0839',
        latitude=47.397742, longitude=8.545594, altitude=488.25, heading_deg=135.5,
        pose=Pose(position=Point(x=12.5, y=-3.25, z=1.5),
                  orientation=Quaternion(x=0.0, y=0.0, z=0.3826834, w=0.9238795)),
        coarse_score=0.31, caption_score=0.72, fused_score=0.9,
        caption='a red roof beside a circular plaza, héllo ✓')


def make_result():
    """A RetrievalResult with two candidates and every field set."""
    result = RetrievalResult(
        query='the red-roofed building north of the circular plaza',
        normalized_query='the red-roofed building of the circular plaza',
        platform_filter='drone',
        candidates=[make_candidate(1), make_candidate(2)],
        encode_ms=4.5, coarse_ms=0.75, rerank_ms=1.25, total_ms=6.5,
        status=RetrievalResult.STATUS_OK, error='')
    result.header.frame_id = 'map'
    result.header.stamp.sec = 1700000000
    result.header.stamp.nanosec = 123
    return result


def assert_candidates_equal(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        for field in ('rank', 'image_id', 'platform', 'group_id', 'latitude', 'longitude',
                      'altitude', 'heading_deg', 'caption'):
            assert getattr(a, field) == getattr(b, field), field
        for field in ('coarse_score', 'caption_score', 'fused_score'):  # float32 fields
            assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-6)
        assert a.pose == b.pose


def test_candidate_round_trip():
    original = make_candidate(3)
    copy = deserialize_message(serialize_message(original), Candidate)
    assert_candidates_equal([copy], [original])


def test_nan_marks_a_channel_that_did_not_run():
    original = make_candidate()
    original.coarse_score = math.nan
    copy = deserialize_message(serialize_message(original), Candidate)
    assert math.isnan(copy.coarse_score)
    assert copy.caption_score == pytest.approx(0.72)


def test_retrieval_result_round_trip():
    original = make_result()
    copy = deserialize_message(serialize_message(original), RetrievalResult)
    assert copy.header == original.header
    for field in ('query', 'normalized_query', 'platform_filter', 'status', 'error'):
        assert getattr(copy, field) == getattr(original, field), field
    for field in ('encode_ms', 'coarse_ms', 'rerank_ms', 'total_ms'):
        assert getattr(copy, field) == pytest.approx(getattr(original, field))
    assert_candidates_equal(copy.candidates, original.candidates)


def test_status_constants_are_distinct():
    names = [n for n in dir(RetrievalResult) if n.startswith('STATUS_')]
    values = [getattr(RetrievalResult, n) for n in names]
    assert len(names) == 7
    assert len(set(values)) == len(values)
    assert RetrievalResult.STATUS_OK == 0


def test_confirmation_fields_round_trip():
    from cgrs_ros.srv import Confirm
    original = make_result()
    original.status = RetrievalResult.STATUS_AWAITING_CONFIRMATION
    original.result_id, original.selected_rank = 'abc123', 2
    original.confidence, original.margin = 0.42, 0.031
    original.area_latitude, original.area_longitude, original.area_radius_m = 47.4, 8.5, 250.0
    copy = deserialize_message(serialize_message(original), RetrievalResult)
    assert (copy.status, copy.result_id, copy.selected_rank) == (
        RetrievalResult.STATUS_AWAITING_CONFIRMATION, 'abc123', 2)
    assert (copy.confidence, copy.margin) == pytest.approx((0.42, 0.031))
    assert (copy.area_latitude, copy.area_longitude, copy.area_radius_m) == (47.4, 8.5, 250.0)
    goal = Retrieve.Goal(description='x', near_latitude=47.4, near_longitude=8.5,
                         near_radius_m=300.0, goal_policy='confirm_below', confirm_id='abc123',
                         confirm_rank=2)
    goal_copy = deserialize_message(serialize_message(goal), Retrieve.Goal)
    assert (goal_copy.near_radius_m, goal_copy.goal_policy, goal_copy.confirm_rank) == (
        300.0, 'confirm_below', 2)
    request = Confirm.Request(result_id='abc123', rank=3)
    assert deserialize_message(serialize_message(request), Confirm.Request).rank == 3
    response = Confirm.Response(success=True, message='sent', result=original)
    assert deserialize_message(serialize_message(response), Confirm.Response
                               ).result.result_id == 'abc123'


def test_error_result_round_trip():
    original = RetrievalResult(query='', status=RetrievalResult.STATUS_INVALID_GOAL,
                               error='goal text is empty: publish a description of the place')
    copy = deserialize_message(serialize_message(original), RetrievalResult)
    assert copy.status == RetrievalResult.STATUS_INVALID_GOAL
    assert copy.error == original.error
    assert list(copy.candidates) == []


def test_action_goal_result_feedback_round_trip():
    goal = Retrieve.Goal(description='the pond beside the sports field', top_k=7,
                         platform='satellite')
    goal_copy = deserialize_message(serialize_message(goal), Retrieve.Goal)
    assert (goal_copy.description, goal_copy.top_k, goal_copy.platform) == (
        goal.description, 7, 'satellite')

    result = Retrieve.Result(result=make_result())
    result_copy = deserialize_message(serialize_message(result), Retrieve.Result)
    assert result_copy.result.query == result.result.query
    assert_candidates_equal(result_copy.result.candidates, result.result.candidates)

    feedback = Retrieve.Feedback(stage='rerank', progress=0.75)
    feedback_copy = deserialize_message(serialize_message(feedback), Retrieve.Feedback)
    assert feedback_copy.stage == 'rerank'
    assert feedback_copy.progress == pytest.approx(0.75)


def test_action_wire_types_carry_the_goal():
    """The services and feedback message rclpy's ActionServer uses wrap our types."""
    request = Retrieve.Impl.SendGoalService.Request()
    request.goal = Retrieve.Goal(description='x', top_k=1, platform='')
    request.goal_id.uuid = list(range(16))
    copy = deserialize_message(serialize_message(request),
                               Retrieve.Impl.SendGoalService.Request)
    assert copy.goal.description == 'x'
    assert list(copy.goal_id.uuid) == list(range(16))

    message = Retrieve.Impl.FeedbackMessage()
    message.feedback = Retrieve.Feedback(stage='coarse', progress=0.5)
    copy = deserialize_message(serialize_message(message), Retrieve.Impl.FeedbackMessage)
    assert copy.feedback.stage == 'coarse'

    response = Retrieve.Impl.GetResultService.Response(status=4)
    response.result = Retrieve.Result(result=make_result())
    copy = deserialize_message(serialize_message(response),
                               Retrieve.Impl.GetResultService.Response)
    assert copy.result.result.candidates[1].image_id == 'img_0002'
