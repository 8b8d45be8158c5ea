"""What the sweep and serve specs share: their error types, the strict section base, paths taken from
the spec file's folder, the model field's check, YAML reading, and pydantic errors as field paths.

A validator raises `FieldError(path, message)` to put its message on a sub-path of the field it checks
(or, with root=True, on a path from the spec's root); `describe` turns pydantic's errors into
("search.lr.loguniform", "loguniform needs low > 0") pairs, which `SpecError` prints one per line.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo


class SpecError(ValueError):
    """A spec that cannot run. `errors` holds (field path, message) pairs, e.g.
    ("methods[1]", "unknown method 'lorra'; valid: full, lora, ...")."""

    what = "sweep spec"

    def __init__(self, errors: list[tuple[str, str]], source: str | None = None):
        self.errors = list(errors)
        self.source = source
        head = f"invalid {self.what} {source}" if source else f"invalid {self.what}"
        super().__init__(head + ":\n" + "\n".join(f"  {path or '(spec)'}: {msg}" for path, msg in self.errors))


class FieldError(ValueError):
    """A validator's error at a sub-path of the field being validated (e.g. ("loguniform",) under
    search.lr), or at a path from the spec's root when raised by a cross-field check (root=True)."""

    def __init__(self, path: tuple, message: str, root: bool = False):
        super().__init__(message)
        self.path, self.root = tuple(path), root


class Section(BaseModel):
    """A spec section: unknown fields refused; strict (no silent str -> number or bool -> int coercion:
    the YAML loader reads 1e-4 as a float); frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_default=True)


def choices(names) -> str:
    return ", ".join(names)


def base_dir(info: ValidationInfo) -> Path:
    ctx = info.context or {}
    return Path(ctx.get("base_dir") or ".").expanduser()


def resolve_path(path: str, info: ValidationInfo) -> Path:
    """Relative paths are taken from the spec file's folder (the current folder for a plain dict)."""
    p = Path(path).expanduser()
    return (p if p.is_absolute() else base_dir(info) / p).resolve()


def check_model(name: str, info: ValidationInfo) -> str:
    """A model field: a built-in name stays as it is; a Hugging Face folder becomes its absolute path."""
    from workers.data.assets import check_model_name, model_choices

    names = model_choices()
    if name in names:
        return name
    valid = f"valid: {choices(names)}, or a path to a Hugging Face model folder"
    if name.startswith("random:"):
        raise ValueError(f"unknown model {name!r}; {valid}")
    path = resolve_path(name, info)
    try:
        check_model_name(path)   # a folder with a config.json; loads nothing
    except ValueError:
        raise ValueError(f"unknown model {name!r} (not a built-in name, and {path} is not a Hugging Face "
                         f"model folder with a config.json); {valid}") from None
    return str(path)


# -- pydantic errors as field paths ----------------------------------------------------------------
def field_path(loc: tuple) -> str:
    """("search", "lr", 0) -> "search.lr[0]"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def error_message(err: dict, section_at: Callable[[tuple], type[BaseModel] | None]) -> tuple[tuple, str]:
    """(location, message) of one pydantic error: a validator's FieldError moves the location, an unknown
    field lists the valid ones of its section (`section_at(parent location)` -> the model class or None)."""
    loc, kind = tuple(err["loc"]), err["type"]
    exc = (err.get("ctx") or {}).get("error")
    if isinstance(exc, FieldError):
        return (exc.path if exc.root else loc + exc.path), str(exc)
    if isinstance(exc, Exception):
        return loc, str(exc)
    if kind == "extra_forbidden":
        section = section_at(loc[:-1])
        valid = f"; valid fields: {choices(section.model_fields)}" if section else ""
        return loc, f"unknown field {loc[-1]!r}{valid}"
    if kind == "missing":
        return loc, "required field is missing"
    return loc, f"{err['msg']}, got {err['input']!r}"


def validation_errors(e: ValidationError, section_at) -> list[tuple[tuple, str]]:
    return [error_message(err, section_at) for err in e.errors()]


# -- YAML ------------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads 1e-4 (no dot) as a float; YAML 1.1 would make it a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def read_yaml(path: Path, error: type[SpecError] = SpecError):
    """A spec file's YAML (1e-4 read as a number); `error` (a SpecError type) when it cannot be read."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except OSError as e:
        raise error([("", f"cannot read the spec file: {e.strerror or e}")], str(path)) from None
    except yaml.YAMLError as e:
        raise error([("", f"not valid YAML: {e}")], str(path)) from None
