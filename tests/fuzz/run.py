"""``python -m tests.fuzz.run TARGET [libFuzzer flags]``: fuzz one target with atheris."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["services"]):
    from tests.fuzz.targets import TARGETS


def main() -> None:
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
