"""Method fields on the command line: `method.X=...` reaches the methods that have a field X.

Each method has its own fields (conf/method/<name>.yaml): powerbert has `lambda`, adapler `phi`,
bert neither. Hydra composes a multirun's primary config once, before the sweeper sees the sweep,
with the default method (bert) and every override that is not swept; there a plain
`method.phi=5e-4` stops the whole sweep, since bert's config is closed (struct) and has no `phi`.
So run.py hands each `method.X=...` to Hydra as `++method.X=...` (Hydra's own "add or override"
prefix), which any method's config takes. Then:

- in a multirun, the sweeper gives `method.X=...`, as the plain override, to the jobs whose method
  has a field X and leaves it out of the others (hydra_plugins/tokenprune_sweeper/suites.py), so a
  method's jobs get exactly the overrides of a plain run of that method;
- in a single run, `check_single_run` stops with one sentence when the method has no field X.

`+method.X=...` (add a field) and `~method.X` (delete one) keep Hydra's meaning and are left alone.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from hydra.errors import CompactHydraException

PREFIX = "method."
LENIENT = "++"


class MethodFieldError(CompactHydraException):
    """A `method.X` override that the method (or every method of a sweep) has no field for."""


def lenient(arguments: Iterable[str]) -> list[str]:
    """The command line with each `method.X=...` turned into `++method.X=...`."""
    return [LENIENT + a if a.startswith(PREFIX) and "=" in a else a for a in arguments]


def field_of(override: str) -> str | None:
    """X of a `method.X=...` or `++method.X=...` override (X of `method.X.Y=...` too); None for others."""
    key = override.partition("=")[0].removeprefix(LENIENT)
    if not key.startswith(PREFIX):
        return None
    return key.removeprefix(PREFIX).split(".")[0]


def plain(override: str) -> str:
    """The override as a plain run of a method with that field is given it: `method.X=...`."""
    return override.removeprefix(LENIENT) if field_of(override) else override


def check_single_run(method: str, fields: Iterable[str], overrides: Iterable[str]) -> None:
    """Each method field override of a single run names a field of its method."""
    fields = list(fields)
    for override in overrides:
        field = field_of(override)
        if field is not None and field not in fields:
            raise MethodFieldError(
                f"method={method} has no field {field} (its fields: {', '.join(fields)}): check the spelling "
                f"in conf/method/{method}.yaml, or pick a method that has it."
            )


def check_sweep(field: str, fields_by_method: Mapping[str, Iterable[str]]) -> None:
    """A method field override of a sweep names a field of at least one of the sweep's methods."""
    if not any(field in fields for fields in fields_by_method.values()):
        listed = "; ".join(f"{m}: {', '.join(fields)}" for m, fields in fields_by_method.items())
        raise MethodFieldError(
            f"method.{field}: no method of this sweep has a field {field} ({listed}): check the spelling "
            f"in conf/method/, or add a method that has it to the sweep."
        )
