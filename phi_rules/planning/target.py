"""The transformers side: build the target config from keyword arguments, and check a plan
against the architecture's real parameter set built on the ``meta`` device (no memory, no init).
"""

from __future__ import annotations

import inspect
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from phi_rules.errors import Diagnostic, PhiRulesError, did_you_mean
from phi_rules.language.checker import Where
from phi_rules.planning.planner import SHOW, Plan

ROPE_KEYS = ("partial_rotary_factor", "rope_theta")  # keyword arguments that land in rope_parameters


def model_class(architecture: str) -> Any:
    """The model class, found through transformers' own name tables: importing its modeling module only,
    not the lazy top-level attribute that first scans every model's import structure (seconds)."""
    import importlib

    import transformers
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    names: set[str] = set()
    for table in (getattr(modeling_auto, n) for n in dir(modeling_auto) if n.endswith("_MAPPING_NAMES")):
        for model_type, classes in table.items():
            found = classes if isinstance(classes, tuple | list) else (classes,)
            names.update(found)
            if architecture in found:
                module = importlib.import_module(f"transformers.models.{model_type_to_module_name(model_type)}")
                cls = getattr(module, architecture, None)
                if cls is not None and hasattr(cls, "config_class"):
                    return cls
    raise PhiRulesError(
        f"transformers {transformers.__version__} has no model class {architecture!r}"
        + did_you_mean(architecture, names)
    )


def _known_fields(config_cls: Any) -> set[str]:
    known = set(inspect.signature(config_cls.__init__).parameters) - {"self", "kwargs"}
    known |= set(config_cls().to_dict())
    if "rope_parameters" in known:
        known |= set(ROPE_KEYS)
    return known


def read_by_code(source: str) -> set[str]:
    """Fields modeling code reads where its config class may declare none (Phi3's ``head_dim``): the config
    keeps them, and the model computes with them."""
    return set(re.findall(r'getattr\(config, "(\w+)"', source))


def _read_by_model(model_cls: Any) -> set[str]:
    return read_by_code(inspect.getsource(sys.modules[model_cls.__module__]))


def where(plan: Plan, key: str) -> Where:
    """Where a config value was written (a --set or copied value: the target section)."""
    w = plan.rules.target.config_where.get(key)
    return w or Where(
        plan.rules.where_target.file,
        plan.rules.where_target.line,
        plan.rules.where_target.column,
        f"target/config/{key}",
    )


def saved_value(saved: Mapping[str, Any], key: str) -> Any:
    """A config value as written to config.json, looking inside ``rope_parameters`` where it moved."""
    if key in saved:
        return saved[key]
    return (saved.get("rope_parameters") or {}).get(key, saved.get(key))


def build_config(plan: Plan, dtype: str | None) -> Any:
    """The config object from keyword arguments only (setting attributes later can miss derived fields); for a
    remote-code target, the values themselves, as config.json will hold them."""
    if plan.rules.target.remote_code:
        values = {k: v for k, v in plan.config.items() if v is not None}
        dtype_field = {"torch_dtype": dtype} if dtype else {}
        return {**values, "architectures": [plan.rules.target.architecture], **dtype_field}
    model_cls = model_class(plan.rules.target.architecture)
    cls = model_cls.config_class
    w = plan.rules.where_target
    known = _known_fields(cls) | _read_by_model(model_cls)
    unknown = sorted(set(plan.config) - known)
    fields = known | set(plan.rules.source.config_defaults)
    if unknown:
        raise PhiRulesError(
            Diagnostic(
                f"--set {k}: neither a source field this rule reads nor a {cls.__name__} field"
                + did_you_mean(k, fields),
                code="set",
            )
            if k in plan.overridden
            else where(plan, k).error(f"{cls.__name__} has no field {k!r}{did_you_mean(k, known)}", "target")
            for k in unknown
        )
    defaults = cls().to_dict() if plan.overridden else {}
    mistyped = [
        f"--set {k}={plan.config[k]}: {cls.__name__}'s {k} is a number (default {saved_value(defaults, k)!r})"
        for k in plan.overridden
        if isinstance(saved_value(defaults, k), int | float)
        and not isinstance(saved_value(defaults, k), bool)
        and not isinstance(plan.config[k], int | float)
    ]
    if mistyped:
        raise PhiRulesError([Diagnostic(m, code="set") for m in mistyped])
    kwargs: dict[str, object] = {k: v for k, v in plan.config.items() if v is not None}  # null: the class default
    if dtype:
        kwargs.setdefault("dtype", dtype)
    kwargs.setdefault("architectures", [plan.rules.target.architecture])
    try:
        return cls(**kwargs)
    except Exception as exc:  # transformers' (strict) validation raises several types; each is a bad value
        reason = " ".join(str(exc).split())
        raise PhiRulesError([w.error(f"{cls.__name__} rejected the config: {reason}", "target")]) from None


@dataclass(frozen=True)
class Expected:
    """What the architecture built from the config loads and uses."""

    shapes: dict[str, tuple[int, ...]]  # parameter names and shapes
    tied: set[str]  # tied copies: in the files (legacy checkpoints store the head) or not (transformers omits it)
    uses: list[Diagnostic]  # values the model would use other than the source means (``target.uses``)


def expected_parameters(plan: Plan, config: Any) -> Expected:
    """What the architecture loads and uses, built from the config on the ``meta`` device."""
    cls = model_class(plan.rules.target.architecture)
    try:
        with torch.device("meta"):
            model = cls(config)
    except Exception as exc:  # sizes torch cannot allocate even on meta, values the modeling code rejects
        reason = " ".join(str(exc).split())[:200]
        problem = plan.rules.where_target.error(f"{cls.__name__} cannot be built from the config: {reason}")
        raise PhiRulesError([problem]) from None
    uses = [
        plan.rules.target.uses_where[name].error(
            f"{cls.__name__} would use {name} = {got!r} where the source means {want!r}: the config cannot "
            "carry it exactly (a value transformers derives, e.g. int(head_dim * partial_rotary_factor)); not "
            "converted",
            "refused",
        )
        for name, want in plan.uses.items()
        if (got := _attribute(model, name)) != want
    ]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied: set[str] = set()
    if getattr(config, "tie_word_embeddings", False):
        keys = getattr(model, "_tied_weights_keys", None) or {}
        tied = {k for k in (keys if isinstance(keys, dict | list) else []) if k in shapes}
    return Expected(shapes, tied, uses)


def _attribute(model: Any, path: str) -> Any:
    """``model.layers.0.self_attn.rotary_ndims``: attributes, and list indices where a part is a number."""
    found = model
    for part in path.split("."):
        index = int(part) if part.isdigit() else None  # a model with fewer layers than the path names: none
        found = getattr(found, part, None) if index is None else found[index] if index < len(found) else None
        if found is None:
            return None
    return found


def expected_adapter_parameters(plan: Plan, config: Any) -> dict[str, tuple[int, ...]]:
    """Names and shapes PEFT saves for the converted adapter_config.json on the target class (on ``meta``)."""
    try:
        import peft
    except ImportError:
        raise PhiRulesError(
            "converting adapters needs PEFT, which is not installed: pip install 'phi-rules[peft]'"
        ) from None
    cls = model_class(plan.rules.target.architecture)
    fields = peft.LoraConfig.__dataclass_fields__
    ignored = ("peft_type", "base_model_name_or_path")  # the base's name changes no shape (PEFT warns about it)
    settings: dict[str, Any] = {
        k: v for k, v in (plan.adapter_config or {}).items() if k in fields and k not in ignored
    }
    try:
        lora = peft.LoraConfig(**settings)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' deprecation notices, raised by PEFT's own calls
            wrapped = peft.get_peft_model(cls(config), lora)
        state = peft.get_peft_model_state_dict(wrapped)
    except Exception as exc:  # PEFT rejects settings, or finds none of the target modules
        reason = " ".join(str(exc).split())[:300]
        raise PhiRulesError(
            [plan.rules.where_target.error(f"PEFT cannot apply the converted adapter: {reason}")]
        ) from None
    return {k: tuple(v.shape) for k, v in state.items()}


def _listing(names: list[str]) -> str:
    more = f" and {len(names) - SHOW} more" if len(names) > SHOW else ""
    return ", ".join(names[:SHOW]) + more


def already_converted(plan: Plan, expected: Mapping[str, tuple[int, ...]]) -> Diagnostic | None:
    """Say so plainly when the source already uses the target's names (today's hub ``main`` branches)."""
    same = [n for n in plan.source_names if n in expected]
    if not same or len(same) < len(plan.source_names):  # the 4.36 layout shares most names, but not q/k/v
        return None
    return plan.rules.where_target.error(
        f"the source is already in transformers' {plan.rules.target.architecture} layout ({len(same)} of "
        f"{len(plan.source_names)} source tensor names are its parameter names): it needs no conversion; load it "
        "with from_pretrained directly (the hub's main branches now hold converted weights: pin the revision "
        "that holds the original layout)",
        "target",
    )


def check_against_target(
    plan: Plan, expected: Mapping[str, tuple[int, ...]], optional: set[str] | frozenset[str] = frozenset()
) -> list[Diagnostic]:
    """Missing, unexpected and wrongly shaped parameters of the plan against the real model; ``optional``
    ones (tied copies) may be missing."""
    arch = plan.rules.target.architecture
    w = plan.rules.where_target
    planned = {t.name: t.shape for t in plan.tensors}
    problems = []
    missing = [k for k in expected if k not in planned and k not in optional]
    if missing:
        problems.append(
            w.error(f"{arch} expects {len(missing)} parameter(s) the plan does not produce: {_listing(missing)}")
        )
    unexpected = [k for k in planned if k not in expected]
    if unexpected:
        problems.append(
            w.error(f"the plan produces {len(unexpected)} tensor(s) {arch} does not have: {_listing(unexpected)}")
        )
    wrong = [
        f"{k} {list(planned[k])} (expected {list(s)})" for k, s in expected.items() if k in planned and planned[k] != s
    ]
    if wrong:
        problems.append(w.error(f"{len(wrong)} tensor(s) have the wrong shape for {arch}: {_listing(wrong)}"))
    return problems
