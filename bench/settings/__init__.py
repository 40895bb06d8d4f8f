"""Settings: everything one group of board rows shares, as a YAML file checked against a schema.

    setting = load_setting("embedded-default")                     # shipped inside the package
    setting = load_setting("my.yaml", ["judge=keyword", "attack.harmful_n=[0,100]"])
    resolved = resolve(setting, cache)                             # bench.settings.resolve

A bad file is one line naming the file, the key (dotted), what was expected and what was found.
`--set dotted.key=value` (and every command-line flag, which the CLI turns into the same form)
overrides the file, as lm-eval's flags override its config file.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from bench.errors import UserError, did_you_mean
from bench.settings.schema import Setting

SHIPPED = Path(__file__).parent
EMBEDDED_DEFAULT = "embedded-default"


def shipped() -> dict[str, Path]:
    """Settings shipped inside the package, by name."""
    return {p.stem: p for p in sorted(SHIPPED.glob("*.yaml"))}


def setting_file(name_or_path: str | Path) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if str(name_or_path) in shipped():
        return shipped()[str(name_or_path)]
    raise UserError(
        f"setting {str(name_or_path)!r}: no such file, and not a shipped setting ({', '.join(shipped())}); check the "
        "path"
    )


def read_yaml_mapping(path: Path, what: str, sections: str) -> dict:
    """A user's YAML file (a setting, a sweep spec) as a mapping, or one line saying what is wrong:
    not UTF-8, nested past PyYAML's recursion, not YAML (with its line), or not a mapping."""
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path}: not UTF-8 text (byte {exc.start}); a {what} is a YAML file") from None
    except RecursionError:  # PyYAML's composer recurses once per level of nesting
        raise UserError(f"{what} {path}: nested too deeply to be a {what}; fix the file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # PyYAML's own text spans lines
        raise UserError(f"{what} {path}:{where} not valid YAML ({problem}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"{what} {path}: expected a mapping of {sections}, found {type(raw).__name__}")
    return raw


def load_setting(name_or_path: str | Path, overrides: list[str] = ()) -> Setting:
    path = setting_file(name_or_path)
    raw = read_yaml_mapping(path, "setting", "sections (models, data, ...)")
    for item in overrides:
        set_dotted(raw, item)
    return validate(raw, str(path))


def set_dotted(raw: dict, item: str) -> None:
    """Apply one `dotted.key=value`; the value is read as JSON, else as YAML ("0.5" and "5e-05" are
    numbers, "[0,100]" a list; PyYAML alone reads "5e-05" as a string, YAML 1.1 wants a dot)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set takes dotted.key=value, e.g. generation.engine=transformers; got {item!r}")
    try:
        value = json.loads(text) if text.strip() else None
    except ValueError:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
    *parents, last = key.strip().split(".")
    node = raw
    for part in parents:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise UserError(f"--set {item!r}: {part!r} is not a section (it holds {node!r})")
    node[last] = value


def validate(raw: dict, where: str) -> Setting:
    from pydantic import ValidationError

    try:
        return Setting.model_validate(raw)
    except ValidationError as exc:
        # an unknown key first: a misspelt key is also why the right one is "missing"
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        # a value that fits no member of a union (a name or a block) fails once per member, at one key
        first = [e for e in errors if _key(e) == _key(errors[0]) and e["type"] not in ("extra_forbidden", "missing")]
        count = len({_key(e) for e in errors})
        raise UserError(describe(errors[0], where, count, first[1:] if first[:1] == errors[:1] else [])) from None


def _key(error: dict) -> str:
    # a union's members add their type to the location ("models.aligned.Model", "judge.str"); drop them
    return ".".join(str(p) for p in error["loc"] if not _union_member(p))


def _union_member(part) -> bool:
    # (and a mapping's key check adds "[key]")
    return isinstance(part, str) and (
        part[:1].isupper() or part == "[key]" or part.split("[")[0] in ("str", "int", "float", "bool", "list")
    )


def describe(error: dict, where: str, count: int, alternatives: list[dict] = ()) -> str:
    """One line from pydantic's first error: file, dotted key, what was expected (each member's
    expectation, for a union), what was found."""
    key = _key(error)
    found = error.get("input")
    more = f" (and {count - 1} more problem{'s' * (count > 2)})" if count > 1 else ""
    if error["type"] == "extra_forbidden":
        section = _section(error["loc"][:-1])
        known = ", ".join(section.model_fields) if section else "see the schema"
        hint = did_you_mean(error["loc"][-1], section.model_fields) if section else ""
        return f"setting {where}: unknown key {key!r}{hint}; known keys here: {known}{more}"
    if error["type"] == "missing":
        return f"setting {where}: {key}: expected a value, found nothing (the key is required){more}"
    expected = " or ".join(e["msg"].removeprefix("Input should be ").lower() for e in [error, *alternatives])
    return f"setting {where}: {key}: expected {expected}, found {found!r}{more}"


def _section(loc: tuple):
    """The schema class at a location (for listing its known keys)."""
    from typing import get_args

    cls = Setting
    for part in loc:
        if isinstance(part, int) or _union_member(part):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        options = [
            a
            for a in (get_args(field.annotation) or (field.annotation,))
            if isinstance(a, type) and hasattr(a, "model_fields")
        ]
        if not options:
            for a in get_args(field.annotation):  # list[Utility]
                options += [b for b in get_args(a) if isinstance(b, type) and hasattr(b, "model_fields")]
        if not options:
            return None
        cls = options[0]
    return cls
