"""Register the flows as deployments on a Prefect work pool, for GPU machines that run ``prefect worker start``
(infra/team/worker.sh). The local stack uses ``flows.serve`` instead (no pool, no worker).

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


def deploy(pool: str, cron: str = "0 2 * * *", timezone: str = "UTC") -> list[str]:
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
