"""Register the flows as deployments on a Prefect process work pool (created if missing), for GPU machines that run
``prefect worker start`` (infra/team/worker.sh). The local stack uses ``flows.serve`` instead (no pool, no worker).

    python -m flows.deploy --pool gpu-pool [--cron "0 2 * * *"]

The deployments name their flows by module (``flows.rpg_flows.train``), with no code location: each worker imports
them from its own checkout or installed package, at any path (worker.sh puts its checkout first on ``PYTHONPATH``
and sets ``RPG_ROOT``). Two work queues split the work: ``gpu`` (``train``, ``evaluate``, ``nightly_eval``: a
machine's GPU worker takes at most one flow run per GPU) and ``control`` (``sweep``, ``tune``: a coordinator that only submits
and waits, taken by a control worker, so it never holds a GPU slot).
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


def deploy(pool: str, cron: str = "0 2 * * *", timezone: str = "UTC") -> list[str]:
    from flows import rpg_flows
    from flows.forms import to_deployment

    ensure_pool(pool)
    ids = []
    for fn, (name, queue) in FLOWS.items():
        flow = getattr(rpg_flows, fn)
        kw = {"schedule": Cron(cron, timezone=timezone)} if fn == "nightly_eval" else {}
        dep = to_deployment(flow, name=name, work_pool_name=pool, work_queue_name=queue,
                            entrypoint_type=EntrypointType.MODULE_PATH, **kw)  # fmt: skip
        ids.append(str(dep.apply()))
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
    from flows.dispatch import ensure_queue

    for queue in args.queue:
        ensure_queue(args.pool, queue)
        print(f"queue {queue} on pool {args.pool}")


if __name__ == "__main__":
    main()
