"""``cgrs goal "TEXT"``: send a goal to retrieval_node through its action and print the result.

Exit status: 0 when a place was found, 1 when the node answered with an error status
(invalid goal, busy, no match, engine error), 2 for a bad command line, 3 on timeout.
"""

import json
import sys
import time

from cgrs_ros.engine.errors import QueryError


def _spin_until(executor, future, deadline):
    while not future.done() and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.05)
    return future.done()


def send_goal(text, namespace='cgrs', top_k=0, platform='', timeout=60.0, on_feedback=None):
    """Send one Retrieve goal; return the RetrievalResult message, or None on timeout."""
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
            Retrieve.Goal(description=text, top_k=top_k, platform=platform),
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

    def show_feedback(feedback):
        if not args.json:
            print(f'  [{feedback.progress:4.0%}] {feedback.stage}', file=sys.stderr)

    msg = send_goal(args.text, args.namespace, args.top_k, args.platform or '', args.timeout,
                    show_feedback)
    if msg is None:
        print(f'cgrs goal: no result within {args.timeout:g} s; is retrieval_node running in '
              f'namespace {args.namespace!r} on ROS_DOMAIN_ID the same as this shell?',
              file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(result_to_dict(msg), indent=2))
    elif msg.status != RetrievalResult.STATUS_OK:
        print(f'error (status {msg.status}): {msg.error}', file=sys.stderr)
    else:
        print(f'query: {msg.query}\n normalized: {msg.normalized_query}')
        for c in msg.candidates:
            print(f'{c.rank:3d}. {c.image_id:24s} {c.platform:9s} fused {c.fused_score:6.3f} '
                  f'lat {c.latitude:.6f} lon {c.longitude:.6f} '
                  f'map ({c.pose.position.x:.1f}, {c.pose.position.y:.1f})')
        print(f'total {msg.total_ms:.1f} ms')
    return 0 if msg.status == RetrievalResult.STATUS_OK else 1


def register(subparsers):
    """Add the ``goal`` subcommand."""
    parser = subparsers.add_parser('goal', help='send a goal to a running retrieval_node')
    parser.add_argument('text', help='the place, in words')
    parser.add_argument('--timeout', type=float, default=60.0, help='seconds to wait')
    parser.add_argument('--top-k', type=int, default=0, help='candidates (0 = node default)')
    parser.add_argument('--platform', choices=('satellite', 'drone', 'ground'),
                        help='only this platform')
    parser.add_argument('--namespace', default='cgrs', help='namespace of retrieval_node')
    parser.add_argument('--json', action='store_true', help='print JSON')
    parser.set_defaults(func=run)
