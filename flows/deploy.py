"""Register the flows as deployments on a Prefect process work pool (created if missing), for GPU machines that run
``prefect worker start`` (infra/team/worker.sh). The local stack uses ``flows.serve`` instead (no pool, no worker).

    python -m flows.deploy --pool gpu-pool [--cron "0 2 * * *"]

The deployments point at this checkout (``from_source`` with its path), so every worker machine needs the
repository at the same path (a shared file system or the same clone location).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import Flow
from prefect.schedules import Cron

ROOT = Path(__file__).resolve().parents[1]
FLOWS = {"sweep": "sweep", "train": "train", "evaluate": "evaluate", "nightly_eval": "nightly"}


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
    ensure_pool(pool)
    ids = []
    for fn, name in FLOWS.items():
        flow = Flow.from_source(source=str(ROOT), entrypoint=f"flows/rpg_flows.py:{fn}")
        kw = {"schedule": Cron(cron, timezone=timezone)} if fn == "nightly_eval" else {}
        ids.append(str(flow.deploy(name=name, work_pool_name=pool, print_next_steps=False, **kw)))
    return ids


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.splitlines()[0])
    p.add_argument("--pool", default="gpu-pool")
    p.add_argument("--cron", default="0 2 * * *")
    p.add_argument("--timezone", default="UTC")
    args = p.parse_args(argv)
    for fn, dep_id in zip(FLOWS, deploy(args.pool, args.cron, args.timezone), strict=True):
        print(f"{fn}/{FLOWS[fn]} on pool {args.pool}: {dep_id}")


if __name__ == "__main__":
    main()
