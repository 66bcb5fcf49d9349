"""Serve the flows as deployments: ``python -m flows.serve`` (the local stack starts it; see infra/).

Open the Prefect UI, pick ``sweep`` (or ``tune``, ``train``, ``evaluate``, ``nightly_eval``), fill the typed form and press
Run: the parameters are validated by the server against the flow's signature (bad values are refused by the form),
and the run executes in a subprocess of this process. ``nightly_eval`` runs on a cron schedule (default 02:00).
"""

from __future__ import annotations

import argparse

from prefect import serve
from prefect.schedules import Cron

from flows.forms import to_deployment
from flows.rpg_flows import evaluate, nightly_eval, sweep, train, tune

NIGHTLY_CRON = "0 2 * * *"


def deployments(cron: str = NIGHTLY_CRON, timezone: str = "UTC") -> list:
    return [
        to_deployment(sweep, name="sweep", description="train every run of a sweep file"),
        to_deployment(tune, name="tune", description="tune a study file's coefficients with Optuna (pruned, resumable)"),
        to_deployment(train, name="train", description="one training run"),
        to_deployment(evaluate, name="evaluate", description="Mean@k of a model or checkpoint (rpg eval)"),
        to_deployment(nightly_eval, name="nightly_eval", schedule=Cron(cron, timezone=timezone),
                                   description="evaluate the checkpoints finished since the last nightly"),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    p.add_argument("--cron", default=NIGHTLY_CRON, help=f"nightly_eval schedule (default {NIGHTLY_CRON!r})")
    p.add_argument("--timezone", default="UTC")
    p.add_argument("--limit", type=int, default=None, help="flow runs at once (default: no limit)")
    args = p.parse_args(argv)
    serve(*deployments(args.cron, args.timezone), limit=args.limit)


if __name__ == "__main__":
    main()
