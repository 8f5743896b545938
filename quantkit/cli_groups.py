"""Option groups: a command takes a dataclass of Typer options as one parameter (:func:`option_groups`).

Typer reads a command's options from its parameters; :func:`option_groups` shows Typer each group's fields
as options (optionally in the group's ``--help`` panel) and hands the command the group built from them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])

class OptionGroup:
    """Options that a command takes as one parameter: subclasses are dataclasses whose fields are Typer options."""

    panel: ClassVar[str]  # their panel in the --help of a command that shows panels


def option_groups(*, panels: bool = False) -> Callable[[F], F]:
    """Let a command take :class:`OptionGroup` parameters: Typer sees each group's fields as options (in the
    group's ``--help`` panel with ``panels``), and the command receives the groups built from their values."""

    def decorate(command: F) -> F:
        hints = typing.get_type_hints(command, include_extras=True)
        params: list[inspect.Parameter] = []
        groups: dict[str, tuple[type[OptionGroup], list[str]]] = {}
        for param in inspect.signature(command).parameters.values():
            group = hints[param.name]
            if not (isinstance(group, type) and issubclass(group, OptionGroup)):
                params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=group))
                continue
            field_hints = typing.get_type_hints(group, include_extras=True)
            fields = dataclasses.fields(group)  # type: ignore[arg-type]
            for field in fields:
                option = _in_panel(field_hints[field.name], group.panel) if panels else field_hints[field.name]
                params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default,
                                                annotation=option))
            groups[param.name] = (group, [field.name for field in fields])
        names = [param.name for param in params]
        if len(set(names)) != len(names) or set(groups) & set(names):
            raise TypeError(f"{command.__name__}: an option name is used twice: {names} (groups {list(groups)})")

        @functools.wraps(command)
        def with_groups(**values: Any) -> Any:
            for name, (group, fields) in groups.items():
                values[name] = group(**{field: values.pop(field) for field in fields})
            return command(**values)

        with_groups.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        with_groups.__annotations__ = {param.name: param.annotation for param in params}
        return with_groups  # type: ignore[return-value]

    return decorate


def _in_panel(option: Any, panel: str) -> Any:
    """``Annotated[T, typer.Option(...)]`` with the option shown in ``panel`` of --help."""
    base, *metadata = typing.get_args(option)
    metadata = [copy.copy(info) for info in metadata]  # the declaration itself stays as it is
    for info in metadata:
        if isinstance(info, typer.models.ParameterInfo):
            info.rich_help_panel = panel
    return Annotated[(base, *metadata)]
