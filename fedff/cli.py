"""`fedff` command line: train, simulate, pipeline, worker, eval, score, reproduce,
configs.

Every expected failure (a `FedffError`: bad config, missing data, wrong shapes, a dead
peer, bad credentials, a file that is not a checkpoint) ends in one line,
`fedff: error: ...`, that names the problem and the fix, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fedff import __version__, files
from fedff import config as config_mod
from fedff.config import ConfigError
from fedff.errors import FedffError

EXAMPLES = """examples:
  fedff simulate                                # quick start: 5 clients, embedded digits
  fedff simulate --config mnist-ff-3x1000-short --data-dir ../shared/data \\
      --set federation.partitioner=dirichlet --set federation.alpha=0.5
  fedff train                                   # one process, embedded 8x8 digits
  fedff train --config mnist-ff-3x1000 --data-dir ../shared/data --out runs/mnist
  fedff train --config mnist-ff-3x1000 --set train.epochs=10 --set optim.lr=0.02
  fedff eval runs/mnist/checkpoint.pt --data-dir ../shared/data
  fedff train --config mnist-oneclass --set oneclass.normal=3 --out runs/oc3
  fedff score runs/oc3/checkpoint.pt --input rows.npy --out scores.csv
  fedff configs mnist-ff-3x1000                 # print a named config
  fedff reproduce --list                        # the README's results tables
  fedff reproduce oneclass --data-dir ../shared/data   # re-run one, resumably
  fedff pipeline --local 3 --config mnist-ff-3x1000 --set train.negatives=random
  fedff worker --listen 0.0.0.0:7001 --token-file token   # a worker on each machine
  fedff pipeline --workers hostA:7001,hostB:7001,hostC:7001 --token-file token ...
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder holding <dataset>/<idx files> (default: $FEDFF_DATA_DIR, "
                        "then the download cache)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"),
                   help="where tensors live (default: the config's train.device, cpu)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch intra-op threads (default: torch's choice)")


def _add_security(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security (the same flags on every worker and the driver)")
    g.add_argument("--tls-ca", metavar="PEM", help="CA that signed the peers' certificates")
    g.add_argument("--tls-cert", metavar="PEM", help="this process's certificate")
    g.add_argument("--tls-key", metavar="PEM", help="this process's private key")
    g.add_argument("--mtls", action="store_true",
                   help="mutual TLS: workers demand a client certificate signed by --tls-ca")
    g.add_argument("--tls-server-name", metavar="NAME",
                   help="name to check in the workers' certificates (default: the host)")
    g.add_argument("--token-file", metavar="FILE",
                   help="shared bearer token every call must carry (or $FEDFF_TOKEN)")
    g.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback worker address without --token-file or --mtls "
                        "(anyone who reaches the port can drive the worker); logs a warning")


def _add_run_options(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--config", default="digits-ff", metavar="NAME|PATH",
                   help="named config (see `fedff configs`) or TOML file "
                        "(default: digits-ff, the embedded dataset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   dest="overrides", help="override one config value, e.g. "
                   "train.epochs=10 (repeatable; keys: see `fedff configs --keys`)")
    p.add_argument("--out", default=default_out, metavar="DIR",
                   help="output folder for metrics.json/.csv, checkpoint.pt, "
                        f"learning_curve.png (default: {default_out})")
    p.add_argument("--resume", action="store_true",
                   help="continue from DIR/checkpoint.pt if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_common(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedff", description="Forward-Forward training, in-process, in layer workers "
        "or federated.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fedff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a network and write metrics, plot, checkpoint",
                           description="Train with a named config or a TOML file.")
    _add_run_options(train, "runs/latest")

    sim = sub.add_parser(
        "simulate", help="simulate a federation of data owners on this host (Flower + Ray)",
        description="N clients (federation.clients), each holding one partition of the "
        "training set (federation.partitioner), train their FF layers locally; a Flower "
        "coordinator averages each layer, round after round, scores the global model on "
        "the test set and checkpoints it. train.epochs is federation.rounds x "
        "federation.local_epochs. Writes metrics.json/.csv, checkpoint.pt (readable by "
        "`fedff eval`) and accuracy_vs_round.png.")
    _add_run_options(sim, "runs/federation")
    sim.add_argument("--verbose", action="store_true", help="Flower's and Ray's own logs")

    pipe = sub.add_parser(
        "pipeline", help="train through a chain of layer workers (remote, or --local K)",
        description="Stream the dataset into a chain of layer workers, one block of layers "
        "per worker, all training at once. Writes the same outputs as `fedff train`; the "
        "checkpoint is a whole-network checkpoint that `fedff eval` reads.")
    _add_run_options(pipe, "runs/pipeline")
    where = pipe.add_mutually_exclusive_group(required=True)
    where.add_argument("--workers", metavar="ADDR,ADDR,...",
                       help="the chain's workers in order (started with `fedff worker`)")
    where.add_argument("--local", type=int, metavar="K",
                       help="start K workers on this host, run, and stop them")
    pipe.add_argument("--worker-threads", type=int, default=1, metavar="N",
                      help="torch threads per local worker (default 1)")
    pipe.add_argument("--window", type=int, metavar="N",
                      help="batches in flight per link (default 4; PEPITA 1: its error "
                           "arrives window batches late, and at the reference lr a window "
                           "of 4 diverged)")
    pipe.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                      help="local workers checkpoint every N batches (default 100)")
    pipe.add_argument("--keep-workers", action="store_true",
                      help="with --workers: leave them running afterwards (default: shut down)")
    pipe.add_argument("--wire-dtype", choices=("float32", "bfloat16", "float16"),
                      default="float32",
                      help="send activations between processes as this (bfloat16 or float16 "
                           "halve the bytes; every layer still computes in float32)")
    pipe.add_argument("--wire-sparse", action="store_true",
                      help="send the activations' zeros as bits, the rest as numbers "
                           "(lossless; ReLU outputs are about half zeros)")
    pipe.add_argument("--reset-workers", action="store_true",
                      help="with --workers: take over workers that still serve another run "
                           "(its checkpoint is kept as previous-run.pt); without it they "
                           "refuse this run")
    _add_security(pipe)

    wk = sub.add_parser(
        "worker", help="serve one block of layers over gRPC",
        description="A layer worker. It waits for a driver to configure it (which layers, "
        "what comes next), trains on the stream from the previous worker and sends its "
        "output on. Restarted with the same --checkpoint-dir, it resumes where it stopped.")
    wk.add_argument("--listen", default="127.0.0.1:7001", metavar="HOST:PORT",
                    help="address to serve on (port 0: any free port; default 127.0.0.1:7001, "
                         "this machine only; another address needs --token-file or --mtls, "
                         "or --insecure)")
    wk.add_argument("--name", default="worker", help="name in logs and status")
    wk.add_argument("--checkpoint-dir", type=Path, metavar="DIR",
                    help="where to checkpoint; a restart resumes from here")
    wk.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                    help="checkpoint every N batches (and at every epoch end; default 100)")
    wk.add_argument("--next", metavar="HOST:PORT",
                    help="the next worker's address as seen from here; the driver's choice "
                         "is then ignored (default: the address the driver names, where "
                         "--allow-downstream allows it)")
    wk.add_argument("--allow-downstream", action="append", default=[], metavar="HOST:PORT",
                    help="an address the driver may name as this worker's next (repeat or "
                         "comma-separate; default without --next: loopback addresses only)")
    wk.add_argument("--window", type=int, default=4, metavar="N",
                    help="batches in flight to the next worker (default 4)")
    wk.add_argument("--threads", type=int, default=0, metavar="N",
                    help="torch intra-op threads (default: torch's choice)")
    wk.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                    help="where this worker's layers live (default cpu)")
    wk.add_argument("--max-batch-mb", type=int, default=512, metavar="MB",
                    help="refuse batches larger than this (default 512)")
    wk.add_argument("--max-params", type=int, default=0, metavar="N",
                    help="refuse a CONFIGURE whose block has more parameters (default: a "
                         "quarter of this machine's RAM at 16 bytes each)")
    wk.add_argument("--ready-file", type=Path, metavar="FILE",
                    help="write the address served on to FILE once listening")
    wk.add_argument("--exit-with-parent", type=int, metavar="PID",
                    help=argparse.SUPPRESS)  # set by the local launcher
    _add_security(wk)

    ev = sub.add_parser("eval", help="score a checkpoint on its dataset's test set")
    ev.add_argument("checkpoint", type=Path, help="a checkpoint.pt written by `fedff train`")
    ev.add_argument("--out", type=Path, metavar="FILE", help="also write the metrics as JSON")
    _add_common(ev)

    sc = sub.add_parser("score", help="anomaly scores from a one-class checkpoint")
    sc.add_argument("checkpoint", type=Path, help="a one-class run's checkpoint.pt")
    sc.add_argument("--input", type=Path, metavar="FILE",
                    help="rows to score: a .npy array or .csv table [rows, features], scaled "
                         "like the training data (default: the checkpoint's test set, with "
                         "AUROC)")
    sc.add_argument("--out", type=Path, default=Path("scores.csv"), metavar="FILE",
                    help="CSV with one row, score and anomaly flag per input row "
                         "(default: scores.csv)")
    _add_common(sc)

    rp = sub.add_parser(
        "reproduce", help="re-run one of the README's results tables",
        description="Runs every row of a results table in order (finished rows are "
        "skipped, an unfinished one resumes), then writes results.json, table.md (the "
        "README's format, published figures beside) and comparison.png.")
    rp.add_argument("table", nargs="?", help="a table name (see --list)")
    rp.add_argument("--list", action="store_true", help="list the tables and their cost")
    rp.add_argument("--quick", action="store_true",
                    help="every row on a tiny budget: checks the machinery, not the numbers")
    rp.add_argument("--out", metavar="DIR",
                    help="output folder (default: runs/reproduce/TABLE[-quick])")
    rp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    dest="overrides", help="override a config value in every row")
    _add_common(rp)

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


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedff.federation.simulation import simulate

    cfg = config_mod.load(args.config, [*args.overrides, *_common_overrides(args)])
    summary = simulate(cfg, Path(args.out), resume=args.resume, show_progress=not args.quiet,
                       verbose=args.verbose)
    line = {k: summary[k] for k in ("test_error", "error_head", "error_goodness", "rounds",
                                    "train_seconds", "median_round_overhead_fraction")}
    print(json.dumps({"out": args.out, **line}))
    return 0


def _security(args: argparse.Namespace):
    from fedff.wire.security import Security

    return Security.from_args(args.tls_ca, args.tls_cert, args.tls_key, args.mtls,
                              args.token_file, args.tls_server_name)


def _security_args(args: argparse.Namespace) -> list[str]:
    out = []
    for flag in ("tls_ca", "tls_cert", "tls_key", "token_file", "tls_server_name"):
        if getattr(args, flag):
            out += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return out + (["--mtls"] if args.mtls else [])


def cmd_pipeline(args: argparse.Namespace) -> int:
    from fedff.pipeline.driver import ChainOptions, default_window, run_pipeline

    cfg = config_mod.load(args.config, [*args.overrides, *_common_overrides(args)])
    options = ChainOptions(
        addresses=[a.strip() for a in (args.workers or "").split(",") if a.strip()],
        local=args.local or 0, worker_threads=args.worker_threads,
        window=args.window or default_window(cfg),
        checkpoint_every=args.checkpoint_every, keep_workers=args.keep_workers,
        worker_args=_security_args(args), insecure=args.insecure,
        reset_workers=args.reset_workers, wire_dtype=args.wire_dtype,
        wire_sparse=args.wire_sparse)
    summary = run_pipeline(cfg, Path(args.out), options, _security(args),
                           show_progress=not args.quiet, resume=args.resume)
    line = {k: summary[k] for k in ("test_error", "error_head", "error_goodness", "epochs",
                                    "train_seconds", "peak_rss_mb")}
    print(json.dumps({"out": args.out, **line}))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import logging

    from fedff.train import resolve_device
    from fedff.worker.server import WorkerServer
    from fedff.worker.options import WorkerOptions

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.exit_with_parent:
        from fedff.pipeline.launcher import exit_with_parent

        exit_with_parent(args.exit_with_parent)
    options = WorkerOptions(name=args.name, checkpoint_dir=args.checkpoint_dir,
                            checkpoint_every=args.checkpoint_every, window=args.window,
                            device=str(resolve_device(args.device)), next_address=args.next,
                            allow_downstream=tuple(a.strip() for v in args.allow_downstream
                                                   for a in v.split(",") if a.strip()),
                            max_batch_bytes=args.max_batch_mb * 2**20,
                            max_params=args.max_params)
    server = WorkerServer(args.listen, options, _security(args), threads=args.threads,
                          insecure=args.insecure)
    server.start(args.ready_file)
    print(f"fedff worker {args.name} listening on {server.address}", flush=True)
    server.wait()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fedff.train import build_network, load_data, resolve_device, test_metrics

    saved = files.load(args.checkpoint, keys=("network",))
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


def cmd_score(args: argparse.Namespace) -> int:
    from fedff.oneclass.score import score

    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(score(args.checkpoint, args.input, args.out, args.data_dir)))
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from fedff.reproduce.runner import listing, reproduce

    if args.list or not args.table:
        print(listing())
        return 0
    out = Path(args.out or f"runs/reproduce/{args.table}{'-quick' if args.quick else ''}")
    report = reproduce(args.table, out, args.quick, [*args.overrides,
                                                    *_common_overrides(args)])
    print((out / "table.md").read_text())
    print(json.dumps({"out": str(out), "rows": len(report["rows"])}))
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    if args.keys:
        defaults = config_mod.Config().to_dict()
        for key in config_mod.all_keys():
            section, _, name = key.partition(".")
            value = defaults[section][name] if name else defaults[section]
            allowed = config_mod.choices(key)
            print(f"{key} = {value!r}" + (f"  # {' | '.join(allowed)}" if allowed else ""))
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
    handlers = {"train": cmd_train, "eval": cmd_eval, "configs": cmd_configs,
                "pipeline": cmd_pipeline, "worker": cmd_worker, "simulate": cmd_simulate,
                "score": cmd_score, "reproduce": cmd_reproduce}
    try:
        return handlers[args.command](args)
    except (FedffError, OSError) as err:
        print(f"fedff: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedff: interrupted; the last finished epoch is in the checkpoint "
              "(continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
