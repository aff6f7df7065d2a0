"""`edgegate zoo list|train`: the tiny reference models of each gated family."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgegate.cli._common import Status, add_group
from edgegate.errors import EdgegateError
from edgegate.reports.text import num, table


def cmd_zoo_list(args: argparse.Namespace) -> int:
    # loaded when the command runs: the CLI starts light, and a runtime-only install names the missing extra
    from edgegate import zoo

    entries = [{"name": e.name, "family": e.family, "dataset": e.dataset, "description": e.description}
               for e in zoo.list_models()]
    if args.json:
        print(json.dumps(entries, indent=2))
    else:
        print("\n".join(table(("name", "family", "dataset", "description"), [tuple(e.values()) for e in entries])))
    return 0


def cmd_zoo_train(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.is_dir():
        raise EdgegateError(f"{out} is a directory; give -o a checkpoint file path such as model.pt")
    if (out.exists() or out.is_symlink()) and not args.overwrite:
        raise EdgegateError(f"{out} already exists; pass --overwrite to replace that file or choose another -o")
    # loaded when the command runs: the CLI starts light, and a runtime-only install names the missing extra
    from edgegate import zoo
    with Status("zoo train") as status:
        status.update(f"training {args.name}")
        path = zoo.train_and_save(args.name, out, seed=args.seed)
    # loaded when the command runs: the CLI starts light, and a runtime-only install names the missing extra
    from edgegate.loading import load

    metrics = (load(path).spec.get("meta") or {}).get("metrics", {})

    def show(v: object) -> str:
        return "[" + ", ".join(num(x) for x in v) + "]" if isinstance(v, list) else num(v)

    print(f"wrote {path} ({', '.join(f'{k} {show(v)}' for k, v in metrics.items())})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    zsub = add_group(sub, "zoo", "{list,train}", help="tiny reference models of each gated family (list, train)",
                     description="One tiny model per gated family, trained deterministically in seconds on "
                     "offline data. Needs the compile extra (torch).")
    zl = zsub.add_parser("list", help="list the zoo models")
    zl.add_argument("--json", action="store_true", help="print the list as JSON")
    zl.set_defaults(func=cmd_zoo_list)
    zt = zsub.add_parser("train", help="train a zoo model deterministically and save it as a checkpoint")
    zt.add_argument("name", help="zoo model name (see `edgegate zoo list`)")
    zt.add_argument("-o", "--output", required=True, help="checkpoint path to write, e.g. model.pt")
    zt.add_argument("--seed", type=int, default=0, help="seed of the weights, data split and training order")
    zt.add_argument("--overwrite", action="store_true", help="replace an existing file at --output")
    zt.set_defaults(func=cmd_zoo_train)
