"""One registry type for everything that is chosen by name: judges, suites, protocols, erasure methods,
mitigations, feature extractors, attacks, denoiser adapters, test families.

In the manner of lm-evaluation-harness' ``api/registry.py``: an entry is registered under a name with a
one-line summary and either the object itself or a lazy ``"module:attr"`` reference, imported on first use,
so that listing what exists (``--help``, ``eval suites``) imports nothing heavy. Other packages add entries
without editing this one, through the Python entry-point group ``safe_diffusion.<kind>`` (for example, in
a user's ``pyproject.toml``::

    [project.entry-points."safe_diffusion.judges"]
    my-judge = "my_package.judge:MyJudge"

); entry points are read once, the first time a registry is asked for something it does not hold.

An unknown name is a one-line :class:`~safe_diffusion.common.errors.InputError` listing what exists.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from .errors import InputError

T = TypeVar("T")


def resolve_reference(reference: str) -> Any:
    """The object a ``"package.module:attr"`` (or ``"package.module:Class.attr"``) reference names."""
    module, _, attr = reference.partition(":")
    if not module or not attr:
        raise ValueError(f"a lazy reference looks like 'package.module:attr', got {reference!r}")
    value: Any = import_module(module)
    for part in attr.split("."):
        value = getattr(value, part)
    return value


@dataclass
class Entry(Generic[T]):
    """One registered name: the object (or its lazy reference), a one-line summary and free-form metadata."""

    name: str
    target: T | str
    summary: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def loaded(self) -> bool:
        return not isinstance(self.target, str)

    def load(self) -> T:
        if isinstance(self.target, str):
            self.target = resolve_reference(self.target)
        return self.target


class Registry(Generic[T]):
    """Names → objects of one kind. ``registry.get(name)`` (or ``registry[name]``) returns the object;
    ``registry.entry(name)`` the :class:`Entry` with its summary and metadata; ``registry.names()`` lists them
    in registration order."""

    def __init__(self, kind: str, *, what: str | None = None, normalize: Callable[[str], str] | None = None):
        self.kind = kind  # plural, e.g. "judges": the entry-point group is safe_diffusion.<kind>
        self.what = what or kind.rstrip("s").replace("_", " ")  # singular, for messages: "judge"
        self._normalize = normalize or (lambda name: name.strip().lower())
        self._entries: dict[str, Entry[T]] = {}
        self._aliases: dict[str, str] = {}
        self._entry_points_read = False
        self._lock = threading.RLock()

    # -- registering ----------------------------------------------------------------------------------
    def register(
        self,
        name: str,
        target: T | str | None = None,
        *,
        summary: str = "",
        aliases: tuple[str, ...] = (),
        replace: bool = False,
        **metadata: Any,
    ):
        """Register `target` (an object, or a lazy ``"module:attr"``) under `name`.

        Without `target`, returns a decorator: ``@registry.register("name", summary=...)``.
        Registering a taken name raises ValueError unless ``replace=True``.
        """
        if target is None:

            def decorator(obj):
                self.register(name, obj, summary=summary, aliases=aliases, replace=replace, **metadata)
                return obj

            return decorator
        key = self._normalize(name)
        if not key or "," in key:
            raise ValueError(f"invalid {self.what} name {name!r}")
        with self._lock:
            if not replace and (key in self._entries or key in self._aliases):
                raise ValueError(f"{self.what} {key!r} is already registered")
            self._entries[key] = Entry(key, target, summary, dict(metadata))
            for alias in aliases:
                self._aliases[self._normalize(alias)] = key
        return target

    def unregister(self, name: str) -> None:
        key = self._normalize(name)
        with self._lock:
            self._entries.pop(key, None)
            for alias in [a for a, k in self._aliases.items() if k == key]:
                del self._aliases[alias]

    # -- reading --------------------------------------------------------------------------------------
    def _read_entry_points(self) -> None:
        with self._lock:
            if self._entry_points_read:
                return
            self._entry_points_read = True
            for point in entry_points(group=f"safe_diffusion.{self.kind}"):
                key = self._normalize(point.name)
                if key not in self._entries:
                    self._entries[key] = Entry(key, point.value, f"from {point.value}", {"entry_point": True})

    def _key(self, name: str) -> str | None:
        key = self._normalize(name)
        key = self._aliases.get(key, key)
        if key in self._entries:
            return key
        self._read_entry_points()
        return key if key in self._entries else None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._key(name) is not None

    def entry(self, name: str) -> Entry[T]:
        key = self._key(name)
        if key is None:
            raise InputError(f"unknown {self.what} {name!r}; choose from: {', '.join(self.names())}")
        return self._entries[key]

    def get(self, name: str) -> T:
        """The object registered under `name` (imported now if it was registered lazily)."""
        entry = self.entry(name)
        try:
            return entry.load()
        except (ImportError, AttributeError) as exc:
            raise InputError(f"{self.what} {entry.name!r} cannot be loaded from {entry.target!r}: {exc}") from None

    def __getitem__(self, name: str) -> T:
        """``registry[name]`` is :meth:`get`."""
        return self.get(name)

    def canonical(self, name: str) -> str:
        """The registered name that `name` (any case, or an alias) stands for."""
        return self.entry(name).name

    def names(self) -> list[str]:
        self._read_entry_points()
        return list(self._entries)

    def entries(self) -> list[Entry[T]]:
        self._read_entry_points()
        return list(self._entries.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"
