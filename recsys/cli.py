"""The ``recsys`` command line: one entry point, one subcommand per job.

Every subcommand loads configuration the same way (``--config`` file, then
``RECSYS_*`` environment, then flags) and hands off to the component that
owns the job; heavy imports (TensorFlow) happen only inside the chosen one.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from recsys.config import ConfigError, RecsysSettings, TLSSettings, load_settings
from recsys.errors import UserFacingError

# subcommand -> "module:function"; each function takes (args, settings) -> exit code.
_HANDLERS = {
    "generate-data": "trainer.synthetic:cli_generate",
    "train": "trainer.cli:cli_train",
    "evaluate": "trainer.cli:cli_evaluate",
    "publish": "trainer.publish:cli_publish",
    "export-interactions": "trainer.interactions:cli_export",
    "serve retrieval": "retrieval_service.server:cli_serve",
    "serve ranking": "ranking_service.server:cli_serve",
    "up": "recsys.stack:cli_up",
    "recommend": "recsys.client:cli_recommend",
    "loadtest": "recsys.loadtest:cli_loadtest",
}

DATA_HELP = (
    "dataset: 'synthetic' (default, built in), 'synthetic:users=2000,items=1500,ratings=100000,"
    "seed=0', 'movielens-100k:<dir>', 'movielens-latest-small:<dir>', or 'csv:<dir>' "
    "(the format generate-data writes)"
)


def _client_tls_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "TLS", "for a server with [ranking.tls] / [retrieval.tls]; any of these turns TLS on"
    )
    g.add_argument("--tls-ca", type=Path, help="CA that signed the server's certificate (PEM)")
    g.add_argument("--tls-cert", type=Path, help="client certificate for mutual TLS (PEM)")
    g.add_argument("--tls-key", type=Path, help="key of --tls-cert (PEM)")


# The TLSSettings field each --tls-* flag sets.
_TLS_FLAG_FIELDS = {"--tls-ca": "ca_file", "--tls-cert": "cert_file", "--tls-key": "key_file"}


def client_tls(args: argparse.Namespace) -> TLSSettings | None:
    """The client TLS the ``--tls-*`` flags ask for; None (plaintext) without any.

    Raises:
        UserFacingError: Only one of ``--tls-cert``/``--tls-key``, or a file
            gRPC could not use (see :func:`recsys.serving.read_tls_files`);
            the message names the flag.
    """
    from recsys.serving import read_tls_files

    paths = {flag: getattr(args, flag[2:].replace("-", "_"), None) for flag in _TLS_FLAG_FIELDS}
    if not any(paths.values()):
        return None
    if (paths["--tls-cert"] is None) != (paths["--tls-key"] is None):
        given, missing = ("--tls-cert", "--tls-key")
        if paths["--tls-cert"] is None:
            given, missing = missing, given
        raise UserFacingError(f"{given} needs {missing} (mutual TLS takes both)")
    # With only a certificate and key, the server is checked against the system's CAs.
    tls = TLSSettings(**{field: paths[flag] for flag, field in _TLS_FLAG_FIELDS.items()})
    # Checked here, where the flags are known: the channel's own check would
    # name the setting (tls.ca_file) that no command line has.
    read_tls_files(tls, {field: flag for flag, field in _TLS_FLAG_FIELDS.items()})
    return tls


def _common(
    p: argparse.ArgumentParser,
    *,
    model_dir: bool = False,
    redis_url: bool = False,
    log_level: bool = False,
) -> None:
    """``--config``, and the setting overrides the command's handler reads.

    A command is given only the overrides it uses: one it would ignore
    (``recommend --model-dir``, ``evaluate --redis-url``) is then refused as an
    unrecognized argument instead of being taken and silently doing nothing.
    """
    p.add_argument("--config", type=Path, help="TOML config file (default: $RECSYS_CONFIG)")
    if model_dir:
        p.add_argument("--model-dir", type=Path, help="model versions root (default from config)")
    if redis_url:
        p.add_argument("--redis-url", help="Redis URL (default: $RECSYS_REDIS_URL)")
    if log_level:
        p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")


def _setting_help(section: str, key: str, text: str) -> str:
    """Help for a flag that overrides ``[section] key``, naming that setting's default.

    The flag's own default stays None, so the config file and environment still apply.
    """
    default = RecsysSettings.model_fields[section].annotation.model_fields[key].default
    return f"{text} (default: [{section}] {key}, else {default})"


def _version() -> str:
    """The installed package's version (``unknown`` when run from a bare source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("recsys-serving")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by the docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="recsys",
        description="Two-stage recommender: train a two-tower model, publish it, and serve "
        "retrieval and ranking over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"recsys {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "generate-data",
        help="write a deterministic synthetic MovieLens-style dataset",
        description="Writes ratings.csv, movies.csv and users.csv with latent tastes, "
        "deterministic for a seed.",
    )
    _common(p)
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--users", type=int, default=2000, help="users (default %(default)s)")
    p.add_argument("--items", type=int, default=1500, help="catalogue size (default %(default)s)")
    p.add_argument(
        "--ratings",
        type=int,
        default=100_000,
        help="ratings, at most one per user and item (default %(default)s)",
    )
    p.add_argument("--countries", type=int, default=6, help="user countries (default %(default)s)")
    p.add_argument(
        "--seed", type=int, default=0, help="same seed, same files (default %(default)s)"
    )

    p = sub.add_parser(
        "train",
        help="train the two-tower model, evaluate it and export a new version",
        description="Loads a dataset, splits it (seeded 80/20), trains the user and item "
        "towers, evaluates against baselines and writes a checksummed version directory.",
    )
    _common(p, model_dir=True, redis_url=True)
    p.add_argument("--data", default="synthetic", help=DATA_HELP)
    p.add_argument("--objective", choices=["rating", "binary"], help="training target")
    p.add_argument("--epochs", type=int, help="maximum epochs (early stopping may end sooner)")
    p.add_argument(
        "--batch-size", type=int, help=_setting_help("trainer", "batch_size", "training batch size")
    )
    p.add_argument(
        "--learning-rate",
        type=float,
        help=_setting_help("trainer", "learning_rate", "Adam's learning rate"),
    )
    p.add_argument("--hidden-units", help="comma-separated hidden layer sizes, e.g. 256,128")
    p.add_argument(
        "--embedding-dim",
        type=int,
        help=_setting_help("trainer", "embedding_dim", "width of the user and item vectors"),
    )
    p.add_argument("--id-embeddings", action="store_true", help="hybrid: add item id embeddings")
    p.add_argument("--dropout", type=float, help="dropout after each hidden layer, 0 <= x < 1")
    p.add_argument(
        "--lr-plateau-factor",
        type=float,
        help="multiply the learning rate by this when validation stalls (0: constant rate)",
    )
    p.add_argument(
        "--annoy-trees",
        type=int,
        help=_setting_help("trainer", "annoy_trees", "trees of the Annoy index"),
    )
    p.add_argument(
        "--negatives",
        type=int,
        help="binary objective: unrated items sampled per rating as negatives (0: none)",
    )
    p.add_argument(
        "--seed", type=int, help=_setting_help("trainer", "seed", "seed of weights and shuffling")
    )
    p.add_argument(
        "--interactions",
        type=Path,
        metavar="DIR",
        help="also train on the ratings `recsys export-interactions` wrote to DIR (its "
        "newest export, or DIR itself when it is one export; the services' interaction "
        "logs), kept in the version (those of a (user, item) pair the split holds out do not "
        "train); publish then replays only the newer ones",
    )
    p.add_argument("--publish", action="store_true", help="publish to Redis when done")
    p.add_argument("--no-plots", action="store_true", help="skip PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "evaluate",
        help="evaluate a version (or compare two) on held-out data",
        description="Recomputes RMSE/MAE, Recall@10, NDCG@10 and the retrieval budget curve "
        "for a version on its dataset's held-out split.",
    )
    _common(p, model_dir=True)
    p.add_argument("--version", help="version to evaluate (default: latest)")
    p.add_argument("--data", help="dataset (default: the one the version was trained on)")
    p.add_argument("--compare", help="second version: print the difference with a bootstrap CI")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser(
        "publish",
        help="load a version's Redis data and make it current",
        description="Writes top lists under version-scoped keys, seeds user state, then "
        "switches recsys:current_version atomically; old versions' keys are removed "
        "after a grace period.",
    )
    _common(p, model_dir=True, redis_url=True)
    p.add_argument(
        "version_dir",
        nargs="?",
        type=Path,
        help="version directory, or a version's name in --model-dir when no such path exists "
        "(`publish 3`; default: the latest)",
    )
    p.add_argument(
        "--keep",
        type=int,
        default=2,
        help="published versions to keep in Redis (default %(default)s)",
    )
    p.add_argument(
        "--keep-dirs",
        type=int,
        default=0,
        metavar="N",
        help="after switching, delete version directories older than the N newest "
        "(pinned and not-yet-published ones stay; 0: delete none)",
    )
    p.add_argument(
        "--rollback",
        action="store_true",
        help="allow publishing a version older than the one Redis serves (moves the services back)",
    )
    p.add_argument(
        "--no-switch",
        action="store_true",
        help="write the version's top lists only, for an A/B arm or pinned_version that "
        "serves it beside the current one (the config must pin it); the pointer and "
        "users' state stay",
    )
    p.add_argument(
        "--replace-user-state",
        action="store_true",
        help="replace every user's stored aggregates with this version's, even where a "
        "newer version wrote them (a model dir started over); `recsys up` passes it "
        "after it trains",
    )
    p.add_argument(
        "--if-unpublished",
        action="store_true",
        help="do nothing when Redis already names a current version the model dir holds "
        "(bootstrap: finishes a first run whose training succeeded but whose publish did "
        "not); a version it does not hold (a recreated model store) is published over, "
        "as with --rollback --replace-user-state",
    )

    p = sub.add_parser(
        "export-interactions",
        help="write the ratings recorded online to a directory, for `train --interactions`",
        description="Reads every user's interaction log in Redis (what RecordInteraction "
        "recorded) and writes a new export, DIR/<cutoff_ms>/ratings.csv with the cutoff in "
        "DIR/<cutoff_ms>/export.json, which appears whole or not at all: every rating of the "
        "newest previous export in DIR (so a rating stays exported after newer interactions "
        "pushed it out of its capped log), then the logs' ratings from before now that it "
        "lacks. Unrated watches are left out (publish keeps replaying them), and so are "
        "malformed entries (counted). The logs are not changed.",
    )
    _common(p, redis_url=True)
    p.add_argument("out", type=Path, metavar="DIR", help="directory of the exports")
    p.add_argument(
        "--keep",
        type=int,
        default=3,
        metavar="N",
        help="exports to keep in DIR, this one included; older ones are deleted, the "
        "newest holds their ratings (default %(default)s)",
    )
    p.add_argument("--quiet", action="store_true", help="no summary line")

    p = sub.add_parser("serve", help="run a gRPC service")
    serve = p.add_subparsers(dest="service", required=True, metavar="SERVICE")
    for name, what in (
        ("retrieval", "candidate sources, SimilarItems and RecordInteraction"),
        ("ranking", "Rank and Recommend with the two-tower model"),
    ):
        sp = serve.add_parser(name, help=f"serve {what}", description=f"Serves {what}.")
        _common(sp, model_dir=True, redis_url=True, log_level=True)
        sp.add_argument("--host", help="bind address (IPv6: :: or ::1, brackets optional)")
        sp.add_argument("--port", type=int, help="gRPC port (0 = any free port)")
        sp.add_argument("--metrics-port", type=int, help="Prometheus port (0 = off)")
        sp.add_argument("--port-file", type=Path, help="write the bound port here once serving")
        sp.add_argument("--workers", type=int, help="server processes sharing the port (default 1)")
        if name == "ranking":
            sp.add_argument(
                "--device",
                choices=["auto", "cpu", "gpu"],
                help=_setting_help("ranking", "device", "where scoring runs; auto: a visible GPU"),
            )
            sp.add_argument(
                "--retrieval-address",
                help="host:port of the retrieval service ([::1]:PORT for IPv6)",
            )

    p = sub.add_parser(
        "up",
        help="run the whole system on this machine",
        description="Starts Redis (embedded unless RECSYS_REDIS_URL is set), trains (on "
        "--data, else the built-in dataset) when no version exists or the newest was "
        "trained on other data than --data names, publishes it, starts both services and "
        "waits for them to be SERVING (over TLS: listening). A configured port that is in "
        "use is refused before anything starts; port 0 picks a free one, and up prints the "
        "`recsys recommend --target ...` that reaches it.",
    )
    _common(p, model_dir=True, redis_url=True, log_level=True)
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--demo", action="store_true", help="print recommendations, then stop")
    p.add_argument(
        "--retrain", action="store_true", help="train even if a version of the same data exists"
    )

    p = sub.add_parser(
        "recommend",
        help="ask the ranking service for recommendations",
        description="Calls RankingService.Recommend and prints a table (or JSON).",
    )
    _common(p)
    p.add_argument("--user", required=True, help="user id")
    p.add_argument(
        "--k",
        type=_non_negative_int32,
        default=0,
        help="items to return (0: the server's default_k)",
    )
    p.add_argument("--target", help="ranking service address (default from config)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--debug", action="store_true", help="include per-item debug scores")
    p.add_argument("--variant", default="", help="force an experiment variant (debugging)")
    _client_tls_flags(p)

    p = sub.add_parser(
        "loadtest",
        help="generate gRPC load and report latency percentiles",
        description="Closed-loop (concurrency) or open-loop (fixed rate, latency from the "
        "intended send time) load against one RPC.",
    )
    _common(p, model_dir=True, redis_url=True)
    p.add_argument("--rpc", choices=["Recommend", "Rank", "Retrieve", "SimilarItems"],
                   default="Recommend", help="the RPC to load (default %(default)s)")  # fmt: skip
    p.add_argument("--target", help="host:port (default: the service that owns --rpc)")
    p.add_argument(
        "--concurrency",
        type=int,
        help="closed loop: calls kept in flight (default 16); open loop: the most in flight "
        "at once (default 512; it must exceed rate x latency, or calls wait for a slot)",
    )
    p.add_argument("--rate", type=float, help="open loop: requests per second")
    p.add_argument(
        "--duration",
        type=float,
        help="stop starting requests after this many seconds (default 10 unless --requests)",
    )
    p.add_argument("--requests", type=int, help="stop after this many requests")
    p.add_argument(
        "--users",
        choices=["uniform", "zipf"],
        default="uniform",
        help="how request users (SimilarItems: items) are drawn from the served version's "
        "(default %(default)s)",
    )
    p.add_argument(
        "--candidates",
        type=_non_negative_int32,
        default=1000,
        help="candidate list size for Rank (default %(default)s)",
    )
    p.add_argument(
        "--k",
        type=_non_negative_int32,
        default=20,
        help="items per answer: Recommend's k, Rank's top_k, SimilarItems' k (default %(default)s)",
    )
    p.add_argument(
        "--variant", default="", help="force this A/B variant on every request (one arm's load)"
    )
    p.add_argument("--unpacked", action="store_true",
                   help="Retrieve: one Candidate message per item with score maps (an older "
                   "client) instead of the packed answer the ranking service asks for")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _client_tls_flags(p)
    return parser


def _settings_for(args: argparse.Namespace) -> RecsysSettings:
    overrides: dict = {}
    # A flag given empty (an unset variable in a script) is checked like any
    # value, not taken for no flag: `--redis-url ""` published to the default.
    for name in ("model_dir", "redis_url", "log_level"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    return load_settings(getattr(args, "config", None), **overrides)


def _resolve(key: str) -> Callable[[argparse.Namespace, RecsysSettings], int]:
    module, func = _HANDLERS[key].split(":")
    return getattr(importlib.import_module(module), func)


def _non_negative_int32(text: str) -> int:
    """An argparse type for a proto int32 count (a larger one fails to encode)."""
    value = int(text)
    if not 0 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"{value} is outside 0..{2**31 - 1}")
    return value


# Options that go into a request (a protobuf string field must be UTF-8).
# Paths (--data csv:DIR, a unix:// Redis URL) may be any bytes on Linux.
_REQUEST_TEXT = ("user", "variant", "target")


def _undecodable_argument(args: argparse.Namespace) -> str | None:
    """The first request option holding bytes that are not UTF-8, as ``--its-name``."""
    for name in _REQUEST_TEXT:
        value = getattr(args, name, None)
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return f"--{name}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``recsys`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if bad := _undecodable_argument(args):
        # Bytes the terminal's encoding could not decode arrive as lone
        # surrogates: a request field (or a name in a manifest) cannot carry them.
        parser.error(f"argument {bad}: not valid UTF-8 text")
    # Kept so a multi-worker service can start its workers with the same command line.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    key = args.command if args.command != "serve" else f"serve {args.service}"
    try:
        settings = _settings_for(args)
    except ConfigError as exc:
        print(f"recsys: {exc}", file=sys.stderr)
        return 2
    try:
        return int(_resolve(key)(args, settings) or 0)
    except KeyboardInterrupt:
        return 130
    except UserFacingError as exc:
        print(f"recsys {key}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
