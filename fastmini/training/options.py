"""Command-line options described once, by a dataclass: --help, YAML/JSON config files, precedence.

A trainer's config is a dataclass whose fields are declared with ``option(...)`` (default, help
text, group, parser, flag). ``Options(config_class, ...)`` turns it into an argparse parser
(``--help`` lists every field with its default), reads ``--config`` files or named recipes,
checks their values against the fields' types, and resolves the precedence: defaults <
presets (e.g. a task's recipe) < the config file < the command line. It knows nothing about
what the options mean: each trainer validates its own config.

Field metadata understood here: ``help``, ``group``, ``parse`` (text -> value, also applied to
each element of a list), ``flag``, ``metavar``, ``choices``, ``nargs`` ("+" for a list field,
"?" with ``const`` for an optional value) and ``coerce`` (a config-file value -> the field's value).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import field
from pathlib import Path
from typing import Any

from fastmini.training.errors import UsageError


# -> Any, as dataclasses.field is typed: the class body assigns the Field where it declares the value's type.
def option(default: Any, help: str, group: str, parse: Any = None, flag: str | None = None, **extra: Any) -> Any:
    """A dataclass field that also describes its command-line option (a list default is copied per instance)."""
    metadata = {"help": help, "group": group, "parse": parse, "flag": flag, **extra}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null", "") else int(text)


def optional_str(text: str) -> str | None:
    return None if text.lower() in ("none", "null", "") else text


def _default_of(spec: dataclasses.Field) -> Any:
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return None


def _is_list(spec: dataclasses.Field) -> bool:
    return spec.metadata.get("nargs") == "+"


def _is_bool(spec: dataclasses.Field) -> bool:
    return spec.type in (bool, "bool", "bool | None")


def expected_value(annotation: Any) -> str:
    """What a field of type ``annotation`` accepts, in words ("an integer or 'none'"), for messages."""
    element = str(annotation).removeprefix("list[").removesuffix("]")
    base = element.split("|")[0].strip()
    kind = {"int": "an integer", "float": "a number", "str": "text"}.get(base, "a value")
    return f"{kind} or 'none'" if "None" in element else kind


def readable_parser(parse: Callable[[str], Any], expected: str) -> Callable[[str], Any]:
    """``parse`` whose failure argparse reports as "expected <expected>, got 'text'" (not "invalid
    optional_int value")."""

    def parse_option(text: str) -> Any:
        try:
            return parse(text)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from error

    parse_option.__name__ = getattr(parse, "__name__", "value")
    return parse_option


def _same_value(saved: Any, current: Any, is_path: bool) -> bool:
    if saved == current:
        return True
    if is_path and isinstance(saved, str) and isinstance(current, str):
        return Path(saved).expanduser().resolve() == Path(current).expanduser().resolve()
    return False


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return " ".join(str(item) for item in value)
    return str(value)


class Options:
    """The option machinery of one trainer (see the module docstring)."""

    def __init__(
        self,
        config_class: type,
        *,
        prog: str,
        usage: str,
        description: str,
        epilog: str,
        groups: Mapping[str, str],
        recipes: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        self.config_class = config_class
        self.prog, self.usage, self.description, self.epilog = prog, usage, description, epilog
        self.groups = dict(groups)
        self.recipes = dict(recipes or {})
        self.fields = {spec.name: spec for spec in dataclasses.fields(config_class)}
        self.saved_options_path: Path | None = None  # the file saved_options last read in this resolve()

    def flag_of(self, name: str) -> str:
        return self.fields[name].metadata.get("flag") or "--" + name.replace("_", "-")

    def default_of(self, name: str) -> Any:
        return _default_of(self.fields[name])

    def changed(
        self, saved: Mapping[str, Any], current: Mapping[str, Any], run_only: Collection[str], paths: Collection[str]
    ) -> list[str]:
        """ "--flag old -> new" for every option ``current`` gives otherwise than ``saved`` (a resumed run's
        record), ``run_only`` ones aside; options in ``paths`` name files, and the same file given by another
        path (relative, with ~) is the same option."""
        return [
            f"{self.flag_of(name)} {saved.get(name)!r} -> {value!r}"
            for name, value in current.items()
            if name not in run_only and not _same_value(saved.get(name), value, name in paths)
        ]

    # ------------------------------------------------------------------------------ parser
    def build_parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog=self.prog,
            usage=self.usage,
            description=self.description,
            epilog=self.epilog,
            argument_default=argparse.SUPPRESS,
        )
        recipes = f", or a built-in recipe ({', '.join(self.recipes)})" if self.recipes else ""
        parser.add_argument(
            "--config",
            metavar="FILE_OR_RECIPE" if self.recipes else "FILE",
            help=f"YAML or JSON file of options{recipes}",
        )
        parser.add_argument("--print-config", action="store_true", help="print the resolved options as JSON and exit")
        groups = {key: parser.add_argument_group(title) for key, title in self.groups.items()}
        for name, spec in self.fields.items():
            meta = spec.metadata
            help_text = meta["help"]
            if "(default:" not in help_text:
                help_text += f" (default: {_show(_default_of(spec))})"
            group = groups[meta["group"]]
            flag = self.flag_of(name)
            if _is_bool(spec) and meta.get("nargs") is None:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text, dest=name)
                continue
            annotation = str(spec.type)
            element = annotation.removeprefix("list[")
            metavar = "N" if element.startswith("int") else "X" if element.startswith("float") else "VALUE"
            kwargs: dict[str, Any] = {"help": help_text, "dest": name, "metavar": meta.get("metavar", metavar)}
            if meta.get("parse") is not None:
                kwargs["type"] = readable_parser(meta["parse"], expected_value(spec.type))
            if meta.get("nargs") is not None:
                kwargs["nargs"] = meta["nargs"]
            if "const" in meta:
                kwargs["const"] = meta["const"]
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
                kwargs.pop("metavar")
            group.add_argument(flag, **kwargs)
        return parser

    # ------------------------------------------------------------------------- config files
    def read_config_file(self, source: str) -> dict[str, Any]:
        """Options from a recipe name or a YAML/JSON file (keys with underscores or dashes)."""
        if source in self.recipes and not Path(source).exists():
            return dict(self.recipes[source])
        path = Path(source).expanduser()
        if not path.is_file():
            if self.recipes:
                raise UsageError(f"--config {source}: no such file, and not a recipe ({', '.join(self.recipes)})")
            raise UsageError(f"--config {source}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"--config {source}: cannot be read ({error})") from error
        is_json = path.suffix.lower() == ".json"
        try:
            if is_json:
                values = json.loads(text)
            else:
                import yaml

                values = yaml.safe_load(text)
        except json.JSONDecodeError as error:
            raise UsageError(f"--config {source}: not valid JSON at line {error.lineno}: {error.msg}") from error
        except Exception as error:  # yaml.YAMLError (its str() is a multi-line dump of the offending text)
            raise UsageError(f"--config {source}: not valid YAML{_yaml_problem(error)}") from error
        if values is None:
            return {}
        if not isinstance(values, dict):
            raise UsageError(
                f"--config {source}: expected a mapping of option names to values, got {type(values).__name__}"
            )
        return {str(key).replace("-", "_"): value for key, value in values.items()}

    def coerce(self, name: str, value: Any, source: str) -> Any:
        """A value from a config file (or a preset), checked against the field's type.

        Text is read by the field's own parser, as on the command line ('none' for an optional
        number, "5e-4" that YAML 1.1 leaves as a string)."""
        spec = self.fields[name]
        where = f"{source}: {name}"
        if spec.metadata.get("coerce") is not None and value is not None:
            return spec.metadata["coerce"](value)
        if value is None:
            if "None" in str(spec.type):
                return None
            raise UsageError(f"{where} must not be empty")
        if _is_list(spec):
            items = value if isinstance(value, list) else [value]
            if not items:
                raise UsageError(f"{where} must not be an empty list")
            return [self._scalar(spec, item, where) for item in items]
        if _is_bool(spec):
            if not isinstance(value, bool):
                raise UsageError(f"{where} must be true or false, got {value!r}")
            return value
        return self._scalar(spec, value, where)

    @staticmethod
    def _scalar(spec: dataclasses.Field, value: Any, where: str) -> Any:
        expected = expected_value(spec.type)
        if isinstance(value, (dict, list, bool)):
            raise UsageError(f"{where} has the wrong type ({type(value).__name__}: {value!r}); expected {expected}")
        annotation = str(spec.type).removeprefix("list[")
        parse = spec.metadata.get("parse")
        try:
            if isinstance(value, str) and parse is not None:
                return parse(value)
            if annotation.startswith("int"):
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                return int(value)
            if annotation.startswith("float"):
                return float(value)  # also reads "5e-4", which YAML 1.1 leaves as a string
        except (TypeError, ValueError) as error:
            raise UsageError(f"{where}: expected {expected}, got {value!r}") from error
        return str(value)

    def saved_options(self, path: Path) -> dict[str, Any]:
        """The options a run saved (its train_config.json or grid.json), as the defaults of the command that
        resumes it: that command repeats only --resume and the output directory, and what it may change (the
        trainer still refuses any other change). Empty when there is no such file: the trainer names what is
        missing when it looks for the checkpoint. A file that is there but damaged is a UsageError naming it: with
        the defaults instead, the resumed run would be refused for "changed" options nobody gave."""
        saved = read_saved_options(path)
        if saved is None:  # no such file: the trainer names what is missing
            return {}
        self.saved_options_path = path
        return {name: value for name, value in saved.items() if name in self.fields and name not in NOT_RESUMED}

    # ---------------------------------------------------------------------------- resolve
    def resolve(
        self,
        argv: list[str] | None,
        validate: Callable[[Any], None],
        presets: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> tuple[Any, bool]:
        """(config, print_config) from defaults < presets < --config < command line; exits on --help.

        ``presets(values)`` gets the values set by the file and the command line and returns
        defaults that depend on them (a task's recipe); they rank below both.
        """
        self.saved_options_path = None
        namespace = vars(self.build_parser().parse_args(argv))
        config_source = namespace.pop("config", None)
        print_config = namespace.pop("print_config", False)
        given: dict[str, Any] = {}
        if config_source is not None:
            for name, value in self.read_config_file(config_source).items():
                if name not in self.fields:
                    close = [f for f in self.fields if name in f or f in name]
                    hint = f" (did you mean {', '.join(close)}?)" if close else ""
                    raise UsageError(f"--config {config_source}: unknown option '{name}'{hint}")
                given[name] = self.coerce(name, value, f"--config {config_source}")
        given.update(namespace)
        values: dict[str, Any] = {}
        if presets is not None:
            for name, value in presets(given).items():
                values[name] = self.coerce(name, value, f"--resume {self.saved_options_path or 'presets'}")
        values.update(given)
        config = self.config_class(**values)
        validate(config)
        return config, print_config


def read_saved_options(path: Path) -> dict[str, Any] | None:
    """Every option a run saved in ``path`` (train_config.json, grid.json); None when there is no such file, one
    UsageError naming it when it is there but damaged."""

    def unreadable(problem: str) -> UsageError:
        return UsageError(
            f"--resume: {path} cannot be read as the run's options ({problem}); resume from another checkpoint, or "
            "start afresh with --overwrite-output-dir"
        )

    try:
        text = Path(path).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        raise unreadable(error.strerror or str(error)) from error
    try:
        saved = json.loads(text)
    except ValueError as error:
        raise unreadable(str(error)) from error
    if not isinstance(saved, dict):
        raise unreadable(f"a JSON {type(saved).__name__}, not an object of options")
    return saved


# What a resumed command does not take from the saved options: where it runs and how it treats that directory.
NOT_RESUMED = frozenset({"output_dir", "resume", "overwrite_output_dir"})


def _yaml_problem(error: Exception) -> str:
    """ " at line N: <problem>" of a YAML error (one line), or ": <its first line>"."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is not None and problem:
        return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return ": " + (str(error).strip().splitlines() or [type(error).__name__])[0]


def check_resume_or_overwrite(resuming: bool, overwrite_output_dir: bool) -> None:
    """Both trainers: --resume and --overwrite-output-dir contradict each other."""
    if resuming and overwrite_output_dir:
        raise UsageError(
            "--resume continues the run in --output-dir, --overwrite-output-dir discards it: give one of them"
        )


# What torch.manual_seed takes (it raises "Overflow when unpacking long long" beyond).
SEED_RANGE = (-(2**63), 2**64 - 1)


def check_seeds(*seeds: int) -> None:
    """Both trainers: every --seed within SEED_RANGE."""
    low, high = SEED_RANGE
    for seed in seeds:
        if not low <= seed <= high:
            raise UsageError(f"--seed must lie in [-2**63, 2**64 - 1] (torch.manual_seed's range), got {seed}")


# Options both trainers take with the same meaning, declared once.
def device_option() -> Any:
    return option(
        "auto", "'auto' (this process's GPU if any, else CPU), 'cpu', 'cuda' or 'cuda:N'", "run", metavar="DEVICE"
    )


def threads_option() -> Any:
    return option(None, "CPU threads for torch, >= 1 (default: torch's choice)", "run", parse=optional_int)


def compile_student_option() -> Any:
    return option(
        False,
        "compile the student's forward and backward with torch.compile (dynamic shapes: one compile, about a "
        "minute, serves every batch; inductor then fuses the elementwise work around the GEMMs); the same losses "
        "to rounding with hidden dropout off (with it on, inductor draws other masks). Not with "
        "--gradient-checkpointing",
        "run",
    )


def gradient_checkpointing_option() -> Any:
    return option(
        False,
        "recompute each recursion during backward instead of keeping its activations: far less memory for "
        "about one more forward of compute a step; the same losses and gradients",
        "run",
    )
