"""The `sarm` command. Each subcommand lives in its own module, which provides `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys

from sarm.errors import SarmError

# Modules that add subcommands (each defines `register(subparsers)`).
COMMAND_MODULES: tuple[str, ...] = ("sarm.serve", "sarm.explain")


def add_trust_remote_code(parser: argparse.ArgumentParser) -> None:
    """The flag that allows a reward model's base model to run its own Python code; a folder never can."""
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the base model's own Python code (transformers' trust_remote_code); only for a model you trust",
    )


def _score(args) -> None:
    from sarm.reward_model import load  # any saved reward model: every kind scores text

    model = load(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    reward = float(model.score([args.prompt], [args.response])[0])
    if not math.isfinite(reward):  # never printed as a score with exit 0
        raise SarmError(f"{args.model}: the reward is {reward}")
    print(json.dumps({"reward": reward}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sarm", description="Sparse-autoencoder reward models.")
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="score one (prompt, response) with a trained reward model")
    score.add_argument("--model", required=True, help="a reward model folder, e.g. results/reward/sarm")
    score.add_argument("--prompt", required=True)
    score.add_argument("--response", required=True)
    score.add_argument("--device", default="cpu")
    add_trust_remote_code(score)
    score.set_defaults(func=_score)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SarmError as err:
        sys.exit(f"sarm: error: {err}")


if __name__ == "__main__":
    main()
