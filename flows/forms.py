"""The flows' Run forms, from their signatures: one ``Annotated[..., Field(...)]`` per parameter is the one source of
the form's help text, its allowed values, and the flow's own check of what it is given.

    @flow(name="sweep", validate_parameters=False)   # the @form check replaces Prefect's (our messages)
    @form
    def sweep(concurrency: Annotated[int | None, Field(ge=1, le=1024, description="runs at once; empty: ...")] = None):

``@form`` (under ``@flow``):

- writes each parameter's description, what is allowed (from the Field's constraints: ``ge``/``le``, ``pattern`` via an
  ``Allowed`` note, enum or Literal members, ``min_length``) and its default into a Google-style ``Args:`` section of
  the docstring, which is what Prefect reads into the deployment's parameter schema (it overrides the ``Field``
  descriptions of ``Annotated`` types with the docstring's, ``None`` without one: Prefect's ``process_v2_params``);
- gives optional numbers and lists (``int | None``) the plain type's JSON schema, so the form shows a number box (empty
  means the default, spelled out in the description) instead of an ``int | None`` type toggle;
- checks every value before the flow does anything, with one line per bad field naming the field, the value and what
  is allowed (``ParameterError``), also when the form's validation is switched off or a Python caller passes it.
"""

from __future__ import annotations

import enum
import functools
import inspect
import os
import shutil
import subprocess
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError, WithJsonSchema


class Allowed:
    """What a value may be, in words, for a constraint that reads badly as itself (a regex):
    ``Annotated[str, Field(pattern=...), Allowed("cpu, empty, or CUDA device indices like 0,1")]``."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"Allowed({self.text!r})"


class ParameterError(ValueError):
    """A flow's parameter that is not allowed: ``field=value: why; allowed: ...`` (one line per bad field)."""


# ---------------------------------------------------------------------------------------------------------------------
# The shipped sweeps and studies (the choices of the sweep and tune forms)

SWEEPS_DIR = Path(__file__).resolve().parents[1] / "sweeps"
STUDY_PREFIX = "tune_"


def shipped(studies: bool = False, folder: Path = SWEEPS_DIR) -> tuple[str, ...]:
    """The names (file stems) of the shipped sweeps in ``sweeps/`` (not the ``tune_*`` studies), or of the studies."""
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    return tuple(n for n in names if n.startswith(STUDY_PREFIX) == studies)


def choice(names: tuple[str, ...]) -> Any:
    """``Literal[names]``: a dropdown in the form, a plain string for Python callers."""
    return typing.Literal[names] if names else str  # type: ignore[valid-type]


def sweep_path(name: str, file: str = "", folder: str = "sweeps") -> str:
    """The file a form names: ``file`` when given (another file), else the shipped ``<folder>/<name>.yaml``."""
    return file.strip() or f"{folder}/{name}.yaml"


def run_name(name: Callable[[dict[str, Any]], str]) -> Callable[[], str]:
    """A ``flow_run_name`` from the flow run's parameters, ``name(parameters)``; the flow's name if that fails (a bad
    value is then refused by the flow itself, with its own message, not by the naming)."""

    def resolve() -> str:
        from prefect.runtime import flow_run

        try:
            return str(name(dict(flow_run.parameters or {})))[:200]
        except Exception:  # noqa: BLE001
            return str(flow_run.flow_name or "run")

    return resolve


# ---------------------------------------------------------------------------------------------------------------------
# This machine's GPUs (a value valid for the form may still name a GPU this machine lacks)


def machine_gpus() -> list[str] | None:
    """This machine's CUDA device indices: ``$RPG_GPUS`` (infra/team/worker.sh sets it from nvidia-smi), else
    ``nvidia-smi``'s; ``None`` when unknown (no ``$RPG_GPUS``, no nvidia-smi: a CPU machine, where CPU-only torch runs
    on the CPU whatever the device index says)."""
    env = os.environ.get("RPG_GPUS")
    if env is not None and env.strip():
        return [d.strip() for d in env.split(",") if d.strip()]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()]


def check_gpus(gpus: str, field: str = "gpus") -> None:
    """Refuse GPU indices this machine does not have (before any work), when its GPUs are known (``machine_gpus``)."""
    spec = gpus.strip()
    if not spec or spec.lower() == "cpu":
        return
    have = machine_gpus()
    if have is None:
        return
    named = [d.strip() for d in spec.split(",") if d.strip()]
    missing = [d for d in named if d not in have]
    if missing:
        from rpg_core.tracking import host_name

        there = ",".join(have) if have else "none"
        raise ParameterError(f"{field}={gpus!r}: GPU {missing[0]} does not exist on {host_name()} (its GPUs: {there}); "
                             f"allowed: cpu, empty (this machine's GPUs) or some of {there}")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# What a declaration allows, in words


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref:
        return {**defs[ref.rsplit("/", 1)[-1]], **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _split_null(schema: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The schema without its ``null`` branch, and whether it had one."""
    branches = schema.get("anyOf")
    if branches and any(b.get("type") == "null" for b in branches):
        rest = [b for b in branches if b.get("type") != "null"]
        if len(rest) == 1:
            return rest[0], True
        return {"anyOf": rest}, True
    return schema, False


def _range(schema: dict[str, Any], what: str) -> str:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    lo_x, hi_x = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if lo is not None and hi is not None:
        return f"{what} from {lo} to {hi}"
    parts = [f">= {lo}" if lo is not None else "", f"> {lo_x}" if lo_x is not None else "",
             f"<= {hi}" if hi is not None else "", f"< {hi_x}" if hi_x is not None else ""]  # fmt: skip
    said = " and ".join(p for p in parts if p)
    return f"{what} {said}" if said else what


def _allowed_of(schema: dict[str, Any], defs: dict[str, Any]) -> str | None:
    schema = _resolve(schema, defs)
    if "enum" in schema:
        return "one of " + ", ".join(map(str, schema["enum"]))
    kind = schema.get("type")
    if kind == "integer":
        return _range(schema, "an integer")
    if kind == "number":
        return _range(schema, "a number")
    if kind == "boolean":  # a checkbox: it cannot be wrong in the form (a Python caller: true or false)
        return None
    if kind == "string":
        if "pattern" in schema:
            return f"text matching {schema['pattern']}"
        n, m = schema.get("minLength"), schema.get("maxLength")
        return f"text of {n or 0} to {m} characters" if m else (f"text of at least {n} characters" if n else None)
    if kind == "array":
        items = _resolve(schema.get("items", {}), defs)
        n = schema.get("minItems") or 0
        if "enum" in items:
            return ("one or more of " if n >= 1 else "any of ") + ", ".join(map(str, items["enum"]))
        inner = _allowed_of(items, defs)
        listed = "a list" + (f" of {inner.removeprefix('an ').removeprefix('a ')}s" if inner else "")
        if items.get("type") == "string" and inner is None:
            listed = "a list of texts"
        return listed + (f" (at least {n})" if n else "")
    return None


def _default_text(default: Any) -> str:
    if default is None or default == "" or default == []:
        return "empty"
    if isinstance(default, enum.Enum):
        default = default.value
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, list | tuple):
        return ", ".join(str(d.value if isinstance(d, enum.Enum) else d) for d in default)
    return str(default)


class Param:
    """One parameter of a form: its declaration, what it allows in words, its description and default."""

    def __init__(self, name: str, hint: Any, default: Any):
        self.name, self.hint, self.default = name, hint, default
        self.required = default is inspect.Parameter.empty
        self.adapter = TypeAdapter(hint)
        full = self.adapter.json_schema(ref_template="#/$defs/{model}")
        defs = full.get("$defs", {})
        self.plain, self.nullable = _split_null({k: v for k, v in full.items() if k != "$defs"})
        note = next((m for m in _metadata(hint) if isinstance(m, Allowed)), None)
        allowed = note.text if note else _allowed_of(self.plain, defs)
        self.note = note
        self.boolean = self.plain.get("type") == "boolean"
        if allowed and self.nullable:
            allowed += ", or empty"
        self.allowed = allowed
        self.description = next((f.description for f in _metadata(hint) if getattr(f, "description", None)), "")
        self.defs = defs

    def help(self) -> str:
        """The form's help text: description, allowed values, default."""
        text = self.description.rstrip(".")
        if self.allowed:
            text += f". Allowed: {self.allowed}"
        if not self.required:
            text += f". Default: {_default_text(self.default)}"
        return text.lstrip(". ") + "."

    def form_hint(self) -> Any:
        """The annotation the schema is built from: an optional number or list gets its plain type's schema (no
        ``anyOf`` with ``null``: the form shows a number box, not a type toggle); validation is unchanged."""
        if self.nullable and "$ref" not in str(self.plain) and "anyOf" not in self.plain:
            return Annotated[self.hint, WithJsonSchema(self.plain)]
        return self.hint

    def check(self, value: Any) -> Any:
        """The value validated and converted (e.g. ``"3"`` -> 3, ``"auto"`` -> ``Dispatch.AUTO``), or ParameterError."""
        try:
            return self.adapter.validate_python(value)
        except ValidationError as e:
            err = e.errors()[0]
            why = err["msg"][0].lower() + err["msg"][1:]
            if err["type"] == "string_pattern_mismatch" and self.note:  # the regex says less than the note
                why = "not allowed"
            index = [x for x in err.get("loc", ()) if isinstance(x, int)]
            field = self.name + "".join(f"[{x}]" for x in index)
            if index:
                value = err.get("input", value)
            allowed = f"; allowed: {self.allowed or 'true or false'}" if self.allowed or self.boolean else ""
            raise ParameterError(f"{field}={value!r}: {why}{allowed}") from None


def _metadata(hint: Any) -> list[Any]:
    return list(getattr(hint, "__metadata__", ()))


def params_of(fn: Callable[..., Any]) -> dict[str, Param]:
    hints = typing.get_type_hints(fn, include_extras=True)
    sig = inspect.signature(fn)
    return {n: Param(n, hints.get(n, Any), p.default) for n, p in sig.parameters.items()}


def docstring(doc: str, params: dict[str, Param]) -> str:
    """``doc`` (its summary, any ``Args:`` section replaced) with an ``Args:`` section of every parameter's help."""
    summary = inspect.cleandoc(doc or "").split("\nArgs:")[0].rstrip()
    lines = [summary, "", "Args:"] + [f"    {p.name}: {p.help()}" for p in params.values()]
    return "\n".join(lines) + "\n"


def check(params: dict[str, Param], values: dict[str, Any]) -> dict[str, Any]:
    """Every value validated (see Param.check); all the bad ones in one ParameterError, one line each."""
    out, bad = {}, []
    for name, value in values.items():
        try:
            out[name] = params[name].check(value) if name in params else value
        except ParameterError as e:
            bad.append(str(e))
    if bad:
        raise ParameterError("\n".join(bad))
    return out


def form(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The decorator (under ``@flow(..., validate_parameters=False)``): see the module's docstring."""
    params = params_of(fn)
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        return fn(**check(params, dict(bound.arguments)))

    # What Prefect reads: the signature (through __wrapped__: the annotations, resolved) and the docstring
    fn.__annotations__ = {**{n: p.form_hint() for n, p in params.items()},
                          **({"return": fn.__annotations__["return"]} if "return" in fn.__annotations__ else {})}  # fmt: skip
    wrapper.__doc__ = docstring(fn.__doc__ or "", params)
    wrapper.form_params = params  # type: ignore[attr-defined]
    return wrapper


def form_schema(schema: Any, params: dict[str, Param]) -> Any:
    """A flow's parameter schema (Prefect's ``ParameterSchema``) as the Run form needs it: an optional field (``None``
    by default) has no ``default`` in it. The V1 UI fills a field from its default and sends ``null`` for an empty one,
    which the form's validation refuses for a plain type; with no default it leaves the field out (the flow's
    default: empty), and the server's own validation accepts ``null`` for it."""
    for name, p in params.items():
        if p.nullable and name in schema.properties:
            schema.properties[name].pop("default", None)
    return schema


def parameter_schema(flow: Any) -> Any:
    """What a deployment of ``flow`` stores as its ``parameter_openapi_schema`` (see ``to_deployment``)."""
    from prefect.utilities.callables import parameter_schema as prefect_schema

    return form_schema(prefect_schema(flow), flow.fn.form_params)


def to_deployment(flow: Any, **kwargs: Any) -> Any:
    """``flow.to_deployment(**kwargs)`` with the form's schema (``form_schema``)."""
    dep = flow.to_deployment(**kwargs)
    dep._parameter_openapi_schema = form_schema(dep._parameter_openapi_schema, flow.fn.form_params)
    return dep
