"""A strict parser of Prometheus text exposition format 0.0.4, for tests (prometheus_client
is not a dependency): every line must be a HELP, a TYPE or a sample; a family's HELP and TYPE
come once, before its samples; names and labels are legal; a family's samples are together;
counters end in _total. Raises AssertionError naming the line otherwise."""
from __future__ import annotations

import math
import re

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
_SAMPLE = re.compile(rf"^({_NAME})(\{{(?:{_LABEL})(?:,{_LABEL})*\}})? (\S+)$")
_LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"')
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], value)


def parse(text: str) -> dict[str, dict]:
    """name -> {"type", "help", "samples": {frozenset(labels.items()): float}}."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    families: dict[str, dict] = {}
    current = None
    closed: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        where = f"line {number}: {line!r}"
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert re.fullmatch(_NAME, name), where
            assert name not in families, f"second HELP for {name}: {where}"
            if current is not None:
                closed.add(current)
            families[name] = {"help": line.split(" ", 3)[3] if line.count(" ") >= 3 else "",
                              "type": None, "samples": {}}
            current = name
        elif line.startswith("# TYPE "):
            _, _, name, type_ = line.split(" ")
            assert name == current and families[name]["type"] is None, where
            assert type_ in _TYPES, where
            assert families[name]["samples"] == {}, f"TYPE after samples: {where}"
            families[name]["type"] = type_
        else:
            assert not line.startswith("#") and line.strip(), f"unexpected: {where}"
            match = _SAMPLE.match(line)
            assert match, f"not a sample: {where}"
            name, labels_text, value = match.groups()
            assert name == current, f"sample of {name} outside its family: {where}"
            assert name not in closed, where
            labels = frozenset((k, _unescape(v)) for k, v in
                               _LABEL_PAIR.findall(labels_text or ""))
            assert labels not in families[name]["samples"], f"duplicate sample: {where}"
            number_value = float(value)
            assert not math.isnan(number_value), where
            families[name]["samples"][labels] = number_value
    for name, family in families.items():
        assert family["type"] is not None, f"{name} has no TYPE"
        if family["type"] == "counter":
            assert name.endswith("_total"), f"counter {name} does not end in _total"
            assert all(v >= 0 for v in family["samples"].values()), name
    return families


def value(families: dict, metric: str, **labels) -> float:
    """The one sample of ``metric`` whose labels are exactly ``labels``."""
    key = frozenset((k, str(v)) for k, v in labels.items())
    assert metric in families, f"no metric {metric}"
    samples = families[metric]["samples"]
    assert key in samples, f"{metric}{dict(key)} not among {list(map(dict, samples))}"
    return samples[key]
