"""``cgrs goal "TEXT"``: send a goal to retrieval_node through its action and print the result.

``--policy confirm`` asks the node to hold the ranking for an operator; ``--near LAT LON
--radius M`` searches only there; ``cgrs goal --confirm RESULT_ID --rank N`` sends candidate N
of a held (or any recent) ranking, ``--rank 0`` dismisses a held one.

Exit status: 0 when a place was found (and sent), 1 when the node answered with an error status
(invalid goal, busy, no match, engine error), 2 for a bad command line, 3 on timeout, 4 when the
ranking awaits confirmation.
"""

import json
import sys
import time

from cgrs_ros.engine.errors import CgrsError, QueryError


def _spin_until(executor, future, deadline):
    while not future.done() and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.05)
    return future.done()


def send_goal(text, namespace='cgrs', top_k=0, platform='', timeout=60.0, on_feedback=None,
              **fields):
    """Send one Retrieve goal; return the RetrievalResult message, or None on timeout.

    ``fields`` are more Retrieve.Goal fields (goal_policy, near_*, confirm_id, confirm_rank).
    """
    from cgrs_ros.action import Retrieve
    import rclpy
    from rclpy.action import ActionClient

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = rclpy.create_node('cgrs_goal_client', context=context)
        executor = rclpy.executors.SingleThreadedExecutor(context=context)
        executor.add_node(node)
        name = f'/{namespace.strip("/")}/retrieve' if namespace.strip('/') else '/retrieve'
        client = ActionClient(node, Retrieve, name)
        deadline = time.monotonic() + timeout
        while not client.server_is_ready():
            if time.monotonic() > deadline:
                return None
            executor.spin_once(timeout_sec=0.1)
        feedback = (lambda msg: on_feedback(msg.feedback)) if on_feedback else None
        sent = client.send_goal_async(
            Retrieve.Goal(description=text, top_k=top_k, platform=platform, **fields),
            feedback_callback=feedback)
        if not _spin_until(executor, sent, deadline):
            return None
        handle = sent.result()
        if not handle.accepted:
            raise QueryError('retrieval_node rejected the goal')
        result = handle.get_result_async()
        if not _spin_until(executor, result, deadline):
            handle.cancel_goal_async()
            executor.spin_once(timeout_sec=0.5)
            return None
        return result.result().result.result
    finally:
        rclpy.shutdown(context=context)


def run(args):
    """Send the goal and print the result (text or JSON)."""
    from cgrs_ros.msg import RetrievalResult
    from cgrs_ros.nodes.convert import result_to_dict

    waiting = RetrievalResult.STATUS_AWAITING_CONFIRMATION

    def show_feedback(feedback):
        if not args.json:
            print(f'  [{feedback.progress:4.0%}] {feedback.stage}', file=sys.stderr)

    fields = {'goal_policy': args.policy or ''}
    if (args.near is None) != (args.radius is None):
        raise CgrsError('--near LAT LON and --radius M go together: give both or neither')
    if args.near is not None:
        fields.update(near_latitude=args.near[0], near_longitude=args.near[1],
                      near_radius_m=args.radius)
    if args.confirm is not None:
        fields.update(confirm_id=args.confirm, confirm_rank=args.rank)
    elif not args.text:
        raise CgrsError('give the goal TEXT, or --confirm RESULT_ID to send a held candidate')
    msg = send_goal(args.text or '', args.namespace, args.top_k, args.platform or '',
                    args.timeout, show_feedback, **fields)
    if msg is None:
        print(f'cgrs goal: no result within {args.timeout:g} s; is retrieval_node running in '
              f'namespace {args.namespace!r} on ROS_DOMAIN_ID the same as this shell?',
              file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(result_to_dict(msg), indent=2))
    elif msg.status not in (RetrievalResult.STATUS_OK, waiting):
        print(f'error (status {msg.status}): {msg.error}', file=sys.stderr)
    else:
        print(f'query: {msg.query}\n normalized: {msg.normalized_query}')
        for c in msg.candidates:
            print(f'{c.rank:3d}. {c.image_id:24s} {c.platform:9s} fused {c.fused_score:6.3f} '
                  f'lat {c.latitude:.6f} lon {c.longitude:.6f} '
                  f'map ({c.pose.position.x:.1f}, {c.pose.position.y:.1f})')
        print(f'total {msg.total_ms:.1f} ms; confidence {msg.confidence:.2f}, margin '
              f'{msg.margin:.3f}; result {msg.result_id}')
        if msg.status == waiting:
            print(f'awaiting confirmation: cgrs goal --confirm {msg.result_id} --rank N '
                  '(0 = dismiss)')
        elif msg.selected_rank > 1:
            print(f'sent candidate {msg.selected_rank}')
    if msg.status == waiting:
        return 4
    return 0 if msg.status == RetrievalResult.STATUS_OK else 1


def register(subparsers):
    """Add the ``goal`` subcommand."""
    parser = subparsers.add_parser('goal', help='send a goal to a running retrieval_node')
    parser.add_argument('text', nargs='?', help='the place, in words')
    parser.add_argument('--timeout', type=float, default=60.0, help='seconds to wait')
    parser.add_argument('--top-k', type=int, default=0, help='candidates (0 = node default)')
    parser.add_argument('--platform', choices=('satellite', 'drone', 'ground'),
                        help='only this platform')
    parser.add_argument('--namespace', default='cgrs', help='namespace of retrieval_node')
    parser.add_argument('--policy', choices=('auto', 'confirm', 'confirm_below'),
                        help="hold the ranking for an operator (default: the node's goal_policy)")
    parser.add_argument('--near', nargs=2, type=float, metavar=('LAT', 'LON'),
                        help='search only around this point (with --radius)')
    parser.add_argument('--radius', type=float, metavar='M', help='radius of --near, metres')
    parser.add_argument('--confirm', metavar='RESULT_ID',
                        help="send a candidate of this ranking instead ('' = the newest held)")
    parser.add_argument('--rank', type=int, default=1,
                        help='with --confirm: candidate to send (1 = best, 0 = dismiss)')
    parser.add_argument('--json', action='store_true', help='print JSON')
    parser.set_defaults(func=run)
