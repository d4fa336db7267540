"""retrieval_node: natural-language goals in, the best matching place's pose out.

Topics (relative names live in the node's namespace, ``cgrs`` in the launch file):

- sub ``goal_text`` (std_msgs/String): a goal in words.
- sub ``goal_image`` (sensor_msgs/Image) and ``goal_image/compressed``
  (sensor_msgs/CompressedImage): a goal as a photo of the place ("go where this was taken"),
  ranked by the image tower (``Retriever.query_image``); decoded without cv_bridge. An image
  that cannot be decoded is answered with STATUS_INVALID_GOAL and the reason.
- action ``retrieve`` (cgrs_ros/action/Retrieve): the same, with feedback, result, cancel; a
  goal whose ``image`` holds data is an image query.
- pub ``/goal_pose`` (geometry_msgs/PoseStamped, map frame) for Nav2, ``goal_fix``
  (sensor_msgs/NavSatFix), ``result`` (cgrs_ros/RetrievalResult), ``candidates``
  (visualization_msgs/MarkerArray), ``/diagnostics``.
- sub ``captions_updated`` (std_msgs/UInt32): captioning_node says new captions exist.
- sub ``/clicked_point`` (geometry_msgs/PointStamped in ``map``, rviz's Publish Point tool):
  sets the search prior (``prior.latitude``/``prior.longitude``, radius ``prior_radius_m``);
  goals then rank only gallery images within that radius (engine ``near``) until it is cleared
  (``ros2 param set ... prior.latitude nan``). An action goal's ``near_*`` overrides it.
- service ``~/confirm`` (cgrs_ros/srv/Confirm): send candidate ``rank`` of a result (by
  ``result_id``) to /goal_pose, or dismiss a result awaiting confirmation (rank 0).

Confirmation (``goal_policy``): ``auto`` publishes the best candidate at once; ``confirm``
holds every ranking; ``confirm_below`` holds a ranking whose calibrated confidence is under
``min_confidence`` or whose margin to the next place is under ``min_margin``
(engine/confidence.py). A held ranking is published with STATUS_AWAITING_CONFIRMATION and its
candidates, and no /goal_pose, until an operator confirms one.

Busy policy (bounded): one worker thread runs queries in arrival order; at most
``max_pending`` goals wait behind the running one. A topic goal that finds the queue full
replaces the oldest waiting topic goal ("latest instruction wins"; the replaced one gets a
STATUS_BUSY result). An action goal that finds the queue full is finished at once with
STATUS_BUSY (aborted), so the caller knows. Cancelling a waiting goal removes it; cancelling
a running one discards its result before anything is published.
"""

import collections
from dataclasses import dataclass, field
import math
import threading
import uuid

from cgrs_ros.action import Retrieve
from cgrs_ros.engine import confidence, geo
from cgrs_ros.engine.area import MAX_RADIUS_M, SearchArea
from cgrs_ros.engine.errors import CgrsError
from cgrs_ros.msg import RetrievalResult
from cgrs_ros.nodes import convert, image_msgs
from cgrs_ros.nodes.datum import DATUM_PARAMETERS, resolve_datum
from cgrs_ros.nodes.engine_loader import open_retriever
from cgrs_ros.nodes.parameters import declare_parameters, Param
from cgrs_ros.nodes.spin import spin_node
from cgrs_ros.srv import Confirm
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PointStamped, PoseStamped
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import CompressedImage, Image, NavSatFix
from std_msgs.msg import String, UInt32
from visualization_msgs.msg import MarkerArray

PLATFORMS = ('satellite', 'drone', 'ground')
GOAL_POLICIES = ('auto', 'confirm', 'confirm_below')
# The most candidates one result may carry, for the parameter and for action goals alike.
TOP_K_MAX = 100
# Results an operator can still confirm a candidate of (by result_id), newest kept.
RECENT_RESULTS = 32


def _platform_ok(value):
    return None if value in ('', *PLATFORMS) else (
        f'platform {value!r} is not one of satellite, drone, ground (or empty for all)')


PARAMETERS = (
    Param('gallery_dir', '', 'Gallery folder: manifest (gallery.csv/.jsonl) and images.',
          read_only=True,
          check=lambda v: None if v.strip() else 'gallery_dir is empty; set it to the gallery '
          'folder, e.g. -p gallery_dir:=/data/gallery or gallery_dir:=... on the launch line'),
    Param('config', '', 'Engine config YAML (models, retrieval); empty = built-in defaults.',
          read_only=True),
    Param('state_dir', '', 'Where indexes and captions live; empty = GALLERY/.cgrs.',
          read_only=True),
    Param('map_frame', 'map', 'Frame of the published poses (ENU around the datum).',
          check=lambda v: None if v.strip() else 'map_frame must not be empty'),
    *DATUM_PARAMETERS,  # shared with sim_drone: both must put map at one place
    Param('top_k', 5, 'Candidates per result (an action goal may ask for another number).',
          minimum=1, maximum=TOP_K_MAX),
    Param('coarse_k', 20, 'Coarse (image-text) candidates reranked by captions.',
          minimum=1, maximum=1000),
    Param('rerank_k', 0, 'Candidates the reranker stage scores; 0 = reranker.k of the config.',
          minimum=0, maximum=1000),
    Param('rerank_timeout_ms', 0.0, 'Per-goal budget of the reranker stage (ms); candidates '
          'not scored in time keep their order; 0 = reranker.timeout_ms of the config.',
          minimum=0.0, maximum=3_600_000.0),
    Param('publish_goal_pose', True, 'Publish the best candidate on /goal_pose for Nav2.'),
    Param('max_goal_length', 500, 'Longest goal text accepted, in characters.',
          minimum=1, maximum=100000),
    Param('max_pending', 1, 'Goals allowed to wait while a query runs (see busy policy).',
          minimum=0, maximum=100),
    Param('caption_poll_period', 5.0,
          'Seconds between checks for new captions in the store (0 = only on notification).',
          minimum=0.0, maximum=3600.0),
    Param('image_platform', '', 'Gallery rows an image goal is ranked against (e.g. '
          'satellite for drone photo -> satellite tile); empty = all.',
          check=_platform_ok),
    Param('image_query_platform', 'drone', 'Platform the goal photos come from (selects the '
          'expert of image encoders that have platform experts).', choices=PLATFORMS),
    Param('max_image_pixels', 16_000_000, 'Goal images with more pixels are refused before '
          'decoding.', minimum=1, maximum=400_000_000),
    Param('goal_policy', 'auto', 'auto: publish the best candidate at once; confirm: every '
          'ranking waits for an operator (~/confirm, the console); confirm_below: only those '
          'under min_confidence or min_margin wait.', choices=GOAL_POLICIES),
    Param('min_confidence', 0.5, 'confirm_below holds a ranking whose calibrated confidence '
          '(engine config section confidence) is under this; 0 = confidence not used.',
          minimum=0.0, maximum=1.0),
    Param('min_margin', 0.0, 'confirm_below holds a ranking whose score margin between the '
          'best place and the next is under this; 0 = margin not used.',
          minimum=0.0, maximum=10.0),
    Param('prior.latitude', math.nan, 'Centre of the search prior (WGS84 degrees); NaN = none. '
          'Set by /clicked_point.', minimum=-90.0, maximum=90.0, allow_nan=True),
    Param('prior.longitude', math.nan, 'Centre of the search prior (WGS84 degrees); NaN = '
          'none. Set by /clicked_point.', minimum=-180.0, maximum=180.0, allow_nan=True),
    Param('prior_radius_m', 300.0, 'Radius of the search prior around a clicked point (m).',
          minimum=1.0, maximum=MAX_RADIUS_M),
)


class _Canceled(Exception):
    """Raised between engine stages when the action client cancelled the goal."""


@dataclass
class Job:
    """One goal waiting for (or in) the worker."""

    text: str                                # the goal text, or the label of an image goal
    top_k: int
    platform: str
    source: str                              # 'topic' | 'action'
    goal_handle: object = None
    image: object = None                     # a decoded PIL image: an image query
    area: object = None                      # SearchArea the ranking is restricted to, or None
    policy: str = 'auto'
    done: threading.Event = field(default_factory=threading.Event)
    result: RetrievalResult = None

    def cancel_requested(self):
        """Whether the action client asked to cancel this goal."""
        return self.goal_handle is not None and self.goal_handle.is_cancel_requested

    def feedback(self, stage, progress):
        """Report progress to the action client (topic goals have nobody to tell)."""
        if self.goal_handle is not None and self.goal_handle.is_active:
            self.goal_handle.publish_feedback(Retrieve.Feedback(stage=stage, progress=progress))


def validate_goal_text(text, max_length):
    """Return the goal stripped, or raise ValueError with a reason a user can act on."""
    if '\ufffd' in text:
        # rclpy turns bytes that are not UTF-8 into U+FFFD replacement characters.
        raise ValueError('goal text could not be decoded as UTF-8 (it holds replacement '
                         'characters); publish the description as UTF-8 text')
    stripped = text.strip()
    if not stripped:
        raise ValueError('goal text is empty; send a description of the place, e.g. '
                         '"the red-roofed building beside the circular plaza"')
    if len(stripped) > max_length:
        raise ValueError(f'goal text is {len(stripped)} characters, more than max_goal_length '
                         f'({max_length}); shorten it or raise the parameter')
    if not any(ch.isalnum() for ch in stripped):
        # A zero-width space, a control character or emoji only: nothing to search for.
        raise ValueError('goal text has no letters or digits; send a description of the '
                         'place, e.g. "the red-roofed building beside the circular plaza"')
    return stripped


def _image_label(msg):
    """Return how results name an image goal, e.g. ``[image goal: 256x256 rgb8]``."""
    return f'[image goal: {image_msgs.describe(msg)}]'


class RetrievalNode(Node):
    """Runs retrievals off the executor thread and publishes the best candidate's pose."""

    def __init__(self, **kwargs):
        super().__init__('retrieval_node', **kwargs)
        self.params = declare_parameters(self, PARAMETERS, on_change=self._on_parameter)
        self._lock = threading.Condition()
        self._pending = collections.deque()
        self._running = None
        self._stop = False
        self._refresh_requested = False
        self._retriever = None
        self._engine_state = 'loading'
        self._engine_error = ''
        self._datum = None
        self._served = 0
        self._last_latency_ms = math.nan
        self._recent = collections.OrderedDict()  # result_id -> RetrievalResult (confirmable)

        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                             reliability=ReliabilityPolicy.RELIABLE)
        self._pose_pub = self.create_publisher(PoseStamped, '/goal_pose', 1)
        self._fix_pub = self.create_publisher(NavSatFix, 'goal_fix', 1)
        # Deep enough that a burst of goals is answered one result each (busy or not).
        self._result_pub = self.create_publisher(RetrievalResult, 'result', 50)
        self._marker_pub = self.create_publisher(MarkerArray, 'candidates', latched)
        self._diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)

        # raw=True: the node decodes the String itself, so text that is not UTF-8 becomes an
        # error result instead of an exception inside the executor.
        self.create_subscription(String, 'goal_text', self._on_goal_text, 50, raw=True)
        self.create_subscription(Image, 'goal_image', self._on_goal_image, 10)
        self.create_subscription(CompressedImage, 'goal_image/compressed',
                                 self._on_goal_image, 10)
        self.create_subscription(UInt32, 'captions_updated', self._on_captions_updated, 10)
        self.create_subscription(PointStamped, '/clicked_point', self._on_clicked_point, 10)
        self.create_service(Confirm, '~/confirm', self._on_confirm,
                            callback_group=ReentrantCallbackGroup())
        self._action = ActionServer(
            self, Retrieve, 'retrieve', execute_callback=self._execute,
            goal_callback=lambda goal: GoalResponse.ACCEPT,
            cancel_callback=lambda handle: CancelResponse.ACCEPT,
            callback_group=ReentrantCallbackGroup())
        timers = MutuallyExclusiveCallbackGroup()
        self.create_timer(1.0, self._publish_diagnostics, callback_group=timers)
        if self.params['caption_poll_period'] > 0:
            self.create_timer(self.params['caption_poll_period'], self._request_refresh,
                              callback_group=timers)

        self._worker = threading.Thread(target=self._work, name='cgrs-retrieval', daemon=True)
        self._worker.start()

    # ---- parameters -------------------------------------------------------------------
    def _on_parameter(self, name, value):
        self.params[name] = value
        if name.startswith('datum.'):
            self._datum = None  # recomputed before the next query
        elif name == 'coarse_k' and self._retriever is not None:
            self._retriever.config.retrieval.coarse_k = value  # read on every query
        elif name in ('rerank_k', 'rerank_timeout_ms') and self._retriever is not None:
            self._apply_rerank_params(self._retriever.config.reranker)

    def _apply_rerank_params(self, section):
        """Put the node's reranker overrides into the engine's reranker section (0 = keep)."""
        if self.params['rerank_k']:
            section.k = self.params['rerank_k']
        if self.params['rerank_timeout_ms']:
            section.timeout_ms = self.params['rerank_timeout_ms']

    def _datum_now(self):
        if self._datum is None:
            self._datum = resolve_datum(self.params, lambda: self._retriever.gallery.items,
                                        self.get_logger())
        return self._datum

    # ---- goals in -------------------------------------------------------------------
    def _on_goal_text(self, raw):
        try:
            text = deserialize_message(raw, String).data
        except (UnicodeDecodeError, RuntimeError, ValueError) as exc:
            self._reject('', f'goal text could not be decoded ({type(exc).__name__}); '
                             'publish UTF-8 text on goal_text')
            return
        try:
            text = validate_goal_text(text, self.params['max_goal_length'])
        except ValueError as exc:
            self._reject(text[:200].replace('\ufffd', '?'), str(exc))
            return
        job = Job(text=text, top_k=self.params['top_k'], platform='', source='topic',
                  area=self._prior(), policy=self.params['goal_policy'])
        self._enqueue(job)

    def _on_goal_image(self, msg):
        label = _image_label(msg)
        try:
            image = self._decode_goal_image(msg)
        except ValueError as exc:
            self._reject(label, str(exc))
            return
        self._enqueue(Job(text=label, top_k=self.params['top_k'],
                          platform=self.params['image_platform'], source='topic', image=image,
                          area=self._prior(), policy=self.params['goal_policy']))

    def _prior(self):
        """Return the clicked search prior as a SearchArea, or None when none is set."""
        lat, lon = self.params['prior.latitude'], self.params['prior.longitude']
        if math.isnan(lat) or math.isnan(lon):
            return None
        return SearchArea(lat, lon, self.params['prior_radius_m'])

    def _on_clicked_point(self, msg):
        """Set the search prior from rviz's Publish Point tool (or the console's map)."""
        frame = msg.header.frame_id or self.params['map_frame']
        if frame != self.params['map_frame']:
            self.get_logger().warning(
                f'clicked point in frame {frame!r} ignored: the node has no tf to transform '
                f'it; click in the fixed frame {self.params["map_frame"]!r}')
            return
        if self._retriever is None and not all(
                math.isfinite(self.params[f'datum.{k}']) for k in ('latitude', 'longitude')):
            self.get_logger().warning('clicked point ignored: the datum comes from the gallery, '
                                      'which is still loading; click again in a moment')
            return
        point = msg.point
        lat, lon, _ = geo.enu_to_geodetic(point.x, point.y, point.z, self._datum_now())
        result = self.set_parameters([Parameter('prior.latitude', value=float(lat)),
                                      Parameter('prior.longitude', value=float(lon))])
        if all(r.successful for r in result):
            self.get_logger().info(
                f'search prior: {self.params["prior_radius_m"]:g} m around lat {lat:.6f}, '
                f'lon {lon:.6f} (map {point.x:.1f}, {point.y:.1f})')
        else:
            self.get_logger().warning(f'clicked point refused: {result[0].reason}')

    def _decode_goal_image(self, msg):
        """Return the PIL image of a goal image message; ValueError with the reason."""
        try:
            return image_msgs.msg_to_pil(msg, self.params['max_image_pixels'])
        except ValueError as exc:
            raise ValueError(f'the goal image could not be used: {exc}') from None

    def _reject(self, text, reason, status=RetrievalResult.STATUS_INVALID_GOAL, job=None):
        self.get_logger().warning(f'goal refused: {reason}')
        result = convert.error_message(text, status, reason, self.params['map_frame'],
                                       self.get_clock().now().to_msg(),
                                       job.platform if job else '')
        self._result_pub.publish(result)
        return result

    def _enqueue(self, job):
        """Queue ``job`` under the busy policy; return False when it was refused as busy."""
        dropped = None
        with self._lock:
            if len(self._pending) >= self.params['max_pending'] and (
                    self._running is not None or self._pending):
                waiting_topics = [j for j in self._pending if j.source == 'topic']
                if job.source == 'topic' and waiting_topics:
                    dropped = waiting_topics[0]
                    self._pending.remove(dropped)
                else:
                    dropped = job
            if dropped is not job:
                self._pending.append(job)
                self._lock.notify_all()
        if dropped is not None:
            dropped.result = self._reject(
                dropped.text, 'the node was busy and max_pending goals were already waiting; '
                'this goal was dropped (send it again, or raise max_pending)',
                RetrievalResult.STATUS_BUSY, dropped)
            dropped.done.set()
        return dropped is not job

    def _execute(self, goal_handle):
        goal = goal_handle.request
        if goal.confirm_id or goal.confirm_rank:
            ok, message, result = self._confirm(goal.confirm_id, goal.confirm_rank)
            if not ok:
                result = self._reject(goal.confirm_id, message)
            (goal_handle.succeed if ok else goal_handle.abort)()
            return Retrieve.Result(result=result)
        platform = goal.platform.strip().lower()
        policy = goal.goal_policy.strip().lower() or self.params['goal_policy']
        job = Job(text=goal.description, top_k=goal.top_k or self.params['top_k'],
                  platform=platform, source='action', goal_handle=goal_handle, policy=policy)
        try:
            reason = _platform_ok(platform)
            if reason:
                raise ValueError(reason)
            if policy not in GOAL_POLICIES:
                raise ValueError(f'goal_policy {goal.goal_policy!r} is not one of '
                                 f'{", ".join(GOAL_POLICIES)} (empty: the goal_policy parameter)')
            job.area = self._goal_area(goal)
            if goal.top_k > TOP_K_MAX:
                raise ValueError(f'top_k {goal.top_k} is more than {TOP_K_MAX}, the most the '
                                 'top_k parameter allows; ask for fewer candidates')
            if len(goal.image.data):
                job.text = _image_label(goal.image)
                job.platform = platform or self.params['image_platform']
                job.image = self._decode_goal_image(goal.image)
            else:
                job.text = validate_goal_text(goal.description, self.params['max_goal_length'])
        except ValueError as exc:
            job.result = self._reject(job.text[:200], str(exc), job=job)
            goal_handle.abort()
            return Retrieve.Result(result=job.result)
        job.feedback('queued', 0.0)
        if not self._enqueue(job):
            goal_handle.abort()
            return Retrieve.Result(result=job.result)
        while not job.done.wait(0.05):
            if goal_handle.is_cancel_requested:
                with self._lock:
                    if job in self._pending:  # still waiting: take it out now
                        self._pending.remove(job)
                        job.result = self._finish_canceled(job)
                        job.done.set()
        result = job.result
        if result.status == RetrievalResult.STATUS_CANCELED:
            goal_handle.canceled()
        elif result.status in (RetrievalResult.STATUS_OK,
                               RetrievalResult.STATUS_AWAITING_CONFIRMATION):
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return Retrieve.Result(result=result)

    def _goal_area(self, goal):
        """Return the action goal's search area (near_*), the prior, or None; ValueError."""
        if goal.near_radius_m == 0.0:
            return self._prior()
        try:
            return SearchArea.parse((goal.near_latitude, goal.near_longitude,
                                     goal.near_radius_m))
        except CgrsError as exc:
            raise ValueError(f'the search area of the goal is invalid: {exc}; set '
                             'near_radius_m 0 for the whole gallery') from None

    # ---- confirmation -----------------------------------------------------------------
    def _remember(self, result):
        with self._lock:
            self._recent[result.result_id] = result
            self._recent.move_to_end(result.result_id)
            while len(self._recent) > RECENT_RESULTS:
                self._recent.popitem(last=False)

    def _on_confirm(self, request, response):
        response.success, response.message, result = self._confirm(request.result_id,
                                                                   request.rank)
        if result is not None:
            response.result = result
        return response

    def _confirm(self, result_id, rank):
        """Send candidate ``rank`` of a recent result (rank 0: dismiss a held one).

        Returns (success, message, the result as published or None).
        """
        with self._lock:
            if not result_id:
                held = [r for r in self._recent.values()
                        if r.status == RetrievalResult.STATUS_AWAITING_CONFIRMATION]
                base = held[-1] if held else None
                if base is None:
                    return False, 'no result is awaiting confirmation; name one by result_id', \
                        None
            else:
                base = self._recent.get(result_id)
                if base is None:
                    return False, (f'no recent result {result_id!r}: the node keeps the last '
                                   f'{RECENT_RESULTS} results; send the goal again'), None
        if base.status not in (RetrievalResult.STATUS_OK, RetrievalResult.STATUS_NO_MATCH,
                               RetrievalResult.STATUS_AWAITING_CONFIRMATION):
            return False, f'result {base.result_id} has no candidates to send', None
        if rank > len(base.candidates):
            return False, (f'rank {rank} is out of range: result {base.result_id} has '
                           f'{len(base.candidates)} candidates (1 = best)'), None
        # A copy: the stored ranking keeps its own status until this one is published.
        result = deserialize_message(serialize_message(base), RetrievalResult)
        result.header.stamp = self.get_clock().now().to_msg()
        if rank == 0:
            if base.status != RetrievalResult.STATUS_AWAITING_CONFIRMATION:
                return False, (f'result {base.result_id} is not awaiting confirmation; '
                               'nothing to dismiss'), None
            result.status = RetrievalResult.STATUS_CANCELED
            result.error = 'dismissed by the operator: nothing was sent'
            message = f'result {base.result_id} dismissed'
        else:
            result.status, result.error, result.selected_rank = (
                RetrievalResult.STATUS_OK, '', rank)
            self._send(result)
            chosen = result.candidates[rank - 1]
            message = f'sent candidate {rank} ({chosen.image_id}) of result {base.result_id}'
        self.get_logger().info(message)
        self._remember(result)
        self._result_pub.publish(result)
        return True, message, result

    def _send(self, result):
        """Publish the selected candidate: /goal_pose (unless off), goal_fix and markers."""
        if self.params['publish_goal_pose']:
            self._pose_pub.publish(convert.goal_pose(result))
        self._fix_pub.publish(convert.goal_fix(result))
        self._marker_pub.publish(convert.candidate_markers(result))

    def _finish_canceled(self, job):
        self.get_logger().info(f'goal canceled: {job.text[:80]!r}')
        return convert.error_message(job.text, RetrievalResult.STATUS_CANCELED,
                                     'the goal was canceled by its client',
                                     self.params['map_frame'],
                                     self.get_clock().now().to_msg(), job.platform)

    def _on_captions_updated(self, msg):
        self.get_logger().info(f'captioning_node reports {msg.data} captions; refreshing')
        self._request_refresh()

    def _request_refresh(self):
        with self._lock:
            self._refresh_requested = True
            self._lock.notify_all()

    # ---- the worker -----------------------------------------------------------------
    def _load_engine(self):
        overrides = {'retrieval.coarse_k': self.params['coarse_k'],
                     'retrieval.top_k': self.params['top_k']}
        self._retriever = open_retriever(self.params, self.get_logger(), overrides,
                                         adjust=lambda c: self._apply_rerank_params(c.reranker))
        self._datum_now()  # derive (and log) the datum now, not on the first goal
        stats = self._retriever.stats()
        self.get_logger().info(
            f'ready: {stats.get("gallery_size")} images, caption coverage '
            f'{stats.get("caption_coverage", 0.0):.0%}')

    def _work(self):
        try:
            self._load_engine()
            self._engine_state = 'ready'
        except CgrsError as exc:
            self._engine_state, self._engine_error = 'failed', str(exc)
            self.get_logger().error(f'engine not loaded: {exc}')
        except Exception as exc:  # keep the node alive and say why in every result
            self._engine_state = 'failed'
            self._engine_error = f'{type(exc).__name__}: {exc}'
            self.get_logger().error(f'engine not loaded: {self._engine_error}')
        while True:
            with self._lock:
                while not (self._pending or self._refresh_requested or self._stop):
                    self._lock.wait()
                if self._stop:
                    return
                refresh, self._refresh_requested = self._refresh_requested, False
                job = self._pending.popleft() if self._pending else None
                self._running = job
            if refresh and self._retriever is not None:
                self._refresh_captions()
            if job is not None:
                job.result = self._run(job)
                with self._lock:
                    self._running = None
                job.done.set()

    def _refresh_captions(self):
        try:
            added = self._retriever.refresh_captions()
        except Exception as exc:  # a half-written store must not stop goals
            self.get_logger().warning(f'caption refresh failed: {exc}')
            return
        if added:
            self.get_logger().info(f'picked up {added} new caption(s)')

    def _run(self, job):
        frame = self.params['map_frame']
        if job.cancel_requested():
            return self._finish_canceled(job)
        if self._retriever is None:
            return self._reject(job.text, f'the retrieval engine is not loaded: '
                                f'{self._engine_error or "still loading"}',
                                RetrievalResult.STATUS_ERROR, job)

        def on_stage(stage, progress):
            if job.cancel_requested():
                raise _Canceled()
            job.feedback(stage, progress)

        section = self._retriever.config.confidence
        # The margin looks for the next place among pool_k candidates; the result keeps top_k.
        pool = max(job.top_k, section.pool_k)
        try:
            if job.image is not None:
                found = self._retriever.query_image(
                    job.image, top_k=pool, platform=job.platform or None,
                    on_stage=on_stage, query_platform=self.params['image_query_platform'],
                    near=job.area)
            else:
                found = self._retriever.query(job.text, top_k=pool, near=job.area,
                                              platform=job.platform or None, on_stage=on_stage)
            sure = confidence.assess(found.candidates, section)
            if job.image is not None:  # calibrated on text goals: photos are judged by margin
                sure = confidence.Assessment(math.nan, sure.margin, sure.features)
            found.candidates = found.candidates[:job.top_k]
            result = convert.result_message(found, self._datum_now(), frame,
                                            self.get_clock().now().to_msg(), job.platform)
            if job.image is not None:
                result.query = job.text  # the message's label; normalized_query: the engine's
            result.result_id = uuid.uuid4().hex[:12]
            result.confidence, result.margin = sure.confidence, sure.margin
            if job.area is not None:
                result.area_latitude, result.area_longitude = job.area.lat, job.area.lon
                result.area_radius_m = job.area.radius_m
        except _Canceled:
            return self._finish_canceled(job)
        except CgrsError as exc:
            return self._reject(job.text, str(exc), RetrievalResult.STATUS_ERROR, job)
        except Exception as exc:  # never take the node down for one goal
            self.get_logger().error(f'query failed: {type(exc).__name__}: {exc}')
            return self._reject(job.text, f'the query failed ({type(exc).__name__}: {exc})',
                                RetrievalResult.STATUS_ERROR, job)
        if job.cancel_requested():
            return self._finish_canceled(job)
        job.feedback('publish', 0.9)
        self._served += 1
        self._last_latency_ms = result.total_ms
        min_confidence = self.params['min_confidence'] if job.image is None else 0.0
        if result.status == RetrievalResult.STATUS_OK and confidence.should_hold(
                job.policy, sure, min_confidence, self.params['min_margin']):
            result.status = RetrievalResult.STATUS_AWAITING_CONFIRMATION
            result.error = (f'awaiting confirmation ({job.policy}: confidence '
                            f'{sure.confidence:.2f}, margin {sure.margin:.3f}); confirm a '
                            f'candidate with ~/confirm result_id {result.result_id!r}')
            self.get_logger().info(f'{job.text[:60]!r}: {result.error}')
            self._marker_pub.publish(convert.candidate_markers(result))
            job.feedback('awaiting confirmation', 1.0)
        elif result.status == RetrievalResult.STATUS_OK:
            result.selected_rank = 1
            best = result.candidates[0]
            self.get_logger().info(
                f'{job.text[:60]!r} -> {best.image_id} ({best.platform}, '
                f'lat {best.latitude:.6f}, lon {best.longitude:.6f}) in {result.total_ms:.1f} ms')
            self._send(result)
        else:
            self.get_logger().warning(result.error)
        self._remember(result)
        self._result_pub.publish(result)  # last: whoever sees it has already got the pose
        job.feedback('done', 1.0)
        return result

    # ---- diagnostics ----------------------------------------------------------------
    def _publish_diagnostics(self):
        status = DiagnosticStatus(name=f'{self.get_fully_qualified_name()}: retrieval',
                                  hardware_id=self.params['gallery_dir'])
        prior = self._prior()
        values = {'engine': self._engine_state, 'queries_served': str(self._served),
                  'pending_goals': str(len(self._pending)),
                  'last_query_latency_ms': f'{self._last_latency_ms:.1f}',
                  'goal_policy': self.params['goal_policy'],
                  'search_prior': prior.describe() if prior else 'none'}
        if self._retriever is not None:
            stats = self._retriever.stats()
            values.update({k: str(v) for k, v in stats.items()})
            coverage = float(stats.get('caption_coverage') or 0.0)
            if self._retriever.config.captioner.backend == 'none':
                coverage = 1.0  # captions are off by configuration: nothing is missing
            status.level = DiagnosticStatus.OK if coverage >= 1.0 else DiagnosticStatus.WARN
            status.message = ('ready' if coverage >= 1.0
                              else f'ready; captions cover {coverage:.0%} of the gallery')
        elif self._engine_state == 'failed':
            status.level, status.message = DiagnosticStatus.ERROR, self._engine_error
        else:
            status.level, status.message = DiagnosticStatus.WARN, 'loading models and index'
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(array)

    def destroy_node(self):
        """Stop the worker, then destroy the node."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        self._worker.join(timeout=5.0)
        self._action.destroy()
        return super().destroy_node()


def main(args=None):
    """Run retrieval_node until Ctrl-C or shutdown."""
    return spin_node(RetrievalNode, 'retrieval_node', threads=4, args=args)


if __name__ == '__main__':
    raise SystemExit(main())
