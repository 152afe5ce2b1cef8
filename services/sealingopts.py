"""The sealing-key options shared by the broker service and the operator commands that open
sealed state themselves (``audit``, ``node reset``, ``recovery``).

They are configuration overrides like ``--nats``: command line > ``ATTESTMESH_SEALING_*`` >
config file > defaults (a key file in the data directory). The key itself is never an
option (it would sit in shell history and ``ps``): ``--sealing-source env`` reads it from
``ATTESTMESH_SEALING_KEY``.
"""

from __future__ import annotations

import argparse
import os
from typing import get_args

from services.broker.keysources import from_config
from services.broker.sealing import SealingKeySource
from services.mesh.config import Config, SealingSource


def add_options(parser: argparse.ArgumentParser) -> None:
    """``--sealing-source``, ``--sealing-key-file`` and ``--sealing-secret-dir``."""
    group = parser.add_argument_group("sealing key (default: DATA_DIR/broker-sealing.key)")
    group.add_argument(
        "--sealing-source", choices=get_args(SealingSource), help="where the sealing key comes from"
    )
    group.add_argument("--sealing-key-file", help="the key file (source file)")
    group.add_argument("--sealing-secret-dir", help="the mounted Secret (source k8s-secret)")


def overrides(args: argparse.Namespace) -> dict[str, object]:
    """The options given, as ``Config`` overrides (absent ones are ``None``: not overridden)."""
    return {
        "sealing_source": getattr(args, "sealing_source", None),
        "sealing_key_file": getattr(args, "sealing_key_file", None),
        "sealing_secret_dir": getattr(args, "sealing_secret_dir", None),
    }


def source(config: Config) -> SealingKeySource:
    """The configured source; this process's environment is where ``env`` looks."""
    return from_config(config, os.environ)
