"""The one way this package rewrites Relax: a module pass that runs an expression mutator over every Relax
function of the module (the row kernels, the conv kernels and the fast GELU are such passes), and what those
mutators share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

OPAQUE = 8  # relax op_pattern kOpaque: fusion leaves a scheduled kernel whole


def static_shape(expr: Any) -> list[int] | None:
    """The static shape of a Relax expression, or None (symbolic or unknown)."""
    try:
        return [int(v) for v in expr.ty.shape]
    except (TypeError, ValueError, AttributeError):
        return None


def add_func_once(builder: Any, added: dict[tuple, Any], key: tuple, name: str, make: Callable[[], Any]) -> Any:
    """The GlobalVar of ``make()``, added to the module as ``name`` the first time ``key`` is asked for (one
    kernel per shape, however many calls use it)."""
    if key not in added:
        added[key] = builder.add_func(make(), name)
    return added[key]


def mutator_pass(name: str, make_mutator: Callable[[Any], Any],
                 prepare: Callable[[Any, Any], None] | None = None) -> Any:
    """A ``tvm.transform`` module pass named ``name``: ``make_mutator(mod)`` (a ``relax.PyExprMutator``) visits
    every Relax function, after ``prepare(mutator, func)`` when given; the functions it adds land in the module."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        mutator = make_mutator(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                if prepare is not None:
                    prepare(mutator, func)
                mutator.builder_.update_func(gv, mutator.visit_expr(func))
        return mutator.builder_.get()

    return _pass
