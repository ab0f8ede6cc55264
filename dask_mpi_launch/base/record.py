"""Frozen records for the modules a thin rank imports, without ``dataclasses``.

``dataclasses`` imports ``inspect`` (and with it ``ast``, ``dis``, ``tokenize``,
``linecache``...): about a hundred file look-ups and 10 ms of CPU in every rank, for four
small classes. :class:`Record` gives them what they used of ``@dataclass(frozen=True)``:
fields declared by annotations (defaults as class attributes, :class:`factory` for a
mutable one), construction by position or keyword, ``__post_init__``, ``==``, ``hash``,
``repr``, assignment refused (``dataclasses.FrozenInstanceError``, imported only then),
pickling as plain objects, and :func:`replace`.
"""
from __future__ import annotations


class factory:
    """A field's default made anew for each record (``field(default_factory=...)``)."""

    def __init__(self, make):
        self.make = make


_MISSING = object()


class Record:
    """Subclasses declare fields as annotations, in order; a class attribute is the
    field's default (fields without one come first)."""

    FIELDS: tuple = ()  # the field names, in order (set for each subclass)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        names = [n for n in cls.__dict__.get("__annotations__", {}) if n != "FIELDS"]
        inherited = [n for n in cls.FIELDS if n not in names]
        cls.FIELDS = tuple(inherited + names)
        cls._DEFAULTS = {n: cls.__dict__[n] for n in names if n in cls.__dict__}
        for base in cls.__mro__[1:]:
            for n, v in getattr(base, "_DEFAULTS", {}).items():
                cls._DEFAULTS.setdefault(n, v)

    def __init__(self, *args, **kwargs):
        name = type(self).__name__
        if len(args) > len(self.FIELDS):
            raise TypeError(f"{name}() takes {len(self.FIELDS)} positional arguments "
                            f"but {len(args)} were given")
        values = dict(zip(self.FIELDS, args))
        for key, value in kwargs.items():
            if key not in self.FIELDS:
                raise TypeError(f"{name}.__init__() got an unexpected keyword argument "
                                f"{key!r}")
            if key in values:
                raise TypeError(f"{name}.__init__() got multiple values for argument "
                                f"{key!r}")
            values[key] = value
        for key in self.FIELDS:
            if key not in values:
                default = self._DEFAULTS.get(key, _MISSING)
                if default is _MISSING:
                    raise TypeError(f"{name}.__init__() missing required argument: {key!r}")
                values[key] = default.make() if isinstance(default, factory) else default
            object.__setattr__(self, key, values[key])
        post_init = getattr(self, "__post_init__", None)
        if post_init is not None:
            post_init()

    def _values(self) -> tuple:
        return tuple(getattr(self, n) for n in self.FIELDS)

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self):
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.FIELDS)
        return f"{type(self).__qualname__}({fields})"

    def __setattr__(self, name, value):
        from dataclasses import FrozenInstanceError

        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name):
        from dataclasses import FrozenInstanceError

        raise FrozenInstanceError(f"cannot delete field {name!r}")


def replace(record: Record, /, **changes) -> Record:
    """A copy of ``record`` with ``changes`` (``dataclasses.replace``: ``__post_init__``
    runs again)."""
    return type(record)(**{**{n: getattr(record, n) for n in record.FIELDS}, **changes})
