"""``sunjax cluster``: a whole cluster from one YAML file, or one of its roles.

    sunjax cluster --config configs/cluster/tiny-sun.yaml               # every role, this host
    sunjax cluster --config FILE --role frontend                        # the HTTP frontend
    sunjax cluster --config FILE --role decode --name d1                # one instance

Without ``--role`` the launcher starts the frontend and every instance as child processes,
forwards SIGTERM / SIGINT to them, and exits when the frontend does. On several hosts, run
the frontend on one and ``--role prefill|decode --name N`` on the others, with the YAML's
``host`` set to each machine's address and ``frontend: {host: ...}`` to the frontend's.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time

from serve.cluster.config import ClusterConfig, DecodeSpec, load_cluster_config

log = logging.getLogger("sunjax.cluster")
ROLES = ("frontend", "prefill", "decode")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="sunjax cluster", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="the cluster YAML (configs/cluster/)")
    ap.add_argument("--role", choices=ROLES, default=None, help="run one role (default: all)")
    ap.add_argument("--name", default=None, help="the instance to run (prefill / decode)")
    ap.add_argument("--export", default=None, help="override the YAML's export directory")
    ap.add_argument(
        "--reprefill-lost",
        action="store_true",
        help="re-run a lost instance's requests on the survivors (YAML: reprefill_lost: true)",
    )
    args = ap.parse_args(argv)
    if args.role in ("prefill", "decode") and not args.name:
        ap.error(f"--role {args.role} needs --name")
    return args


def run_frontend(config: ClusterConfig) -> int:
    import uvicorn

    from serve.cluster.frontend import ClusterScheduler
    from serve.server.app import build_app
    from serve.server.main import DrainingServer
    from serve.server.metrics import Metrics
    from serve.server.models import Model, ModelSet, describe_quant
    from serve.server.runtime import Runtime
    from sunjax.config import ModelConfig
    from sunjax.export import read_manifest
    from sunjax.tokenizer import eos_ids, load_tokenizer

    metrics = Metrics()

    def setup():
        manifest = read_manifest(config.export)
        cfg = ModelConfig.from_dict(manifest["model_config"])
        tok = load_tokenizer(manifest["tokenizer"]) if manifest.get("tokenizer") else None
        eos = tuple(eos_ids(tok)) if tok is not None else ()
        ms = ModelSet(
            cfg=cfg,
            decode=None,  # held by the decode instances
            decode_fingerprint=manifest["decode_fingerprint"],
            quantization=describe_quant(manifest.get("decode_quant")),
            tokenizer=tok,
            eos_ids=eos,
            models={t: Model(t, None, config.export) for t in config.tasks},
        )
        sched = ClusterScheduler(config, cfg, tokenizer=tok, eos_ids=eos, metrics=metrics)
        return ms, sched

    runtime = Runtime(setup, metrics=metrics, policy=config.policy)
    app = build_app(
        runtime,
        allow_model_management=config.allow_model_management,
        export_root=config.export_root,
    )
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            log_config=None,
            lifespan="on",
        ),
        runtime,
        drain_timeout=10.0,
    )
    server.run()
    return 1 if runtime.sched is None and runtime.error is not None else 0


def run_instance(config: ClusterConfig, name: str, role: str) -> int:
    from serve.cluster.instances import DecodeInstance, PrefillInstance

    spec = config.instance(name)
    is_decode = isinstance(spec, DecodeSpec)
    if is_decode != (role == "decode"):
        raise ValueError(f"instance {name!r} is not a {role} instance in the cluster config")
    (DecodeInstance if is_decode else PrefillInstance)(config, spec).serve()
    return 0


def children(args: argparse.Namespace, config: ClusterConfig) -> list[list[str]]:
    base = [sys.executable, "-m", "sunjax.cli", "cluster", "--config", args.config]
    if args.export:
        base += ["--export", args.export]
    if args.reprefill_lost:
        base += ["--reprefill-lost"]
    cmds = [base + ["--role", "frontend"]]
    cmds += [base + ["--role", "prefill", "--name", s.name] for s in config.prefill]
    cmds += [base + ["--role", "decode", "--name", s.name] for s in config.decode]
    return cmds


def run_all(args: argparse.Namespace, config: ClusterConfig) -> int:
    procs = [subprocess.Popen(cmd) for cmd in children(args, config)]
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    frontend, running = procs[0], set(range(1, len(procs)))
    while frontend.poll() is None:
        for i in sorted(running):
            if procs[i].poll() is not None:  # reaped; the frontend sees it stop heartbeating
                running.discard(i)
                log.warning("%s exited with %s", " ".join(procs[i].args[-4:]), procs[i].returncode)
        time.sleep(0.2)
    stop()
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return frontend.returncode if not stopping else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_cluster_config(
            args.config, export=args.export, reprefill_lost=args.reprefill_lost or None
        )
    except (OSError, ValueError, TypeError) as e:
        print(f"sunjax cluster: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s {args.name or args.role or 'launcher'} %(levelname)s %(message)s",
        force=True,
    )
    if args.role is None:
        return run_all(args, config)
    if args.role == "frontend":
        return run_frontend(config)
    try:
        return run_instance(config, args.name, args.role)
    except ValueError as e:
        print(f"sunjax cluster: {e}", file=sys.stderr)
        return 2
