"""Command options as dataclasses: one per command, the single source of every flag.

A command's options are one dataclass whose fields carry their default and help text
(:func:`option`). From it come the fire CLI's strict checks, ``--help``, the resolved config a run
writes (``args.json``, a store's ``build_args``) and what ``--config FILE`` reloads.

Precedence, in :func:`resolve` and nowhere else::

    command-line flag  >  --config FILE (JSON or YAML)  >  preset  >  field default

A *preset* is a set of defaults chosen by another option (``--align irepa`` sets the projector,
kernel, spatial norm, gamma and coefficient; an objective sets its optimiser defaults). When a
flag names a different preset than the config file did, the config file's values for the fields
that preset sets are dropped (so ``--config runs/a/args.json --align repa`` trains REPA, not a
mix), and a note says which.

Command lines are checked before any work and before torch is imported: an unknown flag exits 2
naming the closest real flags; booleans take true/false/yes/no/on/off/1/0 and ``--noflag``;
values are converted to the field's type (``--gamma abc`` fails at once); dashed and
underscored spellings both work; ``-h`` / ``--help`` print the dashed flags with their real
defaults. fire then dispatches the command with the checked values.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = [
    "option", "OptionError", "ParsedArgs", "flag_name", "field_types", "coerce", "parse_argv", "resolve",
    "load_config_file", "check_fields", "to_json", "format_help", "one_line_error", "run_commands",
]

BOOL_TRUE = ("true", "yes", "on", "1")
BOOL_FALSE = ("false", "no", "off", "0")


class OptionError(ValueError):
    """A bad flag, value or combination on a command line or in a config file."""


def option(default: Any = MISSING, help: str = "", *, choices: Sequence[Any] | None = None,
           positional: bool = False, metavar: str | None = None, default_factory: Any = MISSING,
           hidden: bool = False, shown: str | None = None) -> Any:
    """A dataclass field that carries its help text (and allowed values) for the CLI.

    ``positional`` fields are taken from bare arguments in order (a ``list`` one takes the rest).
    ``hidden`` fields are accepted but left out of ``--help`` (tests, benchmarks). ``shown`` is the
    default as ``--help`` states it when the field's default is a placeholder (None resolved later).
    """
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None,
            "positional": positional, "metavar": metavar, "hidden": hidden, "shown": shown}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    """Field name -> its documented flag (``shard_size`` -> ``--shard-size``)."""
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------- types


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's fields."""
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _split_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        out: list[Any] = []
        for v in value:
            out.extend(_split_list(v) if isinstance(v, str) else [v])
        return out
    return [value]


def coerce(value: Any, tp: Any, flag: str) -> Any:
    """Convert a command-line / config-file value to the field type ``tp`` (OptionError if not)."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise OptionError(f"{flag} needs a value")
    if optional and inner is not str and isinstance(value, str) and value.strip().lower() in ("none", "null"):
        return None
    origin = typing.get_origin(inner)
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        text = str(value).strip().lower()
        if text in BOOL_TRUE:
            return True
        if text in BOOL_FALSE:
            return False
        raise OptionError(f"{flag} takes true/false/yes/no/1/0; got {value!r}")
    if inner is int:
        if isinstance(value, bool):
            raise OptionError(f"{flag} takes an integer; got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip().replace("_", ""))
        except ValueError:
            raise OptionError(f"{flag} takes an integer; got {value!r}") from None
    if inner is float:
        if isinstance(value, bool):
            raise OptionError(f"{flag} takes a number; got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(str(value).strip())
        except ValueError:
            raise OptionError(f"{flag} takes a number; got {value!r}") from None
    if inner is str:
        if isinstance(value, (list, tuple)):  # fire reads "a,b" as a tuple: a str field wants the text
            return ",".join(str(v) for v in value)
        return str(value)
    if origin in (list, tuple):
        args = typing.get_args(inner)
        items = _split_list(value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise OptionError(f"{flag} takes {len(args)} comma-separated values; got {value!r}")
            return tuple(coerce(v, a, flag) for v, a in zip(items, args))
        elem = args[0] if args else str
        conv = [coerce(v, elem, flag) for v in items]
        return tuple(conv) if origin is tuple else conv
    if inner is Any or inner is object:
        return value
    raise TypeError(f"{flag}: unsupported option type {tp!r}")  # a bug in a config dataclass


def _check_choice(f: dataclasses.Field, value: Any) -> None:
    choices = f.metadata.get("choices")
    if not choices or value is None:
        return
    items = value if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if v not in choices:
            close = difflib.get_close_matches(str(v), [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise OptionError(f"{flag_name(f.name)} must be one of {', '.join(str(c) for c in choices)}; "
                              f"got {v!r}{hint}")


# ----------------------------------------------------------------------------- argv


@dataclass
class ParsedArgs:
    """A checked command line: ``values`` by field name (only what was given) and ``config``
    (the ``--config`` file, if any)."""

    values: dict[str, Any]
    config: str | None = None
    help: bool = False


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _suggest(token: str, names: Iterable[str]) -> str:
    flags = sorted({flag_name(n) for n in names} | {"--config", "--help"})
    close = difflib.get_close_matches(token.split("=", 1)[0], flags, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def parse_argv(cls: type, argv: Sequence[str], prog: str,
               unknown: Callable[[str], Sequence[type]] | None = None) -> ParsedArgs:
    """Check ``argv`` against the fields of ``cls`` without running anything.

    ``unknown(name)`` may return more dataclasses to look a flag up in (an objective's own
    options, imported only when a flag is not a common one). Raises :class:`OptionError` naming
    the flag.
    """
    fields = dict(_fields(cls))
    types_ = field_types(cls)
    searched: set[type] = set()
    positional = [f for f in fields.values() if f.metadata.get("positional")]
    values: dict[str, Any] = {}
    config = None
    want_help = False
    pos_i = 0
    rest: list[str] = []
    i = 0
    tokens = list(argv)

    def lookup(name: str) -> dataclasses.Field | None:
        if name in fields:
            return fields[name]
        if unknown is not None:
            for more in unknown(name):
                if more in searched:
                    continue
                searched.add(more)
                hints = field_types(more)
                for f in dataclasses.fields(more):
                    fields.setdefault(f.name, f)
                    types_.setdefault(f.name, hints[f.name])
            return fields.get(name)
        return None

    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if tok in ("-h", "--help", "-help"):
            want_help = True
            continue
        if tok == "--":
            rest.extend(tokens[i:])
            break
        if tok.startswith("-") and not _is_number(tok):
            if not tok.startswith("--"):
                raise OptionError(f"unknown short flag {tok} (only -h exists; flags are spelt --name)"
                                  + _suggest("--" + tok.lstrip("-"), fields) + f" ({prog} --help lists every flag)")
            body = tok[2:]
            name, eq, text = body.partition("=")
            key = name.replace("-", "_")
            if key == "config":
                if not eq:
                    if i >= len(tokens):
                        raise OptionError("--config needs a file")
                    text = tokens[i]
                    i += 1
                config = text
                continue
            f = lookup(key)
            negated = False
            if f is None and (key.startswith("no_") or key.startswith("no")):
                base = key[3:] if key.startswith("no_") else key[2:]
                fb = lookup(base)
                if fb is not None and _unwrap_optional(types_[fb.name])[0] is bool:
                    f, negated = fb, True
            if f is None:
                raise OptionError(f"unknown flag --{name}" + _suggest("--" + name, fields)
                                  + f" ({prog} --help lists every flag)")
            tp = types_[f.name]
            is_bool = _unwrap_optional(tp)[0] is bool
            if negated:
                if eq:
                    raise OptionError(f"--{name} takes no value")
                values[f.name] = False
                continue
            if not eq:
                if is_bool:
                    nxt = tokens[i] if i < len(tokens) else None
                    # "--flip false" and "--flip no" set it; "--flip" alone means true. Without
                    # positional arguments, any bare word after a boolean flag is its (bad) value.
                    if nxt is not None and (nxt.strip().lower() in BOOL_TRUE + BOOL_FALSE
                                            or (not positional and not nxt.startswith("-"))):
                        text = nxt
                        i += 1
                    else:
                        text = "true"
                else:
                    if i >= len(tokens):
                        raise OptionError(f"{flag_name(f.name)} needs a value")
                    text = tokens[i]
                    i += 1
            values[f.name] = coerce(text, tp, flag_name(f.name))
            _check_choice(f, values[f.name])
            continue
        rest.append(tok)
    for tok in rest:
        if pos_i >= len(positional):
            raise OptionError(f"unexpected argument {tok!r}" + (
                f"; {prog} takes {', '.join(f.name.upper() for f in positional)}" if positional else
                "; it takes flags only") + f" ({prog} --help)")
        f = positional[pos_i]
        tp = types_[f.name]
        if typing.get_origin(_unwrap_optional(tp)[0]) in (list, tuple):
            values.setdefault(f.name, [])
            values[f.name] = list(values[f.name]) + coerce(tok, tp, f.name.upper())
        else:
            values[f.name] = coerce(tok, tp, f.name.upper())
            pos_i += 1
    return ParsedArgs(values, config, want_help)


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------- config files


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON or YAML mapping of option names (dashed or underscored) to values."""
    p = Path(path)
    if not p.is_file():
        raise OptionError(f"--config {p}: no such file")
    text = p.read_text()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the same user error
        raise OptionError(f"--config {p}: cannot parse as {'YAML' if p.suffix.lower() in ('.yaml', '.yml') else 'JSON'}"
                          f" ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise OptionError(f"--config {p}: expected a mapping of option names to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


# ----------------------------------------------------------------------------- resolve


def resolve(cls: type, flags: Mapping[str, Any] | None = None, config: Mapping[str, Any] | str | None = None,
            presets: Callable[[dict[str, Any], dict[str, Any]], Mapping[str, Mapping[str, Any]]] | None = None,
            where: str = "--config") -> tuple[Any, list[str]]:
    """Build ``cls`` with the precedence flag > config file > preset > default.

    ``flags``: values given on the command line (or as keyword arguments). ``config``: a mapping
    or a JSON/YAML path (a store's manifest.json stands for its ``build_args``).
    ``presets(explicit, defaults)`` returns, per selecting option (e.g. ``"align"``,
    ``"objective"``), the defaults that option's value implies; ``explicit`` holds the flag and
    config-file values, ``defaults`` the field defaults. When a flag sets a selecting option to
    another value than the config file, the config file's values for the fields of the newly
    selected preset are dropped (a note says which). Returns ``(instance, notes)``; unknown
    keys raise OptionError.
    """
    flags = dict(flags or {})
    names = {f.name for f in dataclasses.fields(cls)}
    types_ = field_types(cls)
    conf: dict[str, Any] = {}
    if isinstance(config, (str, os.PathLike)):
        where = f"--config {config}"
        conf = load_config_file(config)
    elif config:
        conf = {str(k).replace("-", "_"): v for k, v in dict(config).items()}
    if "format_version" in conf and isinstance(conf.get("build_args"), dict):  # a store's manifest.json
        conf = {str(k).replace("-", "_"): v for k, v in conf["build_args"].items()}
    unknown = sorted(set(conf) - names)
    if unknown:
        close = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
        hints = ", ".join(f"{k}" + (f" (did you mean {c[0]}?)" if c else "") for k, c in close.items())
        raise OptionError(f"{where}: unknown option(s) {hints}")
    bad_flags = sorted(set(flags) - names)
    if bad_flags:
        raise OptionError(f"unknown option(s) {', '.join(flag_name(k) for k in bad_flags)}"
                          + _suggest(flag_name(bad_flags[0]), names))
    conf = {k: coerce(v, types_[k], f"{where}: {k}") for k, v in conf.items()}
    flags = {k: coerce(v, types_[k], flag_name(k)) for k, v in flags.items()}
    notes: list[str] = []
    defaults: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            defaults[f.name] = f.default_factory()  # type: ignore[misc]
    # A preset that the command line changes (directly, or through another preset: --objective jit
    # implies --align irepa-official-jit) replaces the config file's values of the fields that
    # preset sets; the file's other values stay. Repeat until no selector changes any more.
    file_sel = dict(conf)
    while True:
        chosen = dict(presets({**conf, **flags}, dict(defaults))) if presets else {}
        trial = dict(defaults)
        for preset in chosen.values():
            trial.update(preset)
        trial.update(conf)
        trial.update(flags)
        drop: dict[str, list[str]] = {}
        for selector, preset in chosen.items():
            if selector in file_sel and trial.get(selector) != file_sel[selector]:
                keys = [k for k in preset if k in conf and k not in flags]
                if selector in conf and selector not in flags:
                    keys.append(selector)
                if keys:
                    drop[selector] = sorted(set(keys))
        if not drop:
            break
        for selector, keys in drop.items():
            for k in keys:
                conf.pop(k, None)
            notes.append(f"{flag_name(selector)} is {trial.get(selector)} now (the config file had "
                         f"{file_sel[selector]}): {where}'s {', '.join(k for k in keys if k != selector) or 'value'} "
                         f"dropped in favour of that preset")
    values = dict(defaults)
    for selector, preset in chosen.items():
        for k, v in preset.items():
            if k not in names:
                raise TypeError(f"preset {selector} sets unknown option {k!r}")  # a bug in a preset table
            values[k] = coerce(v, types_[k], f"{selector} preset: {k}")
    values.update(conf)
    values.update(flags)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values]
    if missing:
        raise OptionError(f"missing required option(s) {', '.join(flag_name(m) for m in missing)}")
    return cls(**values), notes


def check_fields(obj: Any) -> None:
    """Convert every field of a config dataclass instance to its declared type and check its
    allowed values (call from ``__post_init__``), so that direct construction is checked too."""
    types_ = field_types(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if v is None and f.metadata.get("positional"):
            continue
        v = coerce(v, types_[f.name], flag_name(f.name))
        _check_choice(f, v)
        object.__setattr__(obj, f.name, v)


def json_value(v: Any) -> Any:
    """An option value as JSON holds it (tuples become lists, paths strings)."""
    if isinstance(v, (list, tuple)):
        return [json_value(x) for x in v]
    if isinstance(v, dict):
        return {k: json_value(x) for k, x in v.items()}
    if isinstance(v, Path):
        return str(v)
    return v


def to_json(obj: Any) -> dict[str, Any]:
    """A config dataclass as a JSON-able dict (tuples become lists)."""
    return {f.name: json_value(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


# ----------------------------------------------------------------------------- help


def value_text(v: Any) -> str:
    """An option value as a command line spells it (true/false, comma lists, none)."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v) or "none"
    return str(v)


def _default_text(f: dataclasses.Field) -> str:
    if f.metadata.get("shown"):
        return str(f.metadata["shown"])
    if f.default is not MISSING:
        return value_text(f.default)
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return value_text(f.default_factory())  # type: ignore[misc]
    return "required"


def format_help(cls: type, prog: str, summary: str, sections: Mapping[str, type] | None = None) -> str:
    """``--help`` text: usage, the summary, then every flag (dashed) with its default."""
    fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("hidden")]
    pos = [f for f in fields if f.metadata.get("positional")]
    usage = f"usage: {prog}" + "".join(f" {f.name.upper()}" + ("..." if "list" in str(f.type) else "") for f in pos)
    usage += " [--flag VALUE ...] [--config FILE]"
    lines = [usage, "", summary.strip(), ""]

    def block(title: str, flist: list[dataclasses.Field], hints: dict[str, Any]) -> None:
        lines.append(title)
        for f in flist:
            tp = _unwrap_optional(hints.get(f.name, Any))[0]
            if f.metadata.get("positional"):
                head = f"  {f.name.upper()}"
            elif tp is bool:
                head = f"  {flag_name(f.name)}, --no{f.name.replace('_', '-')}"
            else:
                head = f"  {flag_name(f.name)} {f.metadata.get('metavar') or _metavar(f, tp)}"
            choices = f.metadata.get("choices")
            desc = f.metadata.get("help", "")
            if choices and "|" not in desc:
                desc = (desc + " " if desc else "") + f"({' | '.join(str(c) for c in choices)})"
            tail = f" [default: {_default_text(f)}]" if not f.metadata.get("positional") else ""
            lines.append(head)
            lines.append(f"      {desc}{tail}")
        lines.append("")

    block("arguments and flags:" if pos else "flags:", fields, field_types(cls))
    for title, sub in (sections or {}).items():
        block(title, [f for f in dataclasses.fields(sub) if not f.metadata.get("hidden")], field_types(sub))
    lines.append("  --config FILE\n      JSON or YAML file of flag values (an args.json or build_args reloads);"
                 " precedence: flag > --config file > preset > default")
    lines.append("  -h, --help\n      this text")
    return "\n".join(lines) + "\n"


def _metavar(f: dataclasses.Field, tp: Any) -> str:
    if tp is int:
        return "N"
    if tp is float:
        return "X"
    if typing.get_origin(tp) in (list, tuple):
        return "A,B"
    return "VALUE"


# ----------------------------------------------------------------------------- running


def one_line_error(err: BaseException) -> str:
    """The user-facing one-line message of an error (DataLoader worker wrappers unwrapped)."""
    if "Original Traceback" not in str(err):
        return str(err).strip()
    from irepa.stores.errors import one_line  # the one unwrapping rule, shared with the loaders

    return one_line(err).strip()


def run_commands(prog: str, commands: Mapping[str, tuple[type, Callable[..., Any], str]],
                 argv: Sequence[str] | None = None, default: str | None = None,
                 prepare: Callable[[str, ParsedArgs], None] | None = None,
                 extra_fields: Callable[[str], Sequence[type]] | None = None,
                 help_sections: Callable[[str], Mapping[str, type]] | None = None,
                 help_extra: Callable[[str, ParsedArgs], str] | None = None,
                 user_errors: Callable[[], tuple[type[BaseException], ...]] | None = None) -> Any:
    """Check the command line, then let fire dispatch ``commands[name]`` with the checked values.

    ``commands``: name -> (options dataclass, function(parsed: ParsedArgs), one-line summary).
    With ``default`` the command name is implied (single-command programs). ``extra_fields(name)``
    returns more option dataclasses for a flag that is not a field of the command's (an
    objective's own options);
    ``help_sections(command)`` adds titled blocks of such flags to ``--help``, and
    ``help_extra(command, parsed)`` text after them (e.g. what the flags given beside ``--help``
    resolve to). User errors
    (OptionError, ValueError, FileNotFoundError and the classes ``user_errors()`` returns,
    imported only when an error happens) print one line and exit 2; ``IREPA_DEBUG=1`` shows the
    traceback; Ctrl-C and closed pipes exit quietly.
    """
    import fire

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if default is None:
            names = list(commands)
            if not argv or argv[0] in ("-h", "--help", "help"):
                print(f"usage: {prog} COMMAND [flags]   ({prog} COMMAND --help for its flags)\n\ncommands:")
                for n, (_, _, s) in commands.items():
                    print(f"  {n:<10} {s}")
                return None
            name = argv[0]
            if name not in commands:
                close = difflib.get_close_matches(name, names, n=2)
                hint = f"; did you mean {' or '.join(close)}?" if close else ""
                raise OptionError(f"unknown command {name!r}{hint} (commands: {', '.join(names)})")
            rest = argv[1:]
            full = f"{prog} {name}"
        else:
            name, rest, full = default, argv, prog
        cls, fn, summary = commands[name]
        parsed = parse_argv(cls, rest, full, unknown=extra_fields)
        if parsed.help:
            sys.stdout.write(format_help(cls, full, summary, help_sections(name) if help_sections else None))
            if help_extra is not None:
                sys.stdout.write(help_extra(name, parsed))
            return None
        if prepare is not None:
            prepare(name, parsed)
        # fire dispatches; every value was checked above, so fire parses nothing on its own
        component = {name: lambda: fn(parsed)}
        return fire.Fire(component, command=[name], name=prog)
    except BrokenPipeError:
        # `irepa-cache inspect STORE | head`: the reader went away; exit quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        sys.exit(0)
    except Exception as err:  # noqa: BLE001 - user errors become one line, the rest propagates
        known = isinstance(err, (OptionError, ValueError, FileNotFoundError, FileExistsError)) or (
            user_errors is not None and isinstance(err, user_errors()))
        if os.environ.get("IREPA_DEBUG") or not known:
            raise
        print(f"{prog}: error: {one_line_error(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if os.environ.get("IREPA_DEBUG"):
            raise
        print(f"\n{prog}: interrupted; finished shards and checkpoints are kept: rerun the same command to resume",
              file=sys.stderr)
        sys.exit(130)
