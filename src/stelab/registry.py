"""One small registry mechanism, shared by every open family of names in stelab.

Core estimators (:mod:`stelab.estimators`), SBN estimators
(:mod:`stelab.sbn.estimators`) and quantizer forward functions
(:mod:`stelab.quantizers`) are each a :class:`Registry`: a name -> object map
with a register decorator, look-ups that fail with a "did you mean" error
(:func:`stelab.errors.unknown`), and constructor parameters introspected once,
when the name is registered, not on every call.

Depends on the standard library only (``import stelab`` stays cheap).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import ConfigError, StelabTypeError, unknown

__all__ = ["Entry", "Registry"]

T = TypeVar("T")

_CACHE_MAX = 256


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered name: the object and its constructor's signature (resolved once, on
    first use, so that registering the built-ins costs nothing at import)."""

    name: str
    obj: T

    @functools.cached_property
    def signature(self) -> inspect.Signature | None:
        return _signature(self.obj)

    @property
    def params(self) -> tuple[str, ...]:
        """The keyword parameters ``obj`` accepts (empty when it takes none)."""
        if self.signature is None:
            return ()
        return tuple(
            p.name
            for p in self.signature.parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        )


def _signature(obj: Any) -> inspect.Signature | None:
    if not callable(obj):
        return None
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):  # builtins without a signature
        return None


class Registry(Generic[T]):
    """Names of one kind (``"estimator"``, ``"quantizer"``, ...) mapped to objects.

    Args:
        kind: what a name is, for error messages (``unknown estimator 'x'``).
        base: if given, :meth:`register` accepts only subclasses of it.
        cache: :meth:`build` returns the same instance for the same name and
            (hashable) parameters; use only for immutable objects.
        identifiers: names must be Python identifiers (else any non-empty string).

    Example::

        SHAPES = Registry("shape")

        @SHAPES.register("square")
        class Square: ...

        SHAPES.build("square")        # Square()
        SHAPES.build("sqare")         # ConfigError: ... (did you mean 'square'?)
    """

    def __init__(
        self, kind: str, *, base: type | None = None, cache: bool = False, identifiers: bool = True
    ) -> None:
        self.kind = kind
        self.identifiers = identifiers
        self.base = base
        self._entries: dict[str, Entry[T]] = {}
        self._cache: dict[Any, Any] | None = {} if cache else None

    # -- registration ----------------------------------------------------------

    def register(self, name: str, *, overwrite: bool = False) -> Callable[[Any], Any]:
        """A decorator registering its argument under ``name`` (returns it unchanged)."""
        self.check_name(name)

        def deco(obj: Any) -> Any:
            self.add(name, obj, overwrite=overwrite)
            return obj

        return deco

    def add(self, name: str, obj: T, *, overwrite: bool = False) -> Entry[T]:
        """Register ``obj`` under ``name``; a ConfigError if taken (unless ``overwrite``)."""
        self.check_name(name)
        if self.base is not None and not (inspect.isclass(obj) and issubclass(obj, self.base)):
            raise StelabTypeError(
                f"register({name!r}) expects a {self.base.__name__} subclass, got {obj!r}"
            )
        if name in self._entries and not overwrite:
            raise ConfigError(
                f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it"
            )
        entry = Entry(name, obj)
        self._entries[name] = entry
        if self._cache is not None:
            self._cache.clear()
        return entry

    def unregister(self, name: str) -> bool:
        """Remove ``name`` (for tests and plugins that clean up); whether it was there."""
        if self._cache is not None:
            self._cache.clear()
        return self._entries.pop(name, None) is not None

    def check_name(self, name: Any) -> None:
        """A ConfigError unless ``name`` is a Python identifier (a non-empty string)."""
        if not isinstance(name, str) or not (name.isidentifier() if self.identifiers else name):
            what = "a Python identifier" if self.identifiers else "a non-empty string"
            raise ConfigError(f"{self.kind} name must be {what}, got {name!r}")

    # -- look-up -----------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._entries)

    def entry(self, name: Any) -> Entry[T]:
        """The entry of ``name``, or a ConfigError listing the known names."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise unknown(self.kind, name, self._entries) from None

    def get(self, name: Any) -> T:
        """The object registered under ``name`` (see :meth:`entry`)."""
        return self.entry(name).obj

    def params(self, name: str) -> tuple[str, ...]:
        """The parameters :meth:`build` accepts for ``name``."""
        return self.entry(name).params

    def check_params(self, name: str, params: dict[str, Any]) -> None:
        """A ConfigError naming the parameters ``name`` does not accept (or a missing one)."""
        sig = self.entry(name).signature
        if sig is None:
            return
        try:
            sig.bind(**params)
        except TypeError:
            allowed = self.entry(name).params
            raise ConfigError(
                f"{self.kind} {name!r} got unexpected parameters {sorted(params)}; "
                f"allowed: {', '.join(allowed) or 'none'}"
            ) from None

    def build(self, name: Any, **params: Any) -> Any:
        """``obj(**params)`` for the object registered under ``name``, parameters checked."""
        key: Any = None
        if self._cache is not None:
            try:
                # the type is part of the key: True == 1 and 1 == 1.0 must not share one
                items = sorted((k, type(v).__qualname__, v) for k, v in params.items())
                key = (name, *items)
                hit = self._cache.get(key)
            except TypeError:  # unhashable parameter values
                key, hit = None, None
            if hit is not None:
                return hit
        entry = self.entry(name)
        self.check_params(name, params)
        out = entry.obj(**params)  # type: ignore[operator]
        if key is not None and len(self._cache) < _CACHE_MAX:  # type: ignore[arg-type]
            self._cache[key] = out  # type: ignore[index]
        return out
