"""Schema checking with one-line errors: the bottom of the suite's layers.

Every config section (the top-level config, each method's and task's parameters, the recursive
section) is checked against a JSON schema here; the first problem becomes one ``ConfigError``
line naming the key. The schema files live in ``workflow/schemas/`` (Snakemake validates
against the same files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_DIR = REPO_ROOT / "workflow" / "schemas"
SCHEMA_PATH = SCHEMA_DIR / "config.schema.yaml"


class ConfigError(ValueError):
    """The configuration is invalid; the message is one line: '<key path>: <problem>'."""


# Every name in a config (experiments, models, tasks, methods, data sets, recursive models, runs
# and budgets) becomes part of file paths and job commands, so it is kept to a safe alphabet. The
# schemas' ``$defs/name`` holds the same pattern (a test keeps them equal).
NAME_PATTERN = r"^(?!.*\n)(?!\.{1,2}$)(?!-)[A-Za-z0-9_.-]{1,64}$"
NAME_RULE = "names use 1-64 letters, digits, '_', '-' or '.', do not start with '-', and are not '.' or '..'"


# -- YAML without silent overrides -----------------------------------------------------------


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A YAML mapping names the same key twice (plain YAML keeps the last one silently)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (merge keys ``<<`` may still
    be overridden, as YAML intends)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.setdefault(key, line)
                except TypeError:  # an unhashable key: SafeLoader reports it
                    break
                if first != line:
                    raise DuplicateKeyError(
                        problem=f"line {line}: duplicate key {key!r} (first given on line {first})"
                    )
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Parse YAML like yaml.safe_load, but refuse duplicate keys (DuplicateKeyError)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506  (a SafeLoader subclass)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line describing a YAML error (the duplicate key, or the parser's first line)."""
    if isinstance(exc, DuplicateKeyError):
        return exc.problem
    return str(exc).splitlines()[0]


# -- schema checking with readable errors ---------------------------------------------------


def _format_path(where: str, path) -> str:
    out = where
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "config"


def _describe(error) -> str:
    v, inst, val = error.validator, error.instance, error.validator_value
    if v == "pattern" and val == NAME_PATTERN:
        return f"name {inst!r} is not allowed ({NAME_RULE})"
    if v == "additionalProperties" and isinstance(inst, dict):
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(k for k in inst if k not in allowed)
        hint = f" (allowed: {', '.join(sorted(allowed))})" if allowed else ""
        return f"unknown key {extra[0]!r}{hint}" if extra else error.message
    if v == "required":
        missing = [k for k in val if isinstance(inst, dict) and k not in inst]
        return f"missing required key {missing[0]!r}" if missing else error.message
    if v == "type":
        return f"expected {val}, got {type(inst).__name__} {inst!r}"
    if v in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[v]
        return f"must be {op} {val}, got {inst!r}"
    if v == "enum":
        return f"must be one of {', '.join(map(str, val))}; got {inst!r}"
    if v == "minItems":
        return "must not be empty" if val == 1 else f"needs at least {val} items"
    if v == "minLength":
        return "must not be empty"
    if v == "uniqueItems":
        return f"has duplicate items: {inst!r}"
    return error.message.splitlines()[0]


def _registry():
    from referencing import Registry, Resource

    def retrieve(uri: str):
        path = SCHEMA_DIR / uri.split("/")[-1]
        return Resource.from_contents(load_yaml(path.read_text()))

    return Registry(retrieve=retrieve)


def check_against_schema(data: Any, schema: dict, where: str = "") -> None:
    """Validate ``data`` against ``schema``; raise ConfigError naming the first problem."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema, registry=_registry())
    errors = list(validator.iter_errors(data))
    if not errors:
        return

    # Report the deepest error of the first failing location: it names the key most precisely.
    def depth(e):
        return len(list(e.absolute_path))

    first = sorted(errors, key=lambda e: (list(map(str, e.absolute_path)), -depth(e)))[0]
    err = jsonschema.exceptions.best_match([first])
    while err.context:
        err = min(err.context, key=lambda e: -depth(e))
    raise ConfigError(f"{_format_path(where, err.absolute_path)}: {_describe(err)}")


def load_schema() -> dict:
    return load_yaml(SCHEMA_PATH.read_text())
