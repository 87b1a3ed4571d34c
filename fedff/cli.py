"""`fedff` command line: train, eval, configs.

Every expected failure (bad config, missing data, wrong shapes) ends in one line,
`fedff: error: ...`, that names the problem and the fix, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fedff import __version__
from fedff import config as config_mod
from fedff.config import ConfigError
from fedff.data.idx import DataError
from fedff.ff.layer import ShapeError

EXAMPLES = """examples:
  fedff train                                   # quick start: embedded 8x8 digits
  fedff train --config mnist-ff-3x1000 --data-dir ../shared/data --out runs/mnist
  fedff train --config mnist-ff-3x1000 --set train.epochs=10 --set optim.lr=0.02
  fedff eval runs/mnist/checkpoint.pt --data-dir ../shared/data
  fedff configs mnist-ff-3x1000                 # print a named config
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder holding <dataset>/<idx files> (default: $FEDFF_DATA_DIR, "
                        "then the download cache)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"),
                   help="where tensors live (default: the config's train.device, cpu)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch intra-op threads (default: torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedff", description="Forward-Forward training, in-process, in layer workers "
        "or federated.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fedff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a network and write metrics, plot, checkpoint",
                           description="Train with a named config or a TOML file.")
    train.add_argument("--config", default="digits-ff", metavar="NAME|PATH",
                       help="named config (see `fedff configs`) or TOML file "
                            "(default: digits-ff, the embedded dataset)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       dest="overrides", help="override one config value, e.g. "
                       "train.epochs=10 (repeatable; keys: see `fedff configs --keys`)")
    train.add_argument("--out", default="runs/latest", metavar="DIR",
                       help="output folder for metrics.json/.csv, checkpoint.pt, "
                            "learning_curve.png (default: runs/latest)")
    train.add_argument("--resume", action="store_true",
                       help="continue from DIR/checkpoint.pt if it exists")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_common(train)

    ev = sub.add_parser("eval", help="score a checkpoint on its dataset's test set")
    ev.add_argument("checkpoint", type=Path, help="a checkpoint.pt written by `fedff train`")
    ev.add_argument("--out", type=Path, metavar="FILE", help="also write the metrics as JSON")
    _add_common(ev)

    cf = sub.add_parser("configs", help="list named configs, or print one")
    cf.add_argument("name", nargs="?", help="a named config to print")
    cf.add_argument("--keys", action="store_true", help="list every config key and default")
    return parser


def _common_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if args.data_dir:
        out.append(f"data.data_dir={args.data_dir}")
    if args.device:
        out.append(f"train.device={args.device}")
    if args.threads:
        out.append(f"train.threads={args.threads}")
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from fedff.train import run

    cfg = config_mod.load(args.config, [*args.overrides, *_common_overrides(args)])
    summary = run(cfg, Path(args.out), show_progress=not args.quiet, resume=args.resume)
    line = {k: summary[k] for k in ("test_error", "error_head", "error_goodness", "epochs",
                                    "train_seconds", "peak_rss_mb")}
    print(json.dumps({"out": args.out, **line}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fedff.train import build_network, load_data, resolve_device, test_metrics

    if not args.checkpoint.is_file():
        raise DataError(f"checkpoint {args.checkpoint} not found; pass the checkpoint.pt "
                        f"that `fedff train --out DIR` wrote")
    saved = torch.load(args.checkpoint, weights_only=False, map_location="cpu")
    cfg = config_mod.from_dict(saved["network"]["config"])
    for item in _common_overrides(args):
        config_mod.apply(cfg, *item.split("=", 1))
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_data(cfg)
    net = build_network(cfg, ds, resolve_device(cfg.train.device))
    net.load_state_dict(saved["network"])
    result = {"checkpoint": str(args.checkpoint), "dataset": ds.name, "epoch": net.epoch,
              **test_metrics(net, ds)}
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    if args.keys:
        defaults = config_mod.Config().to_dict()
        for key in config_mod.all_keys():
            section, _, name = key.partition(".")
            value = defaults[section][name] if name else defaults[section]
            print(f"{key} = {value!r}")
    elif args.name:
        from importlib import resources

        if args.name not in config_mod.named_configs():
            raise ConfigError(f"unknown config '{args.name}'; named configs: "
                              f"{', '.join(config_mod.named_configs())}")
        print(resources.files("fedff.configs").joinpath(f"{args.name}.toml").read_text())
    else:
        print("\n".join(config_mod.named_configs()))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"train": cmd_train, "eval": cmd_eval, "configs": cmd_configs}
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, ShapeError) as err:
        print(f"fedff: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedff: interrupted; the last finished epoch is in the checkpoint "
              "(continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
