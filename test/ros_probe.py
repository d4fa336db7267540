"""A node in the test process that talks to nodes under test over real DDS.

Shared by the node tests: it records what it hears per topic (under a lock, spun in a
thread), waits on conditions with timeouts instead of sleeps, and calls services and
parameter clients the way ``ros2 service call`` / ``ros2 param set`` do.
"""

import collections
import contextlib
import os
import subprocess
import sys
import threading
import time

from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
import rclpy
from rclpy.executors import MultiThreadedExecutor


def parameter_value(value):
    """Wrap a Python value as an rcl_interfaces ParameterValue."""
    if isinstance(value, bool):
        return ParameterValue(type=ParameterType.PARAMETER_BOOL, bool_value=value)
    if isinstance(value, int):
        return ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=value)
    if isinstance(value, float):
        return ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=value)
    return ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=value)


class RosProbe:
    """Own rclpy context + node + executor thread; subclasses add their topics."""

    def __init__(self, name):
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.lock = threading.Lock()
        self.heard = collections.defaultdict(list)
        self._param_clients = {}
        self.executor = MultiThreadedExecutor(num_threads=2, context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def listen(self, key, msg_type, topic, qos=10, convert=None):
        """Record every message on ``topic`` under ``heard[key]`` (converted if asked)."""
        def callback(msg):
            with self.lock:
                self.heard[key].append(convert(msg) if convert else msg)
        self.node.create_subscription(msg_type, topic, callback, qos)

    def count(self, key):
        """Return how many messages were heard under ``key``."""
        with self.lock:
            return len(self.heard[key])

    def wait_for(self, predicate, timeout=60.0, what='condition', proc=None, log=None):
        """Return the first truthy ``predicate(heard)``; fail on timeout or if ``proc`` dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f'the process under test exited ({proc.returncode}) '
                                     f'before {what}' + (f': {log.read_text()}' if log else ''))
            with self.lock:
                value = predicate(self.heard)
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f'timed out after {timeout} s waiting for {what}'
                             + (f'; log: {log.read_text()}' if log else ''))

    def wait_future(self, future, timeout=30.0, what='a future'):
        """Wait for an rclpy future completed by the executor thread; return its result."""
        deadline = time.monotonic() + timeout
        while not future.done():
            assert time.monotonic() < deadline, f'timed out after {timeout} s waiting for {what}'
            time.sleep(0.01)
        return future.result()

    def call(self, client, request, timeout=30.0):
        """Call a service (waiting for it to appear) and return the response."""
        assert client.wait_for_service(timeout_sec=timeout), f'{client.srv_name} not found'
        return self.wait_future(client.call_async(request), timeout, client.srv_name)

    def set_param(self, node_name, name, value):
        """Set one parameter of node ``node_name`` (fully qualified); return the SetResult."""
        client = self._param_clients.get(node_name)
        if client is None:
            client = self.node.create_client(SetParameters, f'{node_name}/set_parameters')
            self._param_clients[node_name] = client
        request = SetParameters.Request(
            parameters=[Parameter(name=name, value=parameter_value(value))])
        return self.call(client, request).results[0]

    def close(self):
        """Stop the executor thread and release the context."""
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


def engine_ready(heard):
    """Whether retrieval_node's diagnostics (probe topic 'diag') say its engine is ready."""
    return any(kv.key == 'engine' and kv.value == 'ready'
               for d in heard['diag'] for s in d.status for kv in s.values)


@contextlib.contextmanager
def launched_stack(params_file, log, make_probe, ready_timeout=180.0, args=()):
    """Start the stack with `cgrs launch` (captioning off) and yield (probe, process).

    ``args`` are more launch arguments (``'console:=true'``).

    ``make_probe()`` builds the test's probe (it must listen to /diagnostics as 'diag'); the
    block runs once retrieval_node's engine is ready. Afterwards the probe is closed and the
    stack stopped with Ctrl-C, as a user stops it (killed, and the test failed, if it hangs).
    """
    with open(log, 'w') as out:
        proc = subprocess.Popen(
            [sys.executable, '-m', 'cgrs_ros.cli', 'launch', f'params_file:={params_file}',
             'captioning:=false', *args], env=dict(os.environ, PYTHONUNBUFFERED='1'),
            stdout=out, stderr=subprocess.STDOUT)
    probe = None
    try:
        probe = make_probe()
        probe.wait_for(engine_ready, timeout=ready_timeout,
                       what=f'retrieval_node ready (log: {log})', proc=proc)
        yield probe, proc
    finally:
        if probe is not None:
            probe.close()
        proc.send_signal(2)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
