"""Declarative node parameters: declared once, in data, with descriptions and validators.

In the spirit of generate_parameter_library: each node lists its parameters in a table of
:class:`Param`; :func:`declare_parameters` declares them all with a ParameterDescriptor and
registers a set-callback that refuses invalid values with a reason (at start-up, from a
params file or ``-p``, and at run time through ``ros2 param set``).
"""

from dataclasses import dataclass
import math
from typing import Any, Callable, Optional

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rcl_interfaces.msg import ParameterType, SetParametersResult

_TYPES = {
    bool: ParameterType.PARAMETER_BOOL,
    int: ParameterType.PARAMETER_INTEGER,
    float: ParameterType.PARAMETER_DOUBLE,
    str: ParameterType.PARAMETER_STRING,
}


@dataclass(frozen=True)
class Param:
    """One parameter: name (dots for groups), default, description and constraints."""

    name: str
    default: Any
    description: str
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    choices: tuple = ()
    allow_nan: bool = False          # floats: NaN means "unset"
    read_only: bool = False          # needs a restart to change
    check: Optional[Callable[[Any], Optional[str]]] = None  # returns a reason when invalid

    @property
    def value_type(self):
        """Return the Python type of the parameter (from its default)."""
        return type(self.default)

    def descriptor(self):
        """Return the ParameterDescriptor that ``ros2 param describe`` shows."""
        text = self.description
        if self.choices:
            text += f' One of: {", ".join(map(str, self.choices))}.'
        descriptor = ParameterDescriptor(
            name=self.name, type=_TYPES[self.value_type], description=text,
            read_only=self.read_only)
        # Ranges are declared for tools (rqt_reconfigure sliders); validation is ours.
        if self.value_type is int and self.minimum is not None and self.maximum is not None:
            descriptor.integer_range = [IntegerRange(
                from_value=int(self.minimum), to_value=int(self.maximum), step=1)]
        elif self.value_type is float and self.minimum is not None and self.maximum is not None \
                and not self.allow_nan:
            descriptor.floating_point_range = [FloatingPointRange(
                from_value=float(self.minimum), to_value=float(self.maximum), step=0.0)]
        return descriptor

    def problem(self, value):
        """Return why ``value`` is invalid for this parameter, or None when it is fine."""
        if self.value_type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        wanted = self.value_type
        if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
            return (f'{self.name} must be a {self.value_type.__name__}, got {value!r}; '
                    f'e.g. {self.name}:={self.default!r}')
        if self.value_type is float and math.isnan(value):
            return None if self.allow_nan else f'{self.name} must be a number, got NaN'
        if self.minimum is not None and value < self.minimum:
            return f'{self.name}={value!r} is below the minimum {self.minimum}'
        if self.maximum is not None and value > self.maximum:
            return f'{self.name}={value!r} is above the maximum {self.maximum}'
        if self.choices and value not in self.choices:
            return f'{self.name}={value!r} is not one of {", ".join(map(str, self.choices))}'
        return self.check(value) if self.check else None


def declare_parameters(node, table, on_change=None):
    """Declare every parameter of ``table`` on ``node``; return ``{name: value}``.

    Invalid initial values (params file, ``-p``) raise InvalidParameterValueException naming
    the parameter and the reason. Later changes are validated by the same rules;
    ``on_change(name, value)`` is called for each accepted change.
    """
    by_name = {param.name: param for param in table}

    def validate(parameters):
        for parameter in parameters:
            param = by_name.get(parameter.name)
            if param is None:
                continue  # use_sim_time and other rclpy-owned parameters
            reason = param.problem(parameter.value)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    node.add_on_set_parameters_callback(validate)
    values = {}
    for param in table:
        value = node.declare_parameter(param.name, param.default, param.descriptor()).value
        values[param.name] = float(value) if param.value_type is float else value

    if on_change is not None:
        def notify(parameters):
            for parameter in parameters:
                if parameter.name in by_name:
                    on_change(parameter.name, parameter.value)
        node.add_post_set_parameters_callback(notify)
    return values
