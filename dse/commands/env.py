from __future__ import annotations

import argparse

from dse.commands.common import config_from_args
from dse.commands.registry import command
from dse.hardware.envinfo import environment, render


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-compile", action="store_true", help="skip the test compilation per target")


@command("env", "versions, devices, usable TVM targets and energy sources on this machine", _args)
def run(args: argparse.Namespace):
    cfg = config_from_args(args)
    env = environment(check_targets=not args.no_compile, cuda_arch=cfg.export.cuda_arch)
    return {"text": render(env), "json": env}
