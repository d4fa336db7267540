"""``cgrs launch [name:=value ...]``: start the navigation stack where launch_ros is absent.

It starts the nodes of ``launch/navigation.launch.py`` as processes, with the same launch
arguments, parameters, remappings and log levels, because both read
``cgrs_ros.nodes.stack``. Output lines are prefixed with the node name, as ``ros2 launch``
does. Ctrl-C (SIGINT) or SIGTERM stops every node cleanly (SIGINT, then SIGTERM, then SIGKILL
after grace periods); when a required node exits, the others are stopped too. With
``respawn:=true`` a node that exits is restarted after ``respawn_delay`` seconds, at most
``respawn_max_retries`` times, as launch_ros's ``respawn`` does.
"""

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

from cgrs_ros.engine.errors import ConfigError

GRACE_S = 10.0


def parse_assignments(items):
    """``['a:=1', 'b:=x']`` -> ``{'a': '1', 'b': 'x'}``; anything else is a ConfigError."""
    values = {}
    for item in items:
        name, sep, value = item.partition(':=')
        if not sep or not name:
            raise ConfigError(f'launch argument {item!r} is not name:=value, '
                              'e.g. gallery_dir:=/data/gallery')
        values[name] = value
    return values


def _die_with_parent():
    """In the child: ask Linux to SIGTERM it if ``cgrs launch`` dies without stopping it.

    Hand-written (prctl PR_SET_PDEATHSIG through ctypes): the standard library has no wrapper.
    Without it a ``kill -9`` of the launcher would leave the nodes running, since they sit in
    their own sessions so that a terminal's Ctrl-C reaches only the launcher.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the launcher's own shutdown still stops the nodes


def _pump(name, stream, lock):
    for line in iter(stream.readline, ''):
        with lock:
            sys.stdout.write(f'[{name}] {line}')
            sys.stdout.flush()


class Stack:
    """The running node processes of one ``cgrs launch``."""

    def __init__(self, specs, env=None):
        self.specs = specs
        self.env = env or dict(os.environ)
        self.procs = [None] * len(specs)
        self.restarts = [0] * len(specs)
        self._restart_at = [None] * len(specs)
        self._lock = threading.Lock()
        for i in range(len(specs)):
            self._start(i)

    def _start(self, i):
        from cgrs_ros.nodes import stack
        spec = self.specs[i]
        cmd = stack.command(spec)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, env=self.env, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform == 'linux'
                                else None)
        print(f'[cgrs launch] {spec.name} (pid {proc.pid}): {" ".join(cmd)}', flush=True)
        threading.Thread(target=_pump, args=(spec.name, proc.stdout, self._lock),
                         daemon=True).start()
        self.procs[i] = proc

    def _may_restart(self, i):
        spec = self.specs[i]
        return spec.respawn and (spec.respawn_max_retries < 0
                                 or self.restarts[i] < spec.respawn_max_retries)

    def wait(self, stop_event):
        """Wait until a required node exits, all nodes exit, or ``stop_event`` is set.

        With respawn, a node that exits is started again after its delay, as launch_ros's
        ``respawn`` does, until its retries are used up; then it stays down.
        """
        while not stop_event.is_set():
            codes = [proc.poll() for proc in self.procs]
            for i, (spec, code) in enumerate(zip(self.specs, codes)):
                if code is None:
                    continue
                if self._may_restart(i):
                    now = time.monotonic()
                    if self._restart_at[i] is None:
                        self._restart_at[i] = now + spec.respawn_delay
                        print(f'[cgrs launch] {spec.name} exited with {code}; restarting in '
                              f'{spec.respawn_delay:g} s (restart {self.restarts[i] + 1}'
                              + (f' of {spec.respawn_max_retries})'
                                 if spec.respawn_max_retries >= 0 else ')'), flush=True)
                    elif now >= self._restart_at[i]:
                        self._restart_at[i] = None
                        self.restarts[i] += 1
                        self._start(i)
                        codes[i] = None
                elif spec.required and not spec.respawn:
                    print(f'[cgrs launch] required node {spec.name} exited with {code}; '
                          'stopping the stack', flush=True)
                    return code
            if all(code is not None for code in codes) and not any(
                    self._may_restart(i) for i in range(len(self.specs))):
                return max(codes)
            stop_event.wait(0.2)
        return 0

    def stop(self):
        """SIGINT every node, then SIGTERM, then SIGKILL, each after a grace period."""
        for sig, grace in ((signal.SIGINT, GRACE_S), (signal.SIGTERM, 5.0),
                           (signal.SIGKILL, 5.0)):
            alive = [proc for proc in self.procs if proc.poll() is None]
            if not alive:
                return
            for proc in alive:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(p.poll() is None for p in alive):
                time.sleep(0.05)


def run(args):
    """Start the stack and block until Ctrl-C or a required node exits."""
    from cgrs_ros.nodes import stack
    values = stack.resolve_arguments(parse_assignments(args.arguments))
    if args.show_args:
        for arg in stack.launch_arguments():
            choices = f' (one of {", ".join(arg.choices)})' if arg.choices else ''
            print(f"    '{arg.name}':\n        {arg.description}{choices}\n"
                  f"        (default: '{arg.default}')")
        return 0
    specs = stack.node_specs(values)
    if args.print:
        for spec in specs:
            print(' '.join(stack.command(spec)))
        return 0
    stop_event = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop_event.set())
    running = Stack(specs)
    try:
        code = running.wait(stop_event)
    finally:
        running.stop()
    print('[cgrs launch] all nodes stopped', flush=True)
    return code


def register(subparsers):
    """Add the ``launch`` subcommand."""
    parser = subparsers.add_parser(
        'launch', help='start the navigation stack (same as navigation.launch.py)',
        description='Start the nodes of launch/navigation.launch.py without launch_ros.')
    parser.add_argument('arguments', nargs='*', metavar='name:=value',
                        help='launch arguments, as for ros2 launch')
    parser.add_argument('--show-args', '-s', action='store_true',
                        help='list the launch arguments and exit')
    parser.add_argument('--print', action='store_true',
                        help='print the node command lines and exit')
    parser.set_defaults(func=run)
