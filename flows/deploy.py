"""Register the flows as deployments on a Prefect process work pool (created if missing), for GPU machines that run
``prefect worker start`` (infra/team/worker.sh). The local stack uses ``flows.serve`` instead (no pool, no worker).

    python -m flows.deploy --pool gpu-pool [--cron "0 2 * * *"]

The deployments name their flows by module (``flows.rpg_flows.train``), with no code location: each worker imports
them from its own checkout or installed package, at any path (worker.sh puts its checkout first on ``PYTHONPATH``
and sets ``RPG_ROOT``). Two work queues split the work: ``gpu`` (``train``, ``evaluate``, ``nightly_eval``: a
machine's GPU worker takes at most one flow run per GPU) and ``control`` (``sweep``, ``tune``: a coordinator that only submits
and waits, taken by a control worker, so it never holds a GPU slot). A flow run whose worker is lost mid-run is marked
Crashed after SILENT_AFTER_S without a heartbeat (an automation made here), and its sweep submits it again.
"""

from __future__ import annotations

import argparse

from prefect.deployments.runner import EntrypointType
from prefect.schedules import Cron

GPU_QUEUE = "gpu"
CONTROL_QUEUE = "control"
# flow function -> (deployment name, work queue)
FLOWS = {
    "sweep": ("sweep", CONTROL_QUEUE),
    "tune": ("tune", CONTROL_QUEUE),
    "train": ("train", GPU_QUEUE),
    "evaluate": ("evaluate", GPU_QUEUE),
    "nightly_eval": ("nightly_eval", GPU_QUEUE),
}


def ensure_pool(pool: str) -> bool:
    """Create the process work pool ``pool`` if it is missing (with the process worker's default job template);
    returns whether it was created. An existing pool of another type is an error: its workers could not run these."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(pool)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
            return True
    if existing.type != "process":
        raise ValueError(f"--pool {pool}: an existing work pool of type {existing.type!r}; allowed: 'process'")
    return False


# A worker's machine lost mid-run (power, network, an OOM-killed worker) leaves its flow runs RUNNING forever: nothing
# is left to report their end. Prefect's answer (docs: "Detect and respond to zombie flows"): each flow run emits a
# heartbeat event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds, and an automation marks a run Crashed when
# SILENT_AFTER_S pass without one (3 missed beats). The sweep's dispatcher then submits it again. The heartbeat rate
# travels with the deployments (their job variables: any process worker that runs them sets it), and the automation
# watches only these deployments' runs: a flow run elsewhere beats at Prefect's default (180 s) and must not be judged.
HEARTBEAT_S = 30  # Prefect's minimum
SILENT_AFTER_S = 90


def crash_automation_name(pool: str) -> str:
    return f"rpg: crash {pool}'s flow runs whose heartbeats stop"


def ensure_crash_detection(pool: str, deployment_ids: list[str], silent_after_s: float = SILENT_AFTER_S) -> str:
    """Make the automation that marks a flow run of ``deployment_ids`` Crashed after ``silent_after_s`` without a
    heartbeat (idempotent: kept when it already watches these deployments, else replaced; returns its id). Workers
    starting together may both create it: each then deletes every one but the smallest id it sees, so the smallest
    of all survives alone."""
    from datetime import timedelta

    import httpx
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    name = crash_automation_name(pool)
    watched = sorted(f"prefect.deployment.{i}" for i in deployment_ids)
    trigger = EventTrigger(
        after={"prefect.flow-run.heartbeat"},
        expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},  # fmt: skip
        match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
        match_related=ResourceSpecification({"prefect.resource.role": "deployment", "prefect.resource.id": watched}),
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=timedelta(seconds=silent_after_s),
    )

    def same(a) -> bool:
        t = a.trigger
        return (getattr(t, "within", None) == trigger.within
                and sorted(_as_list(getattr(t, "match_related", {}) or {}, "prefect.resource.id")) == watched)  # fmt: skip

    def delete(ids) -> None:
        with get_client(sync_client=True) as client:
            for i in ids:
                try:
                    client.delete_automation(i)
                except httpx.HTTPStatusError as e:  # another worker deleted it first
                    if e.response.status_code != 404:
                        raise

    with get_client(sync_client=True) as client:
        found = client.read_automations_by_name(name)
    delete([a.id for a in found if not same(a)])  # an older set of deployments, or another delay
    if not any(same(a) for a in found):
        Automation(
            name=name,
            description=f"A flow run of {pool}'s deployments that sent no heartbeat for {silent_after_s:g} s is Crashed "
            "(its worker or machine was lost); its sweep then submits it again (flows/deploy.py)",
            trigger=trigger,
            actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                        message=f"no heartbeat for {silent_after_s:g} s: its worker or machine was lost")],
        ).create()  # fmt: skip
    with get_client(sync_client=True) as client:
        found = [a for a in client.read_automations_by_name(name) if same(a)]
    keep, *extra = sorted(found, key=lambda a: str(a.id))
    delete([a.id for a in extra])
    return str(keep.id)


def _as_list(spec, key: str) -> list[str]:
    """The values for ``key`` of a resource specification (a ``ResourceSpecification``, a dict, or a list of them)."""
    if isinstance(spec, list):
        return [v for one in spec for v in _as_list(one, key)]
    value = dict(getattr(spec, "root", spec)).get(key, [])
    return [value] if isinstance(value, str) else list(value)


def deploy(pool: str, cron: str = "0 2 * * *", timezone: str = "UTC") -> list[str]:
    from flows import rpg_flows
    from flows.forms import to_deployment

    ensure_pool(pool)
    ids = []
    for fn, (name, queue) in FLOWS.items():
        flow = getattr(rpg_flows, fn)
        kw = {"schedule": Cron(cron, timezone=timezone)} if fn == "nightly_eval" else {}
        dep = to_deployment(flow, name=name, work_pool_name=pool, work_queue_name=queue,
                            entrypoint_type=EntrypointType.MODULE_PATH,
                            job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}}, **kw)  # fmt: skip
        ids.append(str(dep.apply()))
    ensure_crash_detection(pool, ids)
    return ids


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.splitlines()[0])
    p.add_argument("--pool", default="gpu-pool")
    p.add_argument("--cron", default="0 2 * * *")
    p.add_argument("--timezone", default="UTC")
    p.add_argument("--queue", action="append", default=[], help="also create this work queue (repeatable)")
    args = p.parse_args(argv)
    for fn, dep_id in zip(FLOWS, deploy(args.pool, args.cron, args.timezone), strict=True):
        name, queue = FLOWS[fn]
        print(f"{fn}/{name} on pool {args.pool}, queue {queue}: {dep_id}")
    print(f"automation {crash_automation_name(args.pool)!r}: a flow run of these deployments silent for "
          f"{SILENT_AFTER_S} s is Crashed (each sends a heartbeat every {HEARTBEAT_S} s)")
    from flows.dispatch import ensure_queue

    for queue in args.queue:
        ensure_queue(args.pool, queue)
        print(f"queue {queue} on pool {args.pool}")


if __name__ == "__main__":
    main()
