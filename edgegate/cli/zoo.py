"""`edgegate zoo list|train`: the tiny reference models of each gated family."""

from __future__ import annotations

import argparse

from edgegate.cli._common import console


def cmd_zoo_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from edgegate import zoo

    table = Table("name", "family", "dataset", "description")
    for e in zoo.list_models():
        table.add_row(e.name, e.family, e.dataset, e.description)
    console().print(table)
    return 0


def cmd_zoo_train(args: argparse.Namespace) -> int:
    from edgegate import zoo

    con = console()
    with con.status(f"training {args.name}"):
        path = zoo.train_and_save(args.name, args.output, seed=args.seed)
    from edgegate.loading import load

    metrics = (load(path).spec.get("meta") or {}).get("metrics", {})
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    con.print(f"wrote [bold]{path}[/] ({shown})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    z = sub.add_parser("zoo", help="tiny reference models of each gated family")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zl = zsub.add_parser("list", help="list zoo models")
    zl.set_defaults(func=cmd_zoo_list)
    zt = zsub.add_parser("train", help="train a zoo model deterministically and save it")
    zt.add_argument("name")
    zt.add_argument("-o", "--output", required=True, help="checkpoint path to write, e.g. model.pt")
    zt.add_argument("--seed", type=int, default=0)
    zt.set_defaults(func=cmd_zoo_train)
