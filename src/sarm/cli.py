"""The `sarm` command. Each subcommand lives in its own module, which provides `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path

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
    if not (args.token_rewards or args.html):
        reward = float(model.score([args.prompt], [args.response])[0])
        if not math.isfinite(reward):  # never printed as a score with exit 0
            raise SarmError(f"{args.model}: the reward is {reward}")
        print(json.dumps({"reward": reward}))
        return
    from sarm.token_rewards import render_html

    record = model.token_rewards(args.prompt, args.response, top_k=args.top_features)
    if not all(map(math.isfinite, record.rewards)):
        raise SarmError(f"{args.model}: a token reward is not finite")
    if args.html:
        try:
            Path(args.html).write_text(render_html(record, f"Token rewards: {args.model}", args.prompt))
        except OSError as err:
            raise SarmError(f"--html {args.html}: cannot write it ({err.strerror})") from None
    print(json.dumps(record.to_dict(dense=True) if args.token_rewards else {"reward": record.reward}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sarm", description="Sparse-autoencoder reward models.")
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="score one (prompt, response) with a trained reward model")
    score.add_argument("--model", required=True, help="a reward model folder, e.g. results/reward/sarm")
    score.add_argument("--prompt", required=True)
    score.add_argument("--response", required=True)
    score.add_argument("--device", default="cpu")
    score.add_argument("--token-rewards", action="store_true", help="also the reward at every token of the response")
    score.add_argument("--html", default=None, help="write the response's tokens coloured by their reward to this file")
    score.add_argument("--top-features", type=int, default=0, help="per token, its k largest feature contributions")
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
