"""``python -m bench``: the same as ``attestmesh bench``."""

from __future__ import annotations

import argparse
import sys

from bench import cli

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    sys.exit(cli.run(parser.parse_args(["bench", *sys.argv[1:]])))
