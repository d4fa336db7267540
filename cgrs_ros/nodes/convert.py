"""Conversions between engine results and ROS messages (shared by the nodes and the CLI)."""

import math

from cgrs_ros.engine import geo
from cgrs_ros.msg import Candidate, RetrievalResult
from geometry_msgs.msg import Point, Pose, PoseStamped, Quaternion, Vector3
from sensor_msgs.msg import NavSatFix, NavSatStatus
from std_msgs.msg import ColorRGBA
from visualization_msgs.msg import Marker, MarkerArray

_NAN = float('nan')


def _score(value):
    return _NAN if value is None else float(value)


def _json_score(value):
    return None if value is None or math.isnan(value) else float(value)


def pose_in_map(lat, lon, alt, heading_deg, datum):
    """Return the map-frame (ENU around ``datum``) pose of a place seen with a compass heading."""
    e, n, u = geo.geodetic_to_enu(lat, lon, alt, datum)
    x, y, z, w = geo.yaw_to_quaternion(geo.heading_to_enu_yaw(heading_deg))
    return Pose(position=Point(x=e, y=n, z=u), orientation=Quaternion(x=x, y=y, z=z, w=w))


def result_message(query_result, datum, frame_id, stamp, platform=''):
    """Build a RetrievalResult (status OK) for an engine QueryResult."""
    msg = RetrievalResult(
        query=query_result.query, normalized_query=query_result.normalized_query,
        platform_filter=platform or '', status=RetrievalResult.STATUS_OK, error='',
        confidence=_NAN, margin=_NAN)
    msg.header.frame_id = frame_id
    msg.header.stamp = stamp
    timings = query_result.timings_ms or {}
    msg.encode_ms = float(timings.get('encode') or 0.0)
    msg.coarse_ms = float(timings.get('coarse') or 0.0)
    msg.captions_ms = float(timings.get('captions') or 0.0)
    msg.rerank_ms = float(timings.get('rerank') or 0.0)
    msg.rerank_scored = int((query_result.rerank or {}).get('scored', 0))
    msg.total_ms = float(timings.get('total') or 0.0)
    for cand in query_result.candidates:
        msg.candidates.append(Candidate(
            rank=int(cand.rank), image_id=cand.image_id, platform=cand.platform,
            group_id=cand.group_id or '', latitude=float(cand.lat), longitude=float(cand.lon),
            altitude=float(cand.alt), heading_deg=float(cand.heading_deg),
            pose=pose_in_map(cand.lat, cand.lon, cand.alt, cand.heading_deg, datum),
            coarse_score=_score(cand.coarse_score), caption_score=_score(cand.caption_score),
            fused_score=_score(cand.fused_score), rerank_score=_score(cand.rerank_score),
            final_score=_score(cand.final_score), caption=cand.caption or ''))
    if query_result.no_match:  # the relevance floor: candidates shown, no pose sent
        msg.status = RetrievalResult.STATUS_NO_MATCH
        msg.error = query_result.no_match
    elif not msg.candidates:
        msg.status = RetrievalResult.STATUS_NO_MATCH
        msg.error = ('no gallery image matched: the gallery is empty or the platform filter '
                     f'{platform!r} excludes every image; widen the filter or index images.')
    return msg


def error_message(query, status, error, frame_id, stamp, platform=''):
    """Build a RetrievalResult that carries only an error status and its reason."""
    msg = RetrievalResult(query=query, platform_filter=platform or '', status=status,
                          error=error, confidence=_NAN, margin=_NAN)
    msg.header.frame_id = frame_id
    msg.header.stamp = stamp
    return msg


def selected(result):
    """Return the candidate a result sends: ``selected_rank`` (0 = the best)."""
    return result.candidates[max(int(result.selected_rank), 1) - 1]


def goal_pose(result):
    """Return the PoseStamped of the selected candidate (for Nav2's /goal_pose)."""
    return PoseStamped(header=result.header, pose=selected(result).pose)


def goal_fix(result):
    """Return the NavSatFix of the selected candidate (WGS84, altitude above the ellipsoid)."""
    best = selected(result)
    fix = NavSatFix(header=result.header, latitude=best.latitude, longitude=best.longitude,
                    altitude=best.altitude,
                    position_covariance_type=NavSatFix.COVARIANCE_TYPE_UNKNOWN)
    fix.status.status = NavSatStatus.STATUS_FIX
    fix.status.service = NavSatStatus.SERVICE_GPS
    return fix


_BEST = ColorRGBA(r=0.1, g=0.9, b=0.2, a=0.95)
_OTHER = ColorRGBA(r=0.2, g=0.5, b=1.0, a=0.7)
_TEXT = ColorRGBA(r=1.0, g=1.0, b=1.0, a=1.0)


def candidate_markers(result, scale=8.0):
    """Build the rviz MarkerArray: DELETEALL, then a sphere and a label per candidate.

    The selected candidate (the best, unless an operator chose another) is a larger green
    sphere; the others are blue. Labels read ``#rank image_id score``.
    """
    markers = MarkerArray()
    markers.markers.append(Marker(header=result.header, action=Marker.DELETEALL))
    for cand in result.candidates:
        best = cand.rank == max(int(result.selected_rank), 1)
        size = scale * (1.6 if best else 1.0)
        markers.markers.append(Marker(
            header=result.header, ns='cgrs_candidates', id=int(cand.rank), type=Marker.SPHERE,
            action=Marker.ADD, pose=cand.pose, scale=Vector3(x=size, y=size, z=size),
            color=_BEST if best else _OTHER))
        label_pose = Pose(position=Point(x=cand.pose.position.x, y=cand.pose.position.y,
                                         z=cand.pose.position.z + size),
                          orientation=Quaternion(w=1.0))
        markers.markers.append(Marker(
            header=result.header, ns='cgrs_labels', id=int(cand.rank),
            type=Marker.TEXT_VIEW_FACING, action=Marker.ADD, pose=label_pose,
            scale=Vector3(z=scale * 0.6), color=_TEXT,
            text=f'#{cand.rank} {cand.image_id} {cand.fused_score:.2f}'))
    return markers


def result_to_dict(msg):
    """Return the ``cgrs query --json`` shape of a RetrievalResult (for ``cgrs goal``)."""
    return {
        'query': msg.query,
        'normalized_query': msg.normalized_query,
        'status': msg.status,
        'error': msg.error,
        'candidates': [{
            'rank': c.rank, 'image_id': c.image_id, 'platform': c.platform,
            'lat': c.latitude, 'lon': c.longitude, 'alt': c.altitude,
            'heading_deg': c.heading_deg, 'caption': c.caption, 'group_id': c.group_id,
            'scores': {'coarse': _json_score(c.coarse_score),
                       'caption': _json_score(c.caption_score),
                       'fused': _json_score(c.fused_score),
                       'rerank': _json_score(c.rerank_score),
                       'final': _json_score(c.final_score)},
            'map_pose': {'x': c.pose.position.x, 'y': c.pose.position.y,
                         'z': c.pose.position.z},
        } for c in msg.candidates],
        'timings_ms': {'encode': msg.encode_ms, 'coarse': msg.coarse_ms,
                       'captions': msg.captions_ms, 'rerank': msg.rerank_ms,
                       'total': msg.total_ms},
        'rerank': {'scored': msg.rerank_scored},
        'result_id': msg.result_id,
        'selected_rank': msg.selected_rank,
        'confidence': _json_score(msg.confidence),
        'margin': _json_score(msg.margin),
        'area': ({'lat': msg.area_latitude, 'lon': msg.area_longitude,
                  'radius_m': msg.area_radius_m} if msg.area_radius_m > 0 else None),
    }
