"""The flows' Run forms (flows/forms.py): what a deployment stores as its parameter schema (every field described,
with what is allowed and its default; the shipped sweeps a choice; optional numbers a plain box, not an ``anyOf``
toggle, with no default, so the V1 UI leaves an empty one out instead of sending null), and the flow's own check of
its parameters (one line per bad field: the field, the value, what is allowed), which runs before any work."""

from __future__ import annotations

import pytest

from flows import rpg_flows
from flows.forms import ParameterError, check, check_gpus, parameter_schema, shipped

pytestmark = pytest.mark.unit

FLOWS = [rpg_flows.sweep, rpg_flows.tune, rpg_flows.train, rpg_flows.evaluate, rpg_flows.nightly_eval]


@pytest.mark.parametrize("flow", FLOWS, ids=lambda f: f.name)
def test_every_field_has_its_description_allowed_values_and_default(flow):
    schema = parameter_schema(flow)
    for name, prop in schema.properties.items():
        text = prop.get("description") or ""
        assert text, f"{flow.name}.{name}: no description"
        assert "<" not in text, f"{flow.name}.{name}: the UI renders descriptions as markdown (drops <...>)"
        param = flow.fn.form_params[name]
        if not param.required:
            assert "Default: " in text, f"{flow.name}.{name}"
        if "minimum" in prop or "enum" in prop or "pattern" in prop:
            assert "Allowed: " in text, f"{flow.name}.{name}"
        assert "anyOf" not in prop, f"{flow.name}.{name}: a type toggle in the form"
        if param.nullable:
            assert "default" not in prop, f"{flow.name}.{name}: the UI would send null for an empty field"


def test_ranges_and_choices_are_in_the_schema():
    props = parameter_schema(rpg_flows.sweep).properties
    assert props["concurrency"]["type"] == "integer" and (props["concurrency"]["minimum"], props["concurrency"]["maximum"]) == (1, 1024)
    assert "Allowed: an integer from 1 to 1024, or empty" in props["concurrency"]["description"]
    assert props["seeds"]["type"] == "array" and props["seeds"]["items"] == {"type": "integer"}
    assert props["sweep"]["enum"] == list(shipped()) and "smoke" in props["sweep"]["enum"]
    assert not any(n.startswith("tune_") for n in props["sweep"]["enum"])
    assert props["sweep_file"]["default"] == ""
    assert "pattern" in props["gpus"] and "Allowed: cpu, empty, or CUDA device indices" in props["gpus"]["description"]
    study = parameter_schema(rpg_flows.tune).properties["study"]
    assert study["enum"] == list(shipped(studies=True)) and all(n.startswith("tune_") for n in study["enum"])


def test_deployment_names_are_the_flow_names():
    from flows.deploy import FLOWS as POOL
    from flows.serve import deployments

    assert {d.name: d.flow_name for d in deployments()} == {f.name: f.name for f in FLOWS}
    assert {fn: name for fn, (name, _) in POOL.items()} == {f.name: f.name for f in FLOWS}
    served = {d.name: d for d in deployments()}
    assert "default" not in served["sweep"]._parameter_openapi_schema.properties["concurrency"]


@pytest.mark.parametrize(("flow", "bad", "message"), [
    (rpg_flows.sweep, {"concurrency": 0}, "concurrency=0: input should be greater than or equal to 1; allowed: an integer from 1 to 1024, or empty"),
    (rpg_flows.sweep, {"gpus": "a,b"}, "gpus='a,b': not allowed; allowed: cpu, empty, or CUDA device indices like 0,1,2,3"),
    (rpg_flows.sweep, {"force": "maybe"}, "force='maybe': input should be a valid boolean, unable to interpret input; allowed: true or false"),
    (rpg_flows.sweep, {"sweep": "nope"}, "sweep='nope': input should be"),
    (rpg_flows.sweep, {"seeds": [1, "x"]}, "seeds[1]='x': input should be a valid integer"),
    (rpg_flows.tune, {"trials": 0}, "trials=0: input should be greater than or equal to 1; allowed: an integer from 1 to 10000, or empty"),
    (rpg_flows.train, {"retries": 11}, "retries=11: input should be less than or equal to 10; allowed: an integer from 0 to 10"),
    (rpg_flows.evaluate, {"benchmarks": []}, "benchmarks=[]: list should have at least 1 item"),
    (rpg_flows.nightly_eval, {"k": 0}, "k=0: input should be greater than or equal to 1; allowed: an integer from 1 to 1024"),
    (rpg_flows.nightly_eval, {"engine": "vlm"}, "engine='vlm': input should be 'prefix', 'hf' or 'vllm'; allowed: one of prefix, hf, vllm"),
])  # fmt: skip
def test_the_flow_refuses_a_bad_value_with_one_line(flow, bad, message):
    with pytest.raises(ParameterError) as e:
        check(flow.fn.form_params, bad)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_good_values_are_converted_as_prefect_would():
    out = check(rpg_flows.sweep.fn.form_params, {"concurrency": "3", "dispatch": "local", "seeds": None})
    assert out == {"concurrency": 3, "dispatch": rpg_flows.Dispatch.LOCAL, "seeds": None}


def test_a_bad_value_is_refused_before_any_work(tmp_path, monkeypatch):
    """Called as a Python function (what a flow run does, even with the form's validation off): refused before the
    sweep file is read or anything is written. The engine is not needed: the wrapper is Prefect's ``flow.fn``."""
    called = []
    monkeypatch.setattr("rpg_core.sweeps.load_sweep", lambda *a, **k: called.append(a))
    with pytest.raises(ParameterError, match=r"^concurrency=0: .*\ngpus='a,b': not allowed"):
        rpg_flows.sweep.fn(concurrency=0, gpus="a,b", workdir=str(tmp_path))
    assert not called and not list(tmp_path.iterdir())


def test_a_gpu_this_machine_lacks_is_refused(monkeypatch):
    monkeypatch.setenv("RPG_GPUS", "0,1")
    check_gpus("0,1")
    check_gpus("cpu")
    check_gpus("")
    with pytest.raises(ParameterError, match=r"gpus='1,2': GPU 2 does not exist on .* \(its GPUs: 0,1\); allowed: cpu, "
                                             r"empty \(this machine's GPUs\) or some of 0,1"):  # fmt: skip
        check_gpus("1,2")
