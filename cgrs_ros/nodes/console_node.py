"""console_node: the operator's web console (http://127.0.0.1:8080 by default).

A page to type a goal, see the ranked candidates (thumbnails, captions, per-stage scores,
confidence), pick one and send it, dismiss or cancel, and watch the drone on a map drawn from
the gallery's own satellite tiles. The web app is ``cgrs_ros/nodes/console`` (aiohttp, no CDN);
this node is its ROS side and talks to retrieval_node like any other client:

- action client ``retrieve`` (goals typed on the page; feedback shown as it comes);
- service client ``retrieval_node/confirm`` (send candidate N, dismiss a held ranking);
- sub ``result`` (cgrs_ros/RetrievalResult): every ranking, whoever asked for it;
- pub ``/clicked_point`` (geometry_msgs/PointStamped in ``map``): a click on the map sets
  retrieval_node's search prior, as rviz's Publish Point tool does; the prior is followed
  through ``/parameter_events`` and cleared with a parameter set;
- sub ``odom`` (nav_msgs/Odometry, map frame) and ``status`` (std_msgs/String JSON) of
  sim_drone or a real drone's bridge: the live position;
- pub ``audio`` (cgrs_ros/AudioData, 16-bit mono PCM in 100 ms chunks): push-to-talk, what
  the browser recorded while the button was held, for voice_node. The page shows the button
  only while something (voice_node) subscribes to ``audio``.

Binds ``console.host`` (127.0.0.1); any other address needs ``console.token``.
"""

import asyncio
import collections
import itertools
import math
import threading
import time

from cgrs_ros.action import Retrieve
from cgrs_ros.engine import geo
from cgrs_ros.msg import AudioData, RetrievalResult
from cgrs_ros.nodes import convert
from cgrs_ros.nodes.console.web import check_bind, ConsoleApp, token_from
from cgrs_ros.nodes.datum import DATUM_PARAMETERS, resolve_datum
from cgrs_ros.nodes.parameters import declare_parameters, Param
from cgrs_ros.nodes.spin import spin_node
from cgrs_ros.srv import Confirm
from geometry_msgs.msg import PointStamped
from nav_msgs.msg import Odometry
from rcl_interfaces.msg import Parameter, ParameterEvent, ParameterType, ParameterValue
from rcl_interfaces.srv import GetParameters, SetParameters
from rclpy.action import ActionClient
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import String

STATUS_NAMES = {
    RetrievalResult.STATUS_OK: 'ok', RetrievalResult.STATUS_INVALID_GOAL: 'invalid goal',
    RetrievalResult.STATUS_NO_MATCH: 'no match', RetrievalResult.STATUS_BUSY: 'busy',
    RetrievalResult.STATUS_CANCELED: 'canceled', RetrievalResult.STATUS_ERROR: 'error',
    RetrievalResult.STATUS_AWAITING_CONFIRMATION: 'awaiting confirmation',
}
PRIOR_KEYS = ('prior.latitude', 'prior.longitude', 'prior_radius_m')
AUDIO_CHUNK_S = 0.1   # AudioData asks for chunks of 10-200 ms

PARAMETERS = (
    Param('gallery_dir', '', 'Gallery folder (thumbnails and the map mosaic); read-only.',
          read_only=True,
          check=lambda v: None if v.strip() else 'gallery_dir is empty; set it to the gallery '
          'folder retrieval_node uses'),
    Param('map_frame', 'map', 'Frame of poses, clicked points and odometry.'),
    *DATUM_PARAMETERS,  # the same map as retrieval_node and sim_drone
    Param('console.host', '127.0.0.1', 'Address the web console listens on; anything but '
          'the loopback needs console.token.', read_only=True),
    Param('console.port', 8080, 'TCP port of the web console (0 = any free port, logged).',
          minimum=0, maximum=65535, read_only=True),
    Param('console.token', '', 'Secret every request must carry (?token= once, then a '
          'cookie); empty = CGRS_CONSOLE_TOKEN or none (loopback only).', read_only=True),
    Param('retrieval_node', 'retrieval_node', 'Name of retrieval_node in this namespace.',
          read_only=True),
    Param('map_side_px', 1600, 'Longer side of the map mosaic in pixels.',
          minimum=200, maximum=8000, read_only=True),
    Param('map_tile_m', 0.0, 'Ground size of a satellite tile on the map (m); 0 = the median '
          'spacing of the tiles.', minimum=0.0, maximum=10000.0, read_only=True),
    Param('history_size', 50, 'Rankings kept in the goal history.', minimum=1, maximum=1000),
)


def _nan_value():
    return ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=math.nan)


class ConsoleNode(Node):
    """Serves the console and relays between the page and retrieval_node."""

    def __init__(self, **kwargs):
        super().__init__('console_node', **kwargs)
        self.params = declare_parameters(self, PARAMETERS)
        self.web = None
        token = token_from(self.params['console.token'])
        check_bind(self.params['console.host'], token)  # before anything else: refuse early
        from cgrs_ros.engine.gallery import load_gallery
        gallery = load_gallery(self.params['gallery_dir'], check_images='exists')
        # The datum as retrieval_node derives it (the gallery's images that exist).
        self._datum = resolve_datum(self.params, lambda: gallery.items, self.get_logger())
        self._lock = threading.Lock()
        self._history = collections.deque(maxlen=self.params['history_size'])
        self._active = {}            # local goal id -> ClientGoalHandle
        self._goal_ids = itertools.count(1)
        self._drone = {}
        self._drone_sent = 0.0
        self._prior = None
        self._voice = False
        self._frame = self.params['map_frame']

        group = ReentrantCallbackGroup()
        target = self.params['retrieval_node']
        self._action = ActionClient(self, Retrieve, 'retrieve', callback_group=group)
        self._confirm = self.create_client(Confirm, f'{target}/confirm', callback_group=group)
        self._set_params = self.create_client(SetParameters, f'{target}/set_parameters',
                                              callback_group=group)
        self._get_params = self.create_client(GetParameters, f'{target}/get_parameters',
                                              callback_group=group)
        self._target = f'{self.get_namespace().rstrip("/")}/{target}'
        self._click_pub = self.create_publisher(PointStamped, '/clicked_point', 10)
        self._audio_pub = self.create_publisher(AudioData, 'audio', 100)
        self.create_timer(1.0, self._check_voice)
        self.create_subscription(RetrievalResult, 'result', self._on_result, 50)
        self.create_subscription(Odometry, 'odom', self._on_odom, 10)
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                             reliability=ReliabilityPolicy.RELIABLE)
        self.create_subscription(String, 'status', self._on_drone_status, latched)
        self.create_subscription(ParameterEvent, '/parameter_events', self._on_param_event, 50)
        self._prior_timer = self.create_timer(1.0, self._ask_prior, callback_group=group)

        self.web = ConsoleApp(self, gallery, self._datum, self.params['console.host'],
                              self.params['console.port'], token,
                              self.params['map_side_px'], self.params['map_tile_m'])
        port = self.web.start()
        self.get_logger().info(f'console at http://{self.params["console.host"]}:{port}/')

    # ---- what the page is shown ------------------------------------------------------------
    def state(self):
        """Return everything a freshly opened page needs (called by the web thread)."""
        with self._lock:
            return {'history': list(self._history), 'drone': dict(self._drone),
                    'prior': self._prior, 'map_frame': self._frame,
                    'connected': self._action.server_is_ready(), 'voice': self._voice}

    def _xy(self, lat, lon):
        e, n, _ = geo.geodetic_to_enu(lat, lon, self._datum.alt, self._datum)
        return e, n

    def _check_voice(self):
        """Offer push-to-talk while something (voice_node) listens on ``audio``."""
        voice = self.count_subscribers('audio') > 0
        if voice != self._voice:
            self._voice = voice
            self.web.publish({'type': 'voice', 'available': voice})

    def _on_result(self, msg):
        result = convert.result_to_dict(msg)
        result['status_name'] = STATUS_NAMES.get(msg.status, str(msg.status))
        result['stamp'] = time.time()
        if result['area']:
            result['area']['x'], result['area']['y'] = self._xy(msg.area_latitude,
                                                                msg.area_longitude)
        with self._lock:
            self._history.appendleft(result)
        self.web.publish({'type': 'result', 'result': result})

    def _on_odom(self, msg):
        p = msg.pose.pose
        yaw = 2.0 * math.atan2(p.orientation.z, p.orientation.w)
        with self._lock:
            self._drone.update(x=p.position.x, y=p.position.y, z=p.position.z, yaw=yaw)
            drone = dict(self._drone)
        now = time.monotonic()
        if now - self._drone_sent >= 0.2:  # 5 Hz is plenty for a map
            self._drone_sent = now
            self.web.publish({'type': 'drone', 'drone': drone})

    def _on_drone_status(self, msg):
        with self._lock:
            self._drone['status'] = msg.data
            drone = dict(self._drone)
        self.web.publish({'type': 'drone', 'drone': drone})

    # ---- the search prior (retrieval_node's parameters) -----------------------------------
    def _ask_prior(self):
        if not self._get_params.service_is_ready():
            return
        self._prior_timer.cancel()  # asked once; /parameter_events tells the changes

        def answered(future):
            if future.result() is not None:
                values = (v.double_value for v in future.result().values)
                self._set_prior_values(dict(zip(PRIOR_KEYS, values)))
        self._get_params.call_async(GetParameters.Request(names=list(PRIOR_KEYS))
                                    ).add_done_callback(answered)

    def _on_param_event(self, msg):
        if msg.node != self._target:
            return
        params = (*msg.new_parameters, *msg.changed_parameters)
        changed = {p.name: p.value.double_value for p in params
                   if p.name in PRIOR_KEYS}
        if changed:
            self._set_prior_values(changed)

    def _set_prior_values(self, values):
        # retrieval_node sets latitude and longitude one event each: keep what is known.
        with self._lock:
            prior = dict(self._prior or {'lat': math.nan, 'lon': math.nan, 'radius_m': 300.0})
            for key, name in zip(PRIOR_KEYS, ('lat', 'lon', 'radius_m')):
                if key in values:
                    prior[name] = values[key]
            prior['set'] = not (math.isnan(prior['lat']) or math.isnan(prior['lon']))
            if prior['set']:
                prior['x'], prior['y'] = self._xy(prior['lat'], prior['lon'])
            self._prior = prior
        self.web.publish({'type': 'prior', 'prior': prior})

    # ---- what the page may ask (called on the web thread; futures bridged to asyncio) ----
    def _bridge(self, rclpy_future, convert_result):
        """Return an asyncio future (of the web thread) for an rclpy future, converted."""
        loop = asyncio.get_running_loop()
        out = loop.create_future()

        def done(f):
            try:
                value = convert_result(f.result())
            except Exception as exc:  # the page gets the reason, not a hung request
                value = {'ok': False, 'message': f'{type(exc).__name__}: {exc}'}
            loop.call_soon_threadsafe(lambda: out.done() or out.set_result(value))
        rclpy_future.add_done_callback(done)
        return out

    def send_goal(self, fields):
        """Send a goal typed on the page through the retrieve action."""
        if not self._action.server_is_ready():
            return {'ok': False, 'message': 'retrieval_node is not reachable (is the stack '
                    'running on this ROS_DOMAIN_ID?)'}
        goal = Retrieve.Goal(description=fields['text'], platform=fields['platform'],
                             goal_policy=fields['policy'], top_k=max(fields['top_k'] or 0, 0))
        goal_id = next(self._goal_ids)

        def feedback(msg):
            self.web.publish({'type': 'feedback', 'goal': goal_id, 'stage': msg.feedback.stage,
                              'progress': msg.feedback.progress})

        def accepted(handle):
            if not handle.accepted:
                return {'ok': False, 'message': 'retrieval_node refused the goal'}
            with self._lock:
                self._active[goal_id] = handle
            handle.get_result_async().add_done_callback(
                lambda _: self._active.pop(goal_id, None))
            return {'ok': True, 'goal': goal_id}
        return self._bridge(self._action.send_goal_async(goal, feedback_callback=feedback),
                            accepted)

    def confirm(self, result_id, rank):
        """Send candidate ``rank`` of a ranking (0: dismiss) through ~/confirm."""
        if not self._confirm.service_is_ready():
            return {'ok': False, 'message': 'retrieval_node/confirm is not reachable'}
        return self._bridge(
            self._confirm.call_async(Confirm.Request(result_id=result_id, rank=rank)),
            lambda r: {'ok': r.success, 'message': r.message})

    def cancel(self):
        """Cancel the retrievals this console started that are still running."""
        with self._lock:
            handles = list(self._active.values())
        for handle in handles:
            handle.cancel_goal_async()
        return {'ok': True, 'message': f'{len(handles)} running goal(s) canceled'}

    def set_prior(self, x, y):
        """Publish a map click on /clicked_point (retrieval_node sets its search prior)."""
        point = PointStamped()
        point.header.frame_id = self._frame
        point.header.stamp = self.get_clock().now().to_msg()
        point.point.x, point.point.y = x, y
        self._click_pub.publish(point)
        return {'ok': True, 'message': f'search prior at map ({x:.0f}, {y:.0f})'}

    def clear_prior(self):
        """Clear retrieval_node's search prior (its prior.* parameters to NaN)."""
        if not self._set_params.service_is_ready():
            return {'ok': False, 'message': 'retrieval_node is not reachable'}
        request = SetParameters.Request(parameters=[
            Parameter(name=name, value=_nan_value()) for name in PRIOR_KEYS[:2]])
        return self._bridge(self._set_params.call_async(request), lambda r: {
            'ok': all(x.successful for x in r.results),
            'message': '; '.join(x.reason for x in r.results if x.reason) or 'prior cleared'})

    def publish_audio(self, data, rate):
        """Publish push-to-talk PCM (S16LE mono at ``rate``) on ``audio`` in 100 ms chunks."""
        if self.count_subscribers('audio') == 0:
            return {'ok': False, 'message': 'nothing listens on audio: start voice_node'}
        step = 2 * max(int(rate * AUDIO_CHUNK_S), 1)
        stamp = self.get_clock().now()
        for offset in range(0, len(data), step):
            chunk = AudioData(sample_rate=rate, channels=1, encoding=AudioData.ENCODING_S16LE,
                              data=data[offset:offset + step])
            # Each chunk is stamped with when its first sample was captured (relative to now).
            chunk.header.stamp = (stamp - Duration(seconds=(len(data) - offset) / 2 / rate)
                                  ).to_msg()
            self._audio_pub.publish(chunk)
        seconds = len(data) / 2 / rate
        return {'ok': True, 'message': f'{seconds:.1f} s of speech sent to voice_node'}

    def destroy_node(self):
        """Stop the web server, then destroy the node."""
        if self.web is not None:
            self.web.stop()
        return super().destroy_node()


def main(args=None):
    """Run console_node until Ctrl-C or shutdown."""
    return spin_node(ConsoleNode, 'console_node', threads=4, args=args)


if __name__ == '__main__':
    raise SystemExit(main())
