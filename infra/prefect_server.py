"""``prefect server start`` serving the V1 UI only: the Prefect server of the stack (infra/stack.py).

Prefect 3 mounts its V2 UI whenever the package ships it, and its V1 UI then offers it (a "Switch to V2 UI" entry in
the sidebar, a "Try the V2 UI" banner on the dashboard), with ``PREFECT_SERVER_UI_V2_ENABLED=false`` and
``PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT=false`` both set. The V2 pages fetch an analytics host on the internet
from the browser (infra/README.md, "Offline"). No setting stops it, but the server mounts a UI bundle only if the
bundle's source folder exists (``prefect.server.api.server.create_ui_app``): this entry point points the V2 source
at a folder that does not exist, then runs Prefect's own CLI in this process (``server start`` with one worker builds
the app here). ``/ui-settings`` then lists ``available_uis: ["v1"]``, the V1 UI shows neither the entry nor the
banner, and a ``/v2/...`` address (a bookmark, the ``prefect_ui_version=v2`` cookie) is redirected to the V1 UI.

    python infra/prefect_server.py server start --host 127.0.0.1 --port 4200     # the arguments of ``prefect``
"""

from __future__ import annotations

import pathlib

import prefect

prefect.__ui_v2_static_path__ = pathlib.Path(prefect.__module_path__) / "server" / "ui-v2-not-served"

if __name__ == "__main__":
    from prefect.cli import app

    app()
