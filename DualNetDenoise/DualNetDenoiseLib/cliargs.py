"""Command-line parsing driven by a Slicer CLI XML description, so the two cannot drift.

Slicer builds a Python CLI module's command line from its XML: flagged parameters first
(``--longflag value``; a true ``<boolean>`` as a bare ``--flag``, a false one omitted), then the
``<index>``-ed parameters in index order. :func:`parse_cli_args` parses exactly that, and also
``--flag true`` / ``--flag=false`` for people typing commands by hand. Because Slicer omits
false booleans, every ``<boolean>`` must default to false (checked by :func:`load_spec`).

:func:`slicer_command_line` builds the list Slicer would pass, for tests and scripts.
Progress is reported on stdout with the ``<filter-start>`` / ``<filter-progress>`` /
``<filter-end>`` tags Slicer reads (:class:`FilterProgress`).
"""

from __future__ import annotations

import argparse
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

_SCALAR_TYPES = {"integer": int, "float": float, "double": float, "string": str}
_PATH_TYPES = ("image", "file", "directory", "table", "geometry", "transform", "point", "region", "measurement")
_ENUM_TYPES = {"string-enumeration": str, "integer-enumeration": int, "float-enumeration": float, "double-enumeration": float}
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@dataclass
class Param:
    """One ``<parameters>`` child of the XML."""

    name: str
    kind: str  # XML tag: integer, float, boolean, string-enumeration, image, file, ...
    channel: str = "input"
    flag: Optional[str] = None
    longflag: Optional[str] = None
    index: Optional[int] = None
    default: Any = None
    label: str = ""
    description: str = ""
    choices: List[Any] = field(default_factory=list)
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    attributes: Dict[str, str] = field(default_factory=dict)

    @property
    def option(self) -> Optional[str]:
        """The option Slicer passes (``--longflag`` preferred, else ``-f``)."""
        if self.longflag:
            return "--" + self.longflag.lstrip("-")
        if self.flag:
            return "-" + self.flag.lstrip("-")
        return None


@dataclass
class CliSpec:
    title: str
    category: str
    params: List[Param]

    def by_name(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)


def _text(el, tag, default=None):
    child = el.find(tag)
    return child.text.strip() if child is not None and child.text is not None else default


def _convert(kind: str, text: Optional[str]):
    if text is None:
        return None
    if kind == "boolean":
        return text.strip().lower() in _TRUE
    if kind in _SCALAR_TYPES:
        return _SCALAR_TYPES[kind](text)
    if kind in _ENUM_TYPES:
        return _ENUM_TYPES[kind](text)
    return text


def load_spec(xml_path) -> CliSpec:
    """Read a Slicer CLI XML file into a :class:`CliSpec`.

    Raises:
        ValueError: a parameter without a flag or index, duplicated options or indices, a true
            default on a boolean, or a default outside its enumeration or constraints.
    """
    root = ET.parse(str(xml_path)).getroot()
    if root.tag != "executable":
        raise ValueError(f"{xml_path}: root element is <{root.tag}>, expected <executable>")
    params: List[Param] = []
    for group in root.findall("parameters"):
        for el in group:
            if el.tag in ("label", "description"):
                continue
            kind = el.tag
            name = _text(el, "name")
            if not name:
                raise ValueError(f"{xml_path}: <{kind}> without <name>")
            index = _text(el, "index")
            p = Param(
                name=name,
                kind=kind,
                channel=_text(el, "channel", "input"),
                flag=_text(el, "flag"),
                longflag=_text(el, "longflag"),
                index=int(index) if index is not None else None,
                default=_convert(kind, _text(el, "default")),
                label=_text(el, "label", name),
                description=_text(el, "description", ""),
                choices=[_convert(kind, e.text) for e in el.findall("element")],
                attributes=dict(el.attrib),
            )
            cons = el.find("constraints")
            if cons is not None:
                lo, hi = _text(cons, "minimum"), _text(cons, "maximum")
                p.minimum = float(lo) if lo is not None else None
                p.maximum = float(hi) if hi is not None else None
            simple_output = p.channel == "output" and kind in _SCALAR_TYPES
            if p.index is None and p.option is None and not simple_output:
                raise ValueError(f"{xml_path}: parameter '{name}' has neither <index> nor <flag>/<longflag>")
            if kind == "boolean" and p.default:
                raise ValueError(f"{xml_path}: boolean '{name}' defaults to true; Slicer omits false booleans, "
                                 "so a true default could never be turned off")
            if p.choices and p.default is not None and p.default not in p.choices:
                raise ValueError(f"{xml_path}: default '{p.default}' of '{name}' is not one of {p.choices}")
            if isinstance(p.default, (int, float)) and not isinstance(p.default, bool):
                if (p.minimum is not None and p.default < p.minimum) or (p.maximum is not None and p.default > p.maximum):
                    raise ValueError(f"{xml_path}: default {p.default} of '{name}' outside [{p.minimum}, {p.maximum}]")
            params.append(p)
    opts = [p.option for p in params if p.option]
    if len(set(opts)) != len(opts):
        raise ValueError(f"{xml_path}: duplicated flags {opts}")
    idx = sorted(p.index for p in params if p.index is not None)
    if idx != list(range(len(idx))):
        raise ValueError(f"{xml_path}: indices must be 0..n-1, got {idx}")
    return CliSpec(_text(root, "title", ""), _text(root, "category", ""), params)


def _normalise_booleans(spec: CliSpec, argv: Sequence[str]) -> List[str]:
    """Turn ``--flag true|false`` and ``--flag=...`` into a bare flag or nothing."""
    bool_opts = {p.option for p in spec.params if p.kind == "boolean" and p.option}
    out: List[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        opt, eq, val = tok.partition("=")
        if opt in bool_opts:
            if eq:
                value = val
            elif i + 1 < len(argv) and argv[i + 1].strip().lower() in _TRUE + _FALSE:
                value = argv[i + 1]
                i += 1
            else:
                value = "true"
            v = value.strip().lower()
            if v in _TRUE:
                out.append(opt)
            elif v not in _FALSE:
                raise SystemExit(f"error: {opt} takes no value or one of true/false, got '{value}'")
        else:
            out.append(tok)
        i += 1
    return out


def build_parser(spec: CliSpec, prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=spec.title)
    for p in sorted([p for p in spec.params if p.index is not None], key=lambda p: p.index):
        parser.add_argument(p.name, help=p.description or p.label)
    for p in spec.params:
        if p.index is not None or p.option is None:
            continue  # indexed (added above) or a simple output written to the return-parameter file
        names = [p.option]
        if p.flag and p.longflag:
            names = ["-" + p.flag.lstrip("-"), "--" + p.longflag.lstrip("-")]
        if p.kind == "boolean":
            parser.add_argument(*names, dest=p.name, action="store_true", help=p.description or p.label)
            continue
        typ = _SCALAR_TYPES.get(p.kind) or _ENUM_TYPES.get(p.kind) or str
        kwargs: Dict[str, Any] = dict(dest=p.name, type=typ, default=p.default, help=p.description or p.label)
        if p.choices:
            kwargs["choices"] = p.choices
        parser.add_argument(*names, **kwargs)
    parser.add_argument("--returnparameterfile", dest="returnparameterfile", default=None, help=argparse.SUPPRESS)
    return parser


def parse_cli_args(xml_path, argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) against the CLI XML at ``xml_path``.

    ``--xml`` prints the XML and exits 0 (how Slicer asks a CLI for its description).
    Range constraints of numeric parameters are enforced.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--xml"]:
        sys.stdout.write(Path(xml_path).read_text(encoding="utf-8"))
        raise SystemExit(0)
    spec = load_spec(xml_path)
    parser = build_parser(spec, prog)
    ns = parser.parse_args(_normalise_booleans(spec, argv))
    for p in spec.params:
        value = getattr(ns, p.name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (p.minimum is not None and value < p.minimum) or (p.maximum is not None and value > p.maximum):
                parser.error(f"{p.option or p.name} {value} outside [{p.minimum}, {p.maximum}]")
    return ns


def slicer_command_line(xml_path, values: Dict[str, Any], return_parameter_file: Optional[str] = None) -> List[str]:
    """The argument list Slicer builds for ``values`` (flagged first, then indexed; bare booleans).

    ``return_parameter_file`` is passed as ``--returnparameterfile`` when the XML has simple
    (non-file) output parameters, as Slicer does.
    """
    spec = load_spec(xml_path)
    args: List[str] = []
    if return_parameter_file and any(p.channel == "output" and p.kind in _SCALAR_TYPES for p in spec.params):
        args += ["--returnparameterfile", str(return_parameter_file)]
    for p in spec.params:
        if p.index is not None or p.option is None or p.name not in values or values[p.name] is None:
            continue
        v = values[p.name]
        if p.kind == "boolean":
            if v:
                args.append(p.option)
            continue
        args += [p.option, str(v)]
    for p in sorted([p for p in spec.params if p.index is not None], key=lambda p: p.index):
        if p.name in values and values[p.name] is not None:
            args.append(str(values[p.name]))
    return args


def write_return_parameters(path, values: Dict[str, Any]) -> None:
    """Write simple output parameters as ``name = value`` lines (Slicer's return-parameter file)."""
    if not path:
        return
    with open(path, "w", encoding="utf-8") as fh:
        for name, value in values.items():
            fh.write(f"{name} = {value}\n")


class FilterProgress:
    """Progress tags Slicer's CLI runner reads from stdout."""

    def __init__(self, name: str, comment: str = "", stream=None) -> None:
        self.name = name
        self.comment = comment
        self.stream = stream or sys.stdout
        self._t0 = time.time()
        self._last = -1.0

    def _w(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def start(self) -> None:
        self._t0 = time.time()
        self._w(f"<filter-start><filter-name>{self.name}</filter-name>"
                f"<filter-comment>{self.comment}</filter-comment></filter-start>")

    def __call__(self, fraction: float, message: str = "") -> None:
        f = min(max(float(fraction), 0.0), 1.0)
        if f - self._last >= 0.01 or f >= 1.0:  # at most ~100 lines
            self._last = f
            self._w(f"<filter-progress>{f:.4f}</filter-progress>")

    def end(self) -> None:
        self._w(f"<filter-end><filter-name>{self.name}</filter-name>"
                f"<filter-time>{time.time() - self._t0:.2f}</filter-time></filter-end>")


def check_output_volume(output, input_volume):
    """``dualnet.io.check_output_path`` for a CLI module's output volume, in Slicer's terms: Slicer names
    its temporary files by node, so choosing the input node as the output gives the input's own path."""
    from dualnet.errors import InputError
    from dualnet.io import check_output_path, same_path

    if same_path(output, input_volume):
        raise InputError("the output volume is the input volume: choose another or a new output volume node "
                         "(the input is never overwritten)")
    return check_output_path(output, [input_volume])


def run_cli_module(args: argparse.Namespace, prog: str, title: str, body, comment: str = "") -> int:
    """The frame every DualNet CLI module runs in; returns the exit code.

    ``args`` come from :func:`parse_cli_args` on the module's XML. Prints ``<filter-start>``,
    calls ``body(args, progress)``, then ``<filter-progress>1`` and ``<filter-end>``. A
    ``DualNetError`` (bad input, model, config) prints one line ``PROG: message`` on stderr and
    returns 1 without the end tags.
    """
    from dualnet.errors import DualNetError

    progress = FilterProgress(title, comment)
    progress.start()
    try:
        body(args, progress)
    except DualNetError as err:
        print(f"{prog}: {err}", file=sys.stderr, flush=True)
        return 1
    progress(1.0)
    progress.end()
    return 0
