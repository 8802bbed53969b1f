"""A sweep's search space from YAML: dotted keys into the adapt config, each a distribution.

    train.lr: {loguniform: [1.0e-4, 1.0e-2]}
    delta: {choice: [{method: lora, rank: {choice: [4, 8, 16]}},
                     {method: adapter, bottleneck: {choice: [16, 64]}},
                     {method: bitfit}]}
    prompt.template: {choice: ["{text_a} It was {mask}.", "{text_a} All in all, {mask}."]}

Distributions: ``uniform``/``loguniform`` [lo, hi], ``int``/``logint`` [lo, hi] (both ends
included), ``choice`` [options]. A choice among mappings is a conditional space (delta type x its
size): each option replaces the whole section at its key and may hold distributions of its own.
Sampling is define-by-run (Optuna's model, Akiba et al. 2019): the same walk asks an Optuna trial
for each value, so a conditional parameter (``delta[lora].rank``) is only drawn on its branch, and
the walk replays the flat parameters of a finished trial into the nested overrides it stands for.
A nested mapping of sections (``train: {lr: ...}``) is read as the dotted keys it spells.

``validate`` refuses a bad space before any trial starts: unknown distributions and bad bounds by
shape, unknown keys by building the adapt config with each key (each option of a choice, lowest
and highest values) through the config's own loader, which names the key path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Protocol

from bmray.models.typed_config import ConfigError

DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint", "choice")


class Suggester(Protocol):
    """What the walk asks for each value: an optuna.Trial, or a replay of one's parameters."""

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...

    def suggest_int(self, name: str, low: int, high: int, *, log: bool = False) -> int: ...

    def suggest_categorical(self, name: str, choices: list) -> Any: ...


@dataclass(frozen=True)
class Dist:
    """One distribution at ``path`` (the Optuna parameter name)."""

    path: str
    kind: str
    args: tuple          # (lo, hi) or the options; a mapping option is a tuple of (key, node)
    labels: tuple = ()   # choice: what Optuna sees for each option (plain values or names)


@dataclass(frozen=True)
class Option:
    """A mapping option of a choice: constants and nested distributions, keyed by name."""

    items: tuple         # ((key, Dist | constant), ...)


class SearchSpace:
    """A parsed search space; ``sample`` draws (or replays) nested overrides."""

    def __init__(self, raw: Mapping[str, Any]):
        if not isinstance(raw, Mapping) or not raw:
            raise ConfigError(f"space: expected a mapping of dotted keys to distributions, "
                              f"got {raw!r}")
        self.raw = dict(raw)
        self.dists: tuple[Dist, ...] = tuple(_parse_section("", raw))

    # ------------------------------------------------------------------ sampling
    def sample(self, suggest: Suggester) -> dict[str, Any]:
        """Nested overrides ``{"train": {"lr": ...}, "delta": {...}}`` drawn through ``suggest``."""
        out: dict[str, Any] = {}
        for dist in self.dists:
            _set(out, dist.path, _draw(dist, suggest))
        return out

    def define_by_run(self, trial: Suggester) -> None:
        """Optuna's define-by-run function (the values Optuna records are the flat params)."""
        self.sample(trial)

    def resolve(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The nested overrides a trial's flat parameters stand for (replays ``sample``)."""
        return self.sample(Replay(params))

    # ------------------------------------------------------------------ validation
    def probes(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(key path, overrides) pairs covering every key, every option, both ends of ranges."""
        for dist in self.dists:
            for label, value in _corners(dist):
                overrides: dict[str, Any] = {}
                _set(overrides, dist.path, value)
                yield label, overrides

    def validate(self, base: Mapping[str, Any],
                 load_config: Callable[[dict[str, Any]], Any]) -> None:
        """Raise ConfigError (naming the space key) unless every probe builds a valid config."""
        for label, overrides in self.probes():
            try:
                load_config(merge(base, overrides))
            except ConfigError as exc:
                raise ConfigError(f"space.{label}: {exc}") from None


class Replay:
    """Answers the walk's questions from a finished trial's flat parameters."""

    def __init__(self, params: Mapping[str, Any]):
        self.params = params

    def _get(self, name: str) -> Any:
        if name not in self.params:
            raise KeyError(f"trial parameters lack {name!r} (have {sorted(self.params)})")
        return self.params[name]

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        return float(self._get(name))

    def suggest_int(self, name: str, low: int, high: int, *, log: bool = False) -> int:
        return int(self._get(name))

    def suggest_categorical(self, name: str, choices: list) -> Any:
        return self._get(name)


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` laid over it; a mapping under a ``choice`` key replaces the
    whole section (each option is a full section), other mappings merge key by key."""
    out = {k: v for k, v in base.items()}
    for key, value in overrides.items():
        if isinstance(value, Replace):
            out[key] = dict(value)
        elif isinstance(value, dict) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


class Replace(dict):
    """A section drawn from a choice among mappings: it replaces the base's section whole."""


# ---------------------------------------------------------------------- parsing
def _is_dist(node: Any) -> bool:
    return isinstance(node, Mapping) and len(node) == 1 and next(iter(node)) in DISTRIBUTIONS


def _parse_section(prefix: str, raw: Mapping[str, Any]) -> Iterator[Dist]:
    for key, node in raw.items():
        if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"space.{prefix}{key}: a key is a dotted path like train.lr")
        path = f"{prefix}{key}"
        if _is_dist(node):
            yield _parse_dist(path, node)
        elif isinstance(node, Mapping) and node and all(isinstance(v, Mapping)
                                                         for v in node.values()):
            yield from _parse_section(f"{path}.", node)
        elif isinstance(node, Mapping) and len(node) == 1:
            raise ConfigError(f"space.{path}: unknown distribution {next(iter(node))!r}; "
                              f"choose one of {list(DISTRIBUTIONS)}")
        else:
            raise ConfigError(f"space.{path}: expected a distribution such as "
                              f"{{loguniform: [1.0e-4, 1.0e-2]}} or {{choice: [...]}}, "
                              f"got {node!r}")


def _number(path: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            return float(value)          # PyYAML reads 1e-3 (no dot) as a string
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    return float(value)


def _parse_dist(path: str, node: Mapping[str, Any]) -> Dist:
    kind, args = next(iter(node.items()))
    where = f"space.{path}.{kind}"
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: expected a non-empty list of options, got {args!r}")
        options, labels = [], []
        for i, opt in enumerate(args):
            if isinstance(opt, Mapping) and not _is_dist(opt):
                items = tuple((k, _parse_dist(f"{path}[{_label(args, i)}].{k}", v)
                               if _is_dist(v) else v) for k, v in opt.items())
                options.append(Option(items))
            elif _is_dist(opt):
                raise ConfigError(f"{where}[{i}]: an option is a value or a section, "
                                  f"not a distribution")
            else:
                options.append(opt)
            labels.append(_label(args, i))
        if len(set(labels)) != len(labels):
            raise ConfigError(f"{where}: options repeat ({labels})")
        return Dist(path, kind, tuple(options), tuple(labels))
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"{where}: expected [low, high], got {args!r}")
    if kind in ("int", "logint"):
        lo, hi = args
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (lo, hi)):
            raise ConfigError(f"{where}: bounds must be integers, got {args!r}")
    else:
        lo, hi = (_number(where, v) for v in args)
    if not lo < hi and not (kind in ("int", "logint") and lo == hi):
        raise ConfigError(f"{where}: low must be below high, got {args!r}")
    if kind.startswith("log") and lo <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, got {args!r}")
    if not all(math.isfinite(v) for v in (lo, hi)):
        raise ConfigError(f"{where}: bounds must be finite, got {args!r}")
    return Dist(path, kind, (lo, hi))


def _label(options: list, i: int) -> Any:
    """What Optuna records for option ``i``: the value itself when it is a plain scalar, a
    mapping's ``method`` when unique among the options, else ``option<i>``."""
    opt = options[i]
    if opt is None or isinstance(opt, (bool, int, float, str)):
        return opt
    if isinstance(opt, Mapping) and isinstance(opt.get("method"), str):
        methods = [o.get("method") for o in options if isinstance(o, Mapping)]
        if methods.count(opt["method"]) == 1:
            return opt["method"]
    return f"option{i}"


# ---------------------------------------------------------------------- drawing
def _draw(dist: Dist, suggest: Suggester) -> Any:
    if dist.kind in ("uniform", "loguniform"):
        lo, hi = dist.args
        return suggest.suggest_float(dist.path, lo, hi, log=dist.kind == "loguniform")
    if dist.kind in ("int", "logint"):
        lo, hi = dist.args
        return suggest.suggest_int(dist.path, lo, hi, log=dist.kind == "logint")
    label = suggest.suggest_categorical(dist.path, list(dist.labels))
    if label not in dist.labels:
        raise KeyError(f"{dist.path}: {label!r} is not one of {list(dist.labels)}")
    return _option_value(dist.args[dist.labels.index(label)], lambda d: _draw(d, suggest))


def _option_value(option: Any, draw: Callable[[Dist], Any]) -> Any:
    if isinstance(option, Option):
        return Replace({k: draw(v) if isinstance(v, Dist) else v for k, v in option.items})
    return option


def _corners(dist: Dist) -> Iterator[tuple[str, Any]]:
    """Probe values for ``dist``: both ends of a range; every option of a choice, each nested
    distribution of a mapping option at its own ends (the others at their low end)."""
    if dist.kind != "choice":
        for v in dist.args:
            yield dist.path, v
        return
    for label, option in zip(dist.labels, dist.args):
        if not isinstance(option, Option):
            yield dist.path, option
            continue
        nested = [v for _, v in option.items if isinstance(v, Dist)]
        yield f"{dist.path}[{label}]", _option_value(option, _low)
        for inner in nested:
            for name, value in _corners(inner):
                yield name, _option_value(option, lambda d, i=inner, v=value:
                                          v if d is i else _low(d))


def _low(dist: Dist) -> Any:
    return next(_corners(dist))[1]


def _set(out: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node = out
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
