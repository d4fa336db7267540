"""navigation.launch.py and `cgrs launch` describe the same stack (one source of truth)."""

import importlib.util
import pathlib

from cgrs_ros.cli.launch import parse_assignments
from cgrs_ros.engine.errors import ConfigError
from cgrs_ros.nodes import stack
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH_FILE = ROOT / 'launch' / 'navigation.launch.py'


def test_cgrs_launch_command_lines_carry_every_launch_argument():
    values = stack.resolve_arguments({'gallery_dir': '/data/g', 'namespace': 'uav1',
                                      'use_sim_time': 'True', 'log_level': 'debug',
                                      'config': '/data/engine.yaml'})
    specs = stack.node_specs(values)
    assert [s.name for s in specs] == ['retrieval_node', 'captioning_node']
    for spec in specs:
        args = stack.ros_arguments(spec)
        joined = ' '.join(args)
        assert args[0] == '--ros-args'
        assert f'__node:={spec.name}' in joined
        assert '__ns:=/uav1' in joined
        assert f'--params-file {values["params_file"]}' in joined
        assert '-p use_sim_time:=true' in joined
        assert '-p gallery_dir:=/data/g' in joined
        assert '-p config:=/data/engine.yaml' in joined
        assert joined.endswith('--log-level debug')
    assert [s.required for s in specs] == [True, False]


def test_empty_launch_arguments_leave_the_params_file_in_charge():
    spec = stack.node_specs(stack.resolve_arguments({}))[0]
    joined = ' '.join(stack.ros_arguments(spec))
    assert 'gallery_dir:=' not in joined and 'config:=' not in joined
    assert pathlib.Path(stack.resolve_arguments({})['params_file']).is_file()


def test_captioning_can_be_left_out():
    specs = stack.node_specs(stack.resolve_arguments({'captioning': 'false'}))
    assert [s.name for s in specs] == ['retrieval_node']


def test_sim_adds_the_simulated_drone_with_the_same_parameters():
    values = stack.resolve_arguments({'sim': 'true', 'gallery_dir': '/data/g',
                                      'namespace': 'uav1'})
    specs = stack.node_specs(values)
    assert [s.name for s in specs] == ['retrieval_node', 'captioning_node', 'sim_drone']
    drone = specs[-1]
    assert (drone.executable, drone.module) == ('sim_drone', 'cgrs_ros.nodes.sim_drone')
    assert not drone.required
    joined = ' '.join(stack.ros_arguments(drone))
    # Same params file and gallery as retrieval_node: both derive the same map datum.
    assert f'--params-file {values["params_file"]}' in joined
    assert '-p gallery_dir:=/data/g' in joined and '__ns:=/uav1' in joined
    assert (ROOT / 'scripts' / drone.executable).is_file()
    assert stack.resolve_arguments({})['sim'] == 'false'


@pytest.mark.parametrize('given, message', [
    ({'gallery': '/x'}, "unknown launch argument 'gallery'"),
    ({'use_sim_time': 'yes'}, 'use_sim_time:=yes is not one of true, false'),
    ({'respawn_delay': 'soon'}, 'respawn_delay:=soon and respawn_max_retries:=5 must be'),
    ({'respawn_max_retries': '-2'}, 'respawn_max_retries -1 or more'),
])
def test_bad_launch_arguments_are_named(given, message):
    with pytest.raises(ConfigError, match=message):
        stack.resolve_arguments(given)


def test_respawn_reaches_every_node_and_keeps_required_ones_from_stopping_the_stack():
    default = stack.node_specs(stack.resolve_arguments({}))
    assert not any(spec.respawn for spec in default)
    specs = stack.node_specs(stack.resolve_arguments(
        {'respawn': 'true', 'respawn_delay': '1.5', 'respawn_max_retries': '3', 'sim': 'true'}))
    assert [(s.respawn, s.respawn_delay, s.respawn_max_retries) for s in specs] == [
        (True, 1.5, 3)] * 3


def test_assignments_must_use_colon_equals():
    assert parse_assignments(['a:=1', 'b:=x:=y']) == {'a': '1', 'b': 'x:=y'}
    with pytest.raises(ConfigError, match='not name:=value'):
        parse_assignments(['gallery_dir=/x'])


def test_launch_file_describes_the_stack():
    if importlib.util.find_spec('launch_ros') is None:
        pytest.skip('launch_ros is not installed here (no PyPI wheel); the launch file is '
                    'exercised on machines with a ROS 2 install')
    from launch import LaunchContext
    from launch.actions import DeclareLaunchArgument, OpaqueFunction
    from launch_ros.actions import Node

    spec = importlib.util.spec_from_file_location('navigation_launch', LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    declared = [e for e in description.entities if isinstance(e, DeclareLaunchArgument)]
    assert [d.name for d in declared] == [a.name for a in stack.launch_arguments()]
    context = LaunchContext()
    for entity in declared:
        entity.visit(context)
    context.launch_configurations['gallery_dir'] = '/data/g'
    opaque = [e for e in description.entities if isinstance(e, OpaqueFunction)][0]
    nodes = [n for n in opaque.execute(context) if isinstance(n, Node)]
    assert [n.node_executable for n in nodes] == ['retrieval_node', 'captioning_node']


def test_launch_file_builds_nodes_only_from_the_shared_spec():
    """Without launch_ros, check statically that the launch file adds nothing of its own."""
    import ast
    tree = ast.parse(LAUNCH_FILE.read_text())
    calls = {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert {'stack.node_specs', 'stack.launch_arguments', 'stack.resolve_arguments'} <= calls
    node_calls = [node for node in ast.walk(tree)
                  if isinstance(node, ast.Call) and ast.unparse(node.func) == 'Node']
    assert len(node_calls) == 1  # one Node(...) per spec, inside a comprehension
    keywords = {kw.arg: ast.unparse(kw.value) for kw in node_calls[0].keywords}
    for name in ('package', 'executable', 'name', 'namespace', 'parameters', 'remappings',
                 'respawn', 'respawn_delay', 'respawn_max_retries'):
        assert keywords[name] == f'spec.{name}', name


def test_localization_adds_localization_node_with_its_own_gallery_and_the_stack_datum():
    values = stack.resolve_arguments({'localization': 'true', 'gallery_dir': '/data/g',
                                      'localization_gallery': '/data/tiles', 'sim': 'true'})
    specs = stack.node_specs(values)
    assert [s.name for s in specs] == ['retrieval_node', 'captioning_node', 'sim_drone',
                                       'localization_node']
    node = specs[-1]
    assert (node.executable, node.module) == ('localization_node',
                                              'cgrs_ros.nodes.localization_node')
    assert (ROOT / 'scripts' / node.executable).is_file()
    args = stack.ros_arguments(node)
    joined = ' '.join(args)
    # The launch gallery first, then its own: the later -p wins, as in launch_ros.
    assert joined.index('gallery_dir:=/data/g') < joined.index('gallery_dir:=/data/tiles')
    assert '-p datum_gallery:=/data/g' in joined
    assert stack.resolve_arguments({})['localization'] == 'false'
    without = stack.node_specs(stack.resolve_arguments({'localization': 'true'}))[-1]
    assert 'datum_gallery' not in ' '.join(stack.ros_arguments(without))
