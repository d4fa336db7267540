"""captioning_node: keeps the gallery's VLM captions complete, off the executor thread.

It runs the same resumable captioning run as ``cgrs caption`` (cgrs_ros.engine.captioning) on
start (``caption_on_start``) and on each ``~/rescan`` call, in a worker thread, so services,
parameters and diagnostics stay responsive during a run that may take hours.

Interfaces (relative names live in the node's namespace, ``cgrs`` in the launch file):

- service ``~/rescan`` (std_srvs/Trigger): caption whatever is missing now. Answers at once:
  success=true when a run was started, success=false with the reason when one is already
  running or the configuration cannot caption (e.g. ``captioner.backend: manifest``).
- pub ``~/progress`` (std_msgs/String, latched): one JSON object per update, e.g.
  ``{"state": "running", "done": 12, "total": 40, "failed": 1, "rate": 1.52, "eta_s": 18.4,
  "captioned": 112, "gallery": 140, "new_captions": 11, "captioner": "...", "run": 1,
  "message": "..."}``: ``done`` of ``total`` images this run (``failed`` of them failed),
  ``rate`` images/s, ``captioned`` of ``gallery`` images have a caption now.
  JSON in a String rather than a custom message or a KeyValue list: ``ros2 topic echo`` shows
  it on one readable line, any client (rosbridge, Foxglove, a script) parses it with one
  json.loads, and fields can be added without rebuilding interfaces. ``state`` is idle,
  running, done, stopped, aborted or error.
- pub ``captions_updated`` (std_msgs/UInt32, latched): after every committed batch that added
  captions; the value is how many gallery images have a caption from this captioner now.
  retrieval_node subscribes and refreshes its caption channel without a restart.
- pub ``/diagnostics`` (diagnostic_msgs/DiagnosticArray, 1 Hz): the same numbers.

Shutdown (Ctrl-C, SIGTERM) stops the run between batches: the batch in flight is finished and
committed, nothing is left half-written (each batch is one SQLite transaction anyway).
"""

import json
import os
import threading
import time

from cgrs_ros.engine.errors import CgrsError
from cgrs_ros.nodes.parameters import declare_parameters, Param
from cgrs_ros.nodes.spin import spin_node
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import String, UInt32
from std_srvs.srv import Trigger

# How long shutdown waits for the batch in flight before leaving it (its transaction is then
# simply never committed; the next run captions it again).
STOP_GRACE_S = 60.0


def _gallery_problem(value):
    if not value.strip():
        return ('gallery_dir is empty; set it to the gallery folder, e.g. '
                '-p gallery_dir:=/data/gallery or gallery_dir:=... on the launch line')
    if not os.path.isdir(value):
        return f'gallery_dir {value!r} is not a folder; give the folder that holds gallery.csv'
    from cgrs_ros.engine.gallery import find_manifest
    try:
        find_manifest(value)
    except CgrsError as exc:
        return f'gallery_dir {value!r}: {exc}'
    return None


def _config_problem(value):
    if not value:
        return None
    if not os.path.isfile(value):
        return f'config {value!r} is not a file; give an engine YAML or "" for the defaults'
    from cgrs_ros.engine.config import load_config
    try:
        load_config(value)
    except CgrsError as exc:
        return f'config: {exc}'
    return None


def _state_problem(value):
    if value and os.path.exists(value) and not os.path.isdir(value):
        return f'state_dir {value!r} exists and is not a folder; give a folder or ""'
    return None


PARAMETERS = (
    Param('gallery_dir', '', 'Gallery folder: manifest (gallery.csv/.jsonl) and images.',
          read_only=True, check=_gallery_problem),
    Param('config', '', 'Engine config YAML; its captioner section picks the VLM '
          '(transformers or openai). Empty = built-in defaults (manifest: nothing to caption).',
          read_only=True, check=_config_problem),
    Param('state_dir', '', 'Where indexes and captions live; empty = GALLERY/.cgrs.',
          read_only=True, check=_state_problem),
    Param('batch_size', 0, 'Images per captioning batch (committed together); '
          '0 = captioner.batch_size from the config. Applies from the next batch.',
          minimum=0, maximum=4096),
    Param('caption_on_start', True, 'Caption whatever is missing when the node starts.'),
)


class CaptioningNode(Node):
    """Runs captioning in a worker thread; reports progress; answers rescan requests."""

    def __init__(self, **kwargs):
        super().__init__('captioning_node', **kwargs)
        self.params = declare_parameters(self, PARAMETERS, on_change=self._on_parameter)
        self._cond = threading.Condition()
        self._requested = False
        self._running = False
        self._closing = False
        self._stop = threading.Event()
        self._runs = 0
        self._captioner = None
        self._status = {'state': 'idle', 'done': 0, 'total': 0, 'failed': 0, 'rate': 0.0,
                        'eta_s': None, 'captioned': None, 'gallery': None, 'new_captions': 0,
                        'captioner': '', 'run': 0, 'message': 'waiting for a rescan request'}

        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                             reliability=ReliabilityPolicy.RELIABLE)
        self._progress_pub = self.create_publisher(String, '~/progress', latched)
        self._updated_pub = self.create_publisher(UInt32, 'captions_updated', latched)
        self._diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self.create_service(Trigger, '~/rescan', self._on_rescan,
                            callback_group=MutuallyExclusiveCallbackGroup())
        self.create_timer(1.0, self._publish_diagnostics,
                          callback_group=MutuallyExclusiveCallbackGroup())

        self._worker = threading.Thread(target=self._work, name='cgrs-captioning', daemon=True)
        self._worker.start()
        if self.params['caption_on_start']:
            accepted, reason = self._request_run()
            if not accepted:
                self._set_status(state='idle', message=reason)
                self.get_logger().warning(f'not captioning on start: {reason}')
        else:
            self._publish_progress()

    # ---- parameters and requests ------------------------------------------------------
    def _on_parameter(self, name, value):
        self.params[name] = value

    def _load_config(self):
        from cgrs_ros.engine.config import load_config
        config = load_config(self.params['config'] or None)
        if config.captioner.backend in ('manifest', 'none'):
            raise CgrsError(
                f'captioner.backend is {config.captioner.backend} in '
                f'{self.params["config"] or "the built-in defaults"}: the manifest descriptions '
                'are the captions (or captions are off) and there is nothing to caption; set '
                'the config parameter to '
                'an engine YAML whose captioner backend is transformers or openai')
        return config

    def _request_run(self):
        """Ask the worker for a run; return (accepted, reason)."""
        try:
            self._load_config()
        except CgrsError as exc:
            return False, str(exc)
        with self._cond:
            if self._closing:
                return False, 'the node is shutting down'
            if self._running or self._requested:
                status = self._status
                return False, (
                    f'a captioning run is already in progress ({status["done"]}/'
                    f'{status["total"]} done); call rescan again when ~/progress says it is '
                    'done')
            self._requested = True
            self._cond.notify_all()
        return True, 'captioning started; follow ~/progress'

    def _on_rescan(self, request, response):
        response.success, response.message = self._request_run()
        # (rclpy forbids one logging call site to change severity, hence two calls.)
        if response.success:
            self.get_logger().info(f'rescan: {response.message}')
        else:
            self.get_logger().warning(f'rescan refused: {response.message}')
        return response

    # ---- the worker -------------------------------------------------------------------
    def _work(self):
        while True:
            with self._cond:
                while not (self._requested or self._closing):
                    self._cond.wait()
                if self._closing:
                    return
                self._requested = False
                self._running = True
                self._runs += 1
            final = None
            try:
                final = self._run_once()
            finally:
                with self._cond:
                    self._running = False
                # Published only now: whoever sees the run's end may rescan at once.
                if final:
                    self._set_status(**final)

    def _run_once(self):
        """Run one captioning pass; return the final ~/progress fields (published by _work)."""
        from cgrs_ros.engine.captioning import run_captioning
        self._set_status(state='running', done=0, total=0, failed=0, rate=0.0, eta_s=None,
                         new_captions=0, run=self._runs,
                         message='checking the gallery for images to caption')
        started = time.monotonic()
        try:
            config = self._load_config()
            summary = run_captioning(
                self.params['gallery_dir'], config, self.params['state_dir'] or None,
                batch_size=self.params['batch_size'] or None, progress=self._on_progress,
                stop=self._stop, load_captioner=lambda: self._loaded_captioner(config))
        except CgrsError as exc:
            self.get_logger().error(f'captioning failed: {exc}')
            return {'state': 'error', 'message': str(exc)}
        except Exception as exc:  # keep the node alive and say why on ~/progress
            self.get_logger().error(f'captioning failed: {type(exc).__name__}: {exc}')
            return {'state': 'error', 'message': f'{type(exc).__name__}: {exc}'}
        state = 'aborted' if summary.aborted else 'stopped' if summary.stopped else 'done'
        message = (f'{summary.new_captions} captioned, {summary.new_failures} failed this run '
                   f'in {time.monotonic() - started:.1f} s; {summary.captioned} of '
                   f'{summary.total} images captioned, {summary.failed} failed, '
                   f'{summary.pending} pending')
        if summary.aborted:
            message = f'{summary.aborted}; {message}'
        if summary.embedding_error:
            message += f'; {summary.embedding_error}'
        if summary.aborted:
            self.get_logger().warning(f'captioning {state}: {message}')
        else:
            self.get_logger().info(f'captioning {state}: {message}')
        for failure in summary.failures[:20]:
            self.get_logger().warning(f'no caption: {failure}')
        return {'state': state, 'captioned': summary.captioned, 'gallery': summary.total,
                'captioner': summary.captioner, 'message': message}

    def _loaded_captioner(self, config):
        """Return the captioner, loaded once and kept for later rescans (loading costs seconds)."""
        from cgrs_ros.engine.captioners import make_captioner
        if self._captioner is None:
            self.get_logger().info(f'loading captioner ({config.captioner.backend})')
            self._captioner = make_captioner(config.captioner)
        return self._captioner

    def _on_progress(self, progress):
        written = self._status.get('new_captions') or 0
        self._set_status(state='running', done=progress.done, total=progress.total,
                         failed=progress.failed, rate=round(progress.rate, 3),
                         eta_s=None if progress.eta_s is None else round(progress.eta_s, 1),
                         captioned=progress.captioned, gallery=progress.gallery_size,
                         new_captions=progress.new_captions,
                         message=f'captioning {progress.done}/{progress.total}')
        if progress.new_captions > written:
            # The batch is committed and its embeddings stored: readers can refresh now.
            self._publish(self._updated_pub, UInt32(data=min(progress.captioned, 2**32 - 1)))

    # ---- output -------------------------------------------------------------------------
    def _set_status(self, **changes):
        self._status = {**self._status, **changes}
        self._publish_progress()

    def _publish_progress(self):
        self._publish(self._progress_pub, String(data=json.dumps(self._status)))

    def _publish(self, publisher, msg):
        try:
            publisher.publish(msg)
        except Exception:  # the context is shutting down: nobody is listening any more
            pass

    def _publish_diagnostics(self):
        status = self._status
        level = {'error': DiagnosticStatus.ERROR, 'aborted': DiagnosticStatus.ERROR,
                 'running': DiagnosticStatus.OK, 'done': DiagnosticStatus.OK}.get(
                     status['state'], DiagnosticStatus.WARN)
        if status['state'] == 'done' and status['gallery'] and \
                status['captioned'] != status['gallery']:
            level = DiagnosticStatus.WARN  # some images have no caption
        diag = DiagnosticStatus(name=f'{self.get_fully_qualified_name()}: captioning',
                                hardware_id=self.params['gallery_dir'], level=level,
                                message=status['message'])
        diag.values = [KeyValue(key=k, value='' if v is None else str(v))
                       for k, v in status.items() if k != 'message']
        array = DiagnosticArray(status=[diag])
        array.header.stamp = self.get_clock().now().to_msg()
        self._publish(self._diag_pub, array)

    def destroy_node(self):
        """Stop the run between batches, wait for the batch in flight, then destroy the node."""
        with self._cond:
            self._closing = True
            running = self._running
            self._cond.notify_all()
        self._stop.set()
        if running:
            self.get_logger().info('stopping: finishing the batch in flight')
        self._worker.join(timeout=STOP_GRACE_S)
        if self._worker.is_alive():
            self.get_logger().warning(
                f'the batch in flight did not finish within {STOP_GRACE_S:.0f} s; leaving it '
                '(it is captioned again on the next run)')
        elif self._captioner is not None:
            self._captioner.close()
        if running:
            self.get_logger().info('captioning stopped')
        return super().destroy_node()


def main(args=None):
    """Run captioning_node until Ctrl-C or shutdown."""
    return spin_node(CaptioningNode, 'captioning_node', threads=2, args=args)


if __name__ == '__main__':
    raise SystemExit(main())
