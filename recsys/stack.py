"""``recsys up``: the whole system on one machine.

Starts Redis (embedded unless ``RECSYS_REDIS_URL``/``--redis-url`` names
one), trains on the built-in synthetic dataset when no version exists (or on
``--data``), publishes it, starts the retrieval and ranking services as
separate processes, waits for both to report SERVING through the standard
health service and prints where they listen. ``--demo`` prints
recommendations for a few users and shuts everything down; otherwise the
stack runs until Ctrl-C or SIGTERM, and every child is stopped on the way
out (children also get SIGTERM if this process dies, via
``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.artifacts import latest_version, open_version
from recsys.config import CONFIG_ENV, RecsysSettings, grpc_address
from recsys.embedded_redis import EmbeddedRedis, RedisDirBusy, die_with_parent_prefix, free_port
from recsys.errors import UserFacingError


def _port_free(host: str, port: int) -> bool:
    """False when something holds ``port`` on any address ``host`` names here.

    Raises:
        UserFacingError: ``host`` is no address of this machine (a name that
            does not resolve, another machine's IP): binding would fail later,
            after training, whatever the port.
    """
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise UserFacingError(f"host {host!r} does not resolve here: {exc.strerror}") from None
    failure = None
    bindable = False
    for family, kind, proto, _name, address in addresses:
        with socket.socket(family, kind, proto) as s:
            # As gRPC binds: a port an old stack's connections leave in TIME_WAIT
            # is free to it, only one something listens on (or holds) is not.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return False
                # gRPC serves on the addresses it can bind ("localhost" may
                # name an ::1 this machine lacks): only none at all is fatal.
                failure = exc
            else:
                bindable = True
    if not bindable:
        why = failure.strerror if failure is not None else "no address"
        raise UserFacingError(
            f"cannot listen on {host!r} here: {why} (is it an address of this machine?)"
        )
    return True


def _ports(settings: RecsysSettings, *, any_free: bool) -> tuple[int, int]:
    """The retrieval and ranking ports ``up`` serves on: the configured ones, checked.

    Port 0 means any free port. A configured port that is taken is refused
    before anything starts: moving the service elsewhere left ``recsys
    recommend``, which dials the configured one, failing or talking to an
    old stack. ``any_free`` (the demo, whose own client is told the address)
    moves instead.

    Raises:
        UserFacingError: Naming the service, the port and the ways out.
    """
    r, k = settings.retrieval, settings.ranking
    if r.port and r.port == k.port:
        raise UserFacingError(
            f"retrieval and ranking are both configured on port {r.port}: give them "
            "different ports (or 0 for any free one)"
        )
    picked: list[int] = []
    for name, server in (("retrieval", r), ("ranking", k)):
        port = server.port
        if port and not _port_free(server.host, port):
            if not any_free:
                raise UserFacingError(
                    f"{name} port {port} on {server.host} is in use (another `recsys up`?): "
                    f"stop what holds it, or set [{name}] port = 0 "
                    f"(RECSYS_{name.upper()}__PORT=0) for any free port"
                )
            port = 0
        picked.append(port)  # 0: any free one, picked just before the services start
    return picked[0], picked[1]


def _free_ports(r_port: int, k_port: int) -> tuple[int, int]:
    """``_ports``' answer with each 0 replaced by a free port, the two distinct.

    Picked right before the services bind them, not before training: a port
    free minutes earlier may be anyone's by then.
    """
    r, k = r_port, k_port
    # Loops only for a 0 (configured ports differ: _ports refuses one for both),
    # and a configured port looks free here, since nothing has bound it yet.
    while not r or r == k_port:
        r = free_port()
    while not k or k == r:
        k = free_port()
    return r, k


def _check_hop(settings: RecsysSettings) -> None:
    """Refuses a config whose ranking could not reach its own retrieval.

    ``up`` starts both services from the one config, so the hop's client
    side (``ranking.retrieval_*``) must match retrieval's server side. A
    mismatch did not stop either service from reporting SERVING: every
    Recommend was the popular fallback (``UNAUTHENTICATED`` or
    ``UNAVAILABLE``), and ``up`` said all was well.

    Raises:
        UserFacingError: Naming the settings on both sides.
    """
    r, k = settings.retrieval, settings.ranking
    token = r.auth_token.get_secret_value() if r.auth_token else None
    sent = k.retrieval_auth_token.get_secret_value() if k.retrieval_auth_token else None
    hop_tls = k.retrieval_tls.ca_file is not None or k.retrieval_tls.enabled
    problems = []
    if token is not None and sent != token:
        how = "is not set" if sent is None else "differs"
        problems.append(
            f"retrieval.auth_token is set but ranking.retrieval_auth_token {how}: set it to "
            "the same token (RECSYS_RANKING__RETRIEVAL_AUTH_TOKEN)"
        )
    if r.tls.enabled and not hop_tls:
        problems.append(
            "retrieval.tls is on but ranking.retrieval_tls is not: set "
            "ranking.retrieval_tls.ca_file to the CA of retrieval.tls.cert_file"
        )
    elif r.tls.require_client_cert and not k.retrieval_tls.enabled:
        problems.append(
            "retrieval.tls.require_client_cert is on but ranking.retrieval_tls has no "
            "cert_file/key_file for ranking to present"
        )
    if hop_tls and not r.tls.enabled:
        problems.append(
            "ranking.retrieval_tls is set but retrieval.tls is off: ranking would speak "
            "TLS to a plaintext retrieval"
        )
    if problems:
        raise UserFacingError(
            "ranking could not call retrieval (every Recommend would be the popular "
            f"fallback): {'; '.join(problems)}"
        )


def recommend_hint(address: str, config_file: Path | None, tls: bool) -> str:
    """The ``recsys recommend`` command line that reaches the ranking service at ``address``."""
    cmd = ["recsys", "recommend", "--target", address]
    if config_file is not None:
        # The file holds the token (and TLS) the service asks for.
        cmd += ["--config", str(config_file)]
    if tls:
        cmd += ["--tls-ca", "CA_FILE"]
    return shlex.join([*cmd, "--user", "42", "--k", "10"])


def _exited(service: str, proc: subprocess.Popen, log: Path | None) -> UserFacingError:
    """The error for a service that exited while starting, with the end of its log.

    Its own message (a config key it refuses, a port in use) is in that log:
    a bare exit code sent the user hunting for a temporary directory.
    """
    return _with_log(f"{service} exited with code {proc.returncode}", log)


def _with_log(what: str, log: Path | None) -> UserFacingError:
    """``what`` went wrong with a service, and the end of its log, where the reason is."""
    if log is not None:
        what += f"; its log ({log}) ends with:\n{_tail(log)}"
    return UserFacingError(what)


def _tail(log: Path, n: int = 8) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"  (unreadable: {exc})"
    return "\n".join(f"  {line}" for line in lines[-n:] if line.strip()) or "  (empty)"


def wait_serving(
    address: str,
    service: str,
    timeout_s: float,
    proc: subprocess.Popen,
    log: Path | None = None,
) -> None:
    """Polls ``grpc.health.v1.Health/Check`` until SERVING, or raises."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise _exited(service, proc, log)
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise _with_log(f"{service} at {address} was not SERVING after {timeout_s:.0f}s", log)


def _wait_file(
    path: Path, timeout_s: float, proc: subprocess.Popen, service: str, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise _exited(service, proc, log)
        if time.monotonic() > deadline:
            raise _with_log(f"{service} did not report its port after {timeout_s:.0f}s", log)
        time.sleep(0.1)


@dataclass
class Stack:
    """Running processes of a local stack; ``stop()`` ends all of them."""

    redis_url: str
    retrieval_address: str
    ranking_address: str
    model_dir: Path
    redis: EmbeddedRedis | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)  # each service's log, as procs

    # How long stop() waits for the services' own drain before it kills them
    # (``drain_time_s``, from their settings; 10 s when not known).
    drain_s: float = 10.0

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM every service (they drain), wait, then kill stragglers; stop Redis.

        Args:
            grace_s: How long to wait for them; default :attr:`drain_s`. A
                supervisor killed before its workers' drain ended left a
                worker running after ``up`` said "stopped".
        """
        grace_s = self.drain_s if grace_s is None else grace_s
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


def drain_time_s(settings: RecsysSettings) -> float:
    """Longest either service may take from SIGTERM to exit, with a margin.

    Its own drain (``drain_delay_s`` + ``grace_s``), plus the margin a
    multi-worker supervisor gives its workers beyond that, plus a margin.
    """
    from recsys.serving import STOP_MARGIN_S

    longest = 0.0
    for server in (settings.retrieval, settings.ranking):
        extra = STOP_MARGIN_S if server.workers > 1 else 0.0
        longest = max(longest, server.drain_delay_s + server.grace_s + extra)
    return longest + STOP_MARGIN_S


def _recsys(*args: str) -> list[str]:
    return [sys.executable, "-m", "recsys.cli", *args]


# How long a step stopped early (Ctrl-C, SIGTERM) may take to unwind: the
# trainer removes its temporary export directory on SIGTERM.
STEP_STOP_S = 30.0
SAME_SIGNAL_WAIT_S = 2.0


def run_step(cmd: list[str], env: dict[str, str], stop_s: float = STEP_STOP_S) -> None:
    """Runs one set-up step (train, publish) to completion.

    Interrupted, it sends the step SIGTERM and waits up to ``stop_s`` before
    killing it. ``subprocess.run`` kills at once, so a trainer stopped that way
    left its temporary export directory behind.

    Raises:
        subprocess.CalledProcessError: The step exited non-zero.
    """
    proc = subprocess.Popen([*die_with_parent_prefix(), *cmd], env=env)
    try:
        code = proc.wait()
    except BaseException:
        try:
            # A Ctrl-C in a terminal reached the step too (one process group):
            # a SIGTERM on top would interrupt its own clean-up.
            proc.wait(SAME_SIGNAL_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(stop_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise
    if code:
        raise subprocess.CalledProcessError(code, cmd)


def start_stack(
    settings: RecsysSettings,
    *,
    data: str | None = None,
    retrain: bool = False,
    redis_url: str | None = None,
    quiet: bool = False,
    health_timeout_s: float = 120.0,
    log_dir: Path | None = None,
    config_file: Path | None = None,
    any_free_port: bool = False,
) -> Stack:
    """Brings the whole system up and returns once both services are SERVING.

    Args:
        settings: Loaded configuration (model dir, ports).
        data: Dataset spec for training (default: the built-in synthetic one).
        retrain: Train even when a version exists.
        redis_url: External Redis; None starts the embedded one.
        quiet: Less progress output (tests).
        health_timeout_s: How long to wait for SERVING.
        log_dir: Where service logs go (default: a temporary directory).
        config_file: The TOML file ``settings`` came from: every child (train,
            publish, both services) reads it too, so its tokens, TLS, sources
            and trainer settings apply to the whole stack.
        any_free_port: Move a service whose configured port is in use to a
            free one instead of refusing (for callers that dial
            ``Stack.ranking_address`` themselves, like the demo).

    Raises:
        UserFacingError: The ranking→retrieval hop's settings do not match
            retrieval's (token, TLS) or a configured (non-zero) port is in use
            (both before anything starts; the port unless ``any_free_port``),
            or a service did not come up.
        subprocess.CalledProcessError: Training or publishing failed.
    """
    say = (lambda *_a: None) if quiet else (lambda *a: print(*a, flush=True))
    _check_hop(settings)
    r_port, k_port = _ports(settings, any_free=any_free_port)
    model_dir = Path(settings.model_dir).resolve()
    redis = None
    if redis_url is None:
        redis_dir = model_dir.parent / "redis"
        try:
            redis = EmbeddedRedis(data_dir=redis_dir).start()
        except RedisDirBusy:
            # Another `up` beside this one (the README's demo next to a running
            # stack): sharing its append-only file would lose both stacks' writes.
            redis = EmbeddedRedis().start()
            say(
                f"[1/4] {redis_dir} is another running stack's Redis data: this one "
                "keeps its data in a temporary directory until it stops"
            )
        redis_url = redis.url
        say(f"[1/4] embedded Redis on {redis_url}")
    else:
        say("[1/4] using external Redis from RECSYS_REDIS_URL")
    stack = Stack(redis_url, "", "", model_dir, redis, drain_s=drain_time_s(settings))
    try:
        env = {
            **os.environ,
            "RECSYS_REDIS_URL": redis_url,
            "RECSYS_MODEL_DIR": str(model_dir),
            "RECSYS_LOG_FORMAT": settings.log_format,
            "RECSYS_LOG_LEVEL": settings.log_level,
            # TensorFlow's C++ start-up chatter (CUDA probing on CPU-only
            # machines, oneDNN notices) drowns the progress lines otherwise.
            "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
        }
        if config_file is not None:
            env[CONFIG_ENV] = str(Path(config_file).resolve())
        latest = latest_version(model_dir)
        other = (
            data is not None and latest is not None and not _trained_on(model_dir / latest, data)
        )
        if other:
            say(f"[2/4] version {latest} was trained on other data than {data}")
        trained = retrain or latest is None or other
        if trained:
            say(f"[2/4] training on {data or 'the built-in synthetic dataset'} → {model_dir}")
            cmd = _recsys("train", "--data", data or "synthetic", "--no-plots")
            if quiet:
                cmd.append("--quiet")
            run_step(cmd, env)
        else:
            say(f"[2/4] using existing version {latest} in {model_dir}")
        say("[3/4] publishing to Redis")
        # The embedded Redis is this command's own: the model dir is the truth,
        # so a newer version it still names (the model dir was emptied and
        # trained again) must not refuse the publish, as it would another's.
        flags = ["--rollback"] if redis is not None else []
        if trained:
            # This run's training is the truth for users too, even numbered
            # below what Redis holds (a model dir emptied and trained again).
            flags.append("--replace-user-state")
        run_step(_recsys("publish", *flags), env)

        logs = log_dir or Path(tempfile.mkdtemp(prefix="recsys-logs-"))
        logs.mkdir(parents=True, exist_ok=True)
        # The services bind the configured hosts; local clients (the demo,
        # ranking's retrieval hop, `recommend`) dial them as local_address does.
        r, k = settings.retrieval, settings.ranking
        r_port, k_port = _free_ports(r_port, k_port)
        stack.retrieval_address = grpc_address(r.dial_host, r_port)
        stack.ranking_address = grpc_address(k.dial_host, k_port)
        services = [
            (
                "retrieval",
                "recsys.v1.RetrievalService",
                stack.retrieval_address,
                ["--host", r.host, "--port", str(r_port), "--metrics-port", "0"],
                r.tls.enabled,
            ),
            (
                "ranking",
                "recsys.v1.RankingService",
                stack.ranking_address,
                [
                    "--host", k.host, "--port", str(k_port), "--metrics-port", "0",
                    "--retrieval-address", stack.retrieval_address,
                ],
                k.tls.enabled,
            ),
        ]  # fmt: skip
        say(f"[4/4] starting services (logs in {logs})")
        started = []
        for name, service, address, extra, tls in services:
            log = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the child
            port_file = logs / f"{name}.port"
            port_file.unlink(missing_ok=True)
            cmd = _recsys("serve", name, *extra)
            proc = subprocess.Popen(
                [*die_with_parent_prefix(), *cmd, "--port-file", str(port_file)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            stack.procs.append(proc)
            stack.logs.append(logs / f"{name}.log")
            started.append((service, address, proc, port_file, tls, logs / f"{name}.log"))
        for service, address, proc, port_file, tls, log_path in started:
            # With several workers per service the port file appears only once
            # every worker is SERVING; a health check reaches just one of them.
            _wait_file(port_file, health_timeout_s, proc, service, log_path)
            if not tls:
                # Over TLS the port file is the signal: this process may not
                # hold the CA that signed the service's certificate.
                wait_serving(address, service, health_timeout_s, proc, log_path)
        for name, address, tls in (
            ("retrieval", stack.retrieval_address, settings.retrieval.tls.enabled),
            ("ranking  ", stack.ranking_address, settings.ranking.tls.enabled),
        ):
            # Over TLS the health check is skipped: listening, not known SERVING.
            say(f"{name} {'listening (TLS)' if tls else 'SERVING'} on {address}")
        if k_port != settings.ranking.port:
            cfg = Path(config_file).resolve() if config_file is not None else None
            hint = recommend_hint(stack.ranking_address, cfg, settings.ranking.tls.enabled)
            say(f"ranking was given a free port; ask it with: {hint}")
        return stack
    except BaseException:
        stack.stop()
        raise


def _trained_on(version: Path, data: str) -> bool:
    """True when ``version``'s manifest records ``data`` as its dataset (as typed or resolved)."""
    try:
        info = json.loads((version / "manifest.json").read_text()).get("dataset", {})
    except (OSError, ValueError):
        return False
    known = {info.get("spec"), info.get("source")}
    kind, sep, arg = data.strip().partition(":")
    resolved = f"{kind}:{Path(arg).expanduser().resolve()}" if sep and kind != "synthetic" else data
    return bool({data.strip(), resolved} & known)


def demo_users(model_dir: Path, n: int = 3) -> list[str]:
    """A few known users to show recommendations for."""
    users = open_version(model_dir).users.get("user_id", [])
    return list(users[:n])


def run_demo(stack: Stack, n_users: int = 3, k: int = 10, *, token: str | None = None) -> None:
    """Prints recommendations for a few known users and one cold-start user.

    Raises:
        UserFacingError: The ranking service refused or failed a call.
    """
    from recsys.client import RecommenderClient, format_table

    try:
        with RecommenderClient(
            stack.ranking_address, stack.retrieval_address, timeout_s=10, token=token
        ) as rc:
            for uid in demo_users(stack.model_dir, n_users):
                print()
                print(format_table(rc.recommend(uid, k=k), title=f"user {uid}"))
            print()
            cold = rc.recommend("new-visitor", k=k)
            print(format_table(cold, title="a user the system has never seen (cold start)"))
    except grpc.RpcError as exc:
        raise UserFacingError(
            f"the demo's Recommend failed: {exc.code().name} {exc.details()}"
        ) from None


def watch(stack: Stack, stopped: Callable[[], bool], poll_s: float = 0.5) -> int:
    """Waits until ``stopped()`` (0) or a process of the stack exits on its own (1)."""
    while not stopped():
        for i, p in enumerate(stack.procs):
            if p.poll() is not None:
                where = ""
                if i < len(stack.logs):
                    where = f"; its log ({stack.logs[i]}) ends with:\n{_tail(stack.logs[i])}"
                print(
                    f"a service exited with code {p.returncode}{where}\nstopping", file=sys.stderr
                )
                return 1
        # Without its Redis every answer would be degraded, silently.
        r = stack.redis.proc if stack.redis is not None else None
        if r is not None and r.poll() is not None:
            print(f"the embedded Redis exited with code {r.returncode}; stopping", file=sys.stderr)
            return 1
        time.sleep(poll_s)
    return 0


def _interrupt(*_a: object) -> None:
    raise KeyboardInterrupt


def cli_up(args, settings: RecsysSettings) -> int:
    """``recsys up [--demo] [--data SPEC] [--retrain]``."""
    # A Redis named anywhere (flag, environment, config file) is used; else an embedded one.
    named = "redis_url" in settings.model_fields_set
    redis_url = settings.redis_url.get_secret_value() if named else None
    config_file = args.config or os.environ.get(CONFIG_ENV)
    if args.demo and settings.ranking.tls.enabled:
        # The stack comes up over TLS, but the demo's client holds no CA for
        # the ranking service's certificate: it failed after training.
        raise UserFacingError(
            "recsys up --demo does not speak TLS (ranking.tls is on): run `recsys up`, "
            "then `recsys recommend --tls-ca CA_FILE ...` against it"
        )
    # From the first step: a SIGTERM while training must stop (and clean up) too.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        stack = start_stack(
            settings,
            data=args.data,
            retrain=args.retrain,
            redis_url=redis_url,
            config_file=Path(config_file) if config_file else None,
            # The demo asks the stack where it is; a busy configured port moves.
            any_free_port=args.demo,
        )
    except subprocess.CalledProcessError as exc:
        step = " ".join(exc.cmd[exc.cmd.index("recsys.cli") + 1 :])
        raise UserFacingError(f"step failed: {step} (exit {exc.returncode})") from None
    try:
        if args.demo:
            token = settings.ranking.auth_token
            run_demo(stack, token=token.get_secret_value() if token else None)
            return 0
        print("stack is up; Ctrl-C stops it")
        stopped = False

        def _stop(*_a: object) -> None:
            nonlocal stopped
            stopped = True

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        return watch(stack, lambda: stopped)
    finally:
        print("stopping services…", flush=True)
        stack.stop()
        print("stopped")
