"""What the navigation stack starts: launch arguments and nodes, as plain data.

This is the one source of truth for ``launch/navigation.launch.py`` (which turns it into
launch_ros actions for users with a ROS install) and for ``cgrs launch`` (which starts the
same nodes as processes where launch_ros is absent). Neither adds nodes, parameters,
remappings or arguments of its own. No ROS imports here.
"""

from dataclasses import dataclass, field
from pathlib import Path
import sys

from cgrs_ros.engine.errors import ConfigError

PACKAGE = 'cgrs_ros'


@dataclass(frozen=True)
class LaunchArgument:
    """A launch argument: ``name:=value`` on the command line."""

    name: str
    default: str
    description: str
    choices: tuple = ()


@dataclass
class NodeSpec:
    """One node to start, as launch_ros.actions.Node takes it."""

    executable: str               # `ros2 run cgrs_ros <executable>`
    module: str                   # `python -m <module>` runs the same main()
    name: str
    namespace: str
    parameters: list              # a params file path and/or {name: value} overrides
    remappings: list = field(default_factory=list)
    log_level: str = 'info'
    required: bool = False        # the stack shuts down when a required node exits
    package: str = PACKAGE
    # launch_ros's respawn: restart the node after respawn_delay s when it exits, at most
    # respawn_max_retries times (-1: no limit); a respawning node does not stop the stack.
    respawn: bool = False
    respawn_delay: float = 0.0
    respawn_max_retries: int = -1


def share_path(relative):
    """Return the path of a file in the package's share dir (or the source tree)."""
    source = Path(__file__).resolve().parents[2] / relative
    if source.exists():
        return str(source)
    try:
        from ament_index_python.packages import get_package_share_directory
        return str(Path(get_package_share_directory(PACKAGE)) / relative)
    except (ImportError, LookupError, ValueError):
        return str(source)


def launch_arguments():
    """Return the launch arguments of navigation.launch.py with defaults and descriptions."""
    return (
        LaunchArgument('params_file', share_path('config/navigation.yaml'),
                       'YAML with ros__parameters for retrieval_node and captioning_node'),
        LaunchArgument('gallery_dir', '',
                       'Gallery folder (manifest + images); empty = the value in params_file'),
        LaunchArgument('config', '',
                       'Engine config YAML (models, retrieval); empty = the value in params_file'),
        LaunchArgument('namespace', 'cgrs', 'Namespace of the cgrs nodes and topics'),
        LaunchArgument('use_sim_time', 'false', 'Use /clock (simulation) time',
                       ('true', 'false')),
        LaunchArgument('log_level', 'info', 'Log level of the nodes',
                       ('debug', 'info', 'warn', 'error', 'fatal')),
        LaunchArgument('captioning', 'true', 'Start captioning_node as well',
                       ('true', 'false')),
        LaunchArgument('sim', 'false', 'Start sim_drone, a simulated drone that flies to '
                       '/goal_pose and publishes odom, fix and status', ('true', 'false')),
        LaunchArgument('localization', 'false', 'Start localization_node: position from the '
                       'downward camera matched against satellite tiles (GNSS-denied)',
                       ('true', 'false')),
        LaunchArgument('localization_gallery', '',
                       'Satellite gallery localization_node matches against (e.g. orthophoto '
                       'tiles); empty = gallery_dir'),
        LaunchArgument('console', 'false', 'Start console_node: the operator web console '
                       '(http://127.0.0.1:8080; console.* parameters)', ('true', 'false')),
        LaunchArgument('voice', 'false', 'Start voice_node: spoken goals (microphone, audio '
                       'topic or WAV files) recognised offline and sent to goal_text',
                       ('true', 'false')),
        LaunchArgument('respawn', 'false', 'Restart a node that exits (a crash is a blip, not '
                       'a landing) instead of stopping the stack', ('true', 'false')),
        LaunchArgument('respawn_delay', '2.0', 'Seconds before a node is restarted'),
        LaunchArgument('respawn_max_retries', '5',
                       'Restarts per node before it is left down; -1 = no limit'),
    )


def resolve_arguments(given=None):
    """Return defaults updated with ``given`` ({name: value}); reject unknown names."""
    arguments = {arg.name: arg for arg in launch_arguments()}
    values = {name: arg.default for name, arg in arguments.items()}
    for name, value in (given or {}).items():
        if name not in arguments:
            raise ConfigError(
                f'unknown launch argument {name!r}; valid ones: {", ".join(arguments)}')
        choices = arguments[name].choices
        if choices and value.lower() not in choices:
            raise ConfigError(
                f'launch argument {name}:={value} is not one of {", ".join(choices)}')
        values[name] = value.lower() if choices else value
    _respawn_settings(values)  # validates the numbers now, not when a node dies
    return values


def _respawn_settings(values):
    """Return (respawn, delay s, max retries) of resolved values; ConfigError if malformed."""
    try:
        delay = float(values['respawn_delay'])
        retries = int(values['respawn_max_retries'])
    except ValueError:
        raise ConfigError(
            f'respawn_delay:={values["respawn_delay"]} and respawn_max_retries:='
            f'{values["respawn_max_retries"]} must be a number of seconds and a whole number'
            ) from None
    if not 0.0 <= delay <= 3600.0 or retries < -1:
        raise ConfigError('respawn_delay must be 0-3600 s and respawn_max_retries -1 or more')
    return values['respawn'] == 'true', delay, retries


def _overrides(values):
    """Parameter overrides given as launch arguments (empty ones leave params_file alone)."""
    overrides = {'use_sim_time': values['use_sim_time'] == 'true'}
    for name in ('gallery_dir', 'config'):
        if values[name]:
            overrides[name] = values[name]
    return overrides


def node_specs(values):
    """Return the nodes to start for resolved launch-argument ``values``."""
    parameters = [values['params_file'], _overrides(values)]
    respawn, delay, retries = _respawn_settings(values)

    def node(name, extra=None, required=False):
        return NodeSpec(executable=name, module=f'{PACKAGE}.nodes.{name}', name=name,
                        namespace=values['namespace'],
                        parameters=parameters + ([] if extra is None else [extra]),
                        log_level=values['log_level'], required=required)

    nodes = [node('retrieval_node', required=True)]
    if values['captioning'] == 'true':
        nodes.append(node('captioning_node'))
    if values['sim'] == 'true':
        nodes.append(node('sim_drone'))
    if values['localization'] == 'true':
        overrides = {}
        if values['localization_gallery']:
            # Its own gallery; the map datum still comes from the stack's gallery.
            overrides['gallery_dir'] = values['localization_gallery']
            if values['gallery_dir']:
                overrides['datum_gallery'] = values['gallery_dir']
        nodes.append(node('localization_node', overrides))
    if values['console'] == 'true':
        nodes.append(node('console_node'))
    if values['voice'] == 'true':
        nodes.append(node('voice_node'))
    for spec in nodes:
        spec.respawn, spec.respawn_delay, spec.respawn_max_retries = respawn, delay, retries
    return nodes


def _format_value(value):
    if isinstance(value, bool):
        return 'true' if value else 'false'
    return str(value)


def ros_arguments(spec):
    """Return the ``--ros-args`` list launch_ros passes to a node process for ``spec``."""
    args = ['--ros-args', '-r', f'__node:={spec.name}']
    if spec.namespace:
        args += ['-r', f'__ns:=/{spec.namespace.strip("/")}']
    for entry in spec.parameters:
        if isinstance(entry, dict):
            for name, value in entry.items():
                args += ['-p', f'{name}:={_format_value(value)}']
        else:
            args += ['--params-file', str(entry)]
    for source, target in spec.remappings:
        args += ['-r', f'{source}:={target}']
    args += ['--log-level', spec.log_level]
    return args


def command(spec):
    """Return the process command line that starts ``spec`` with this Python."""
    return [sys.executable, '-m', spec.module, *ros_arguments(spec)]
