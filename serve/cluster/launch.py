"""``sunjax cluster``: a whole cluster from one YAML file, or one of its roles.

    sunjax cluster --config configs/cluster/tiny-sun.yaml               # every role, this host
    sunjax cluster --config FILE --role frontend                        # the HTTP frontend
    sunjax cluster --config FILE --role decode --name d1                # one instance
    sunjax cluster --config FILE --role decode --name d0 --process-id 1 \
        --coordinator-port 7000            # one process of a decode instance over processes

Without ``--role`` the launcher starts the frontend and every instance as child processes,
forwards SIGTERM / SIGINT to them, and exits when the frontend does. On several hosts, run
the frontend on one and ``--role prefill|decode --name N`` on the others, with the YAML's
``host`` set to each machine's address and ``frontend: {host: ...}`` to the frontend's.

A decode instance with ``processes: N`` is N processes (one JAX mesh): the launcher starts
them with ``--process-id 0..N-1`` and one ``--coordinator-port`` (the YAML's, or a free one).
``--role decode --name d0`` without ``--process-id`` starts the whole group on this host (a
restart); when one of its processes exits, the launcher stops the rest of the group.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
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
    ap.add_argument(
        "--process-id",
        type=int,
        default=None,
        help="a decode instance over several processes: run only this one (0 = the leader)",
    )
    ap.add_argument(
        "--coordinator-port",
        type=int,
        default=0,
        help="its jax.distributed coordinator port (when the YAML's coordinator_port is 0)",
    )
    args = ap.parse_args(argv)
    if args.role in ("prefill", "decode") and not args.name:
        ap.error(f"--role {args.role} needs --name")
    if args.process_id is not None and args.role != "decode":
        ap.error("--process-id is for --role decode")
    return args


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


def run_instance(
    config: ClusterConfig,
    name: str,
    role: str,
    process_id: int | None = None,
    coordinator_port: int = 0,
) -> int:
    spec = config.instance(name)
    is_decode = isinstance(spec, DecodeSpec)
    if is_decode != (role == "decode"):
        raise ValueError(f"instance {name!r} is not a {role} instance in the cluster config")
    if not is_decode:
        from serve.cluster.instances import PrefillInstance

        PrefillInstance(config, spec).serve()
        return 0
    if spec.processes > 1 and process_id is None:
        raise ValueError("unreachable: main() runs the group")
    from serve.cluster.group import join

    join(config, spec, process_id, coordinator_port)  # before JAX touches a device
    from serve.cluster.instances import DecodeInstance, FollowerInstance

    if spec.processes == 1:
        DecodeInstance(config, spec).serve()
    elif process_id == 0:
        DecodeInstance(config, spec, group=True).serve()
    else:
        FollowerInstance(config, spec).serve()
    return 0


def group_commands(base: list[str], config: ClusterConfig, spec: DecodeSpec) -> list[list[str]]:
    """The commands of decode instance ``spec``'s processes (one, or a group)."""
    cmd = base + ["--role", "decode", "--name", spec.name]
    if spec.processes == 1:
        return [cmd]
    port = spec.coordinator_port or free_port(spec.host or config.host)
    return [
        cmd + ["--process-id", str(i), "--coordinator-port", str(port)]
        for i in range(spec.processes)
    ]


def base_command(args: argparse.Namespace) -> list[str]:
    base = [sys.executable, "-m", "sunjax.cli", "cluster", "--config", args.config]
    if args.export:
        base += ["--export", args.export]
    if args.reprefill_lost:
        base += ["--reprefill-lost"]
    return base


def run_group(args: argparse.Namespace, config: ClusterConfig, spec: DecodeSpec) -> int:
    """Every process of a multi-process decode instance, as children; when one exits the
    instance is lost: the others are stopped too (run the command again to restart it)."""
    procs = [subprocess.Popen(cmd) for cmd in group_commands(base_command(args), config, spec)]

    def stop(*_):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while all(p.poll() is None for p in procs):
        time.sleep(0.2)
    _reap(procs, config.group_timeout_s + 5)  # the others exit on their own, else killed
    return max(abs(p.returncode or 0) for p in procs)


def _reap(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def children(args: argparse.Namespace, config: ClusterConfig) -> list[list[str]]:
    base = base_command(args)
    cmds = [base + ["--role", "frontend"]]
    cmds += [base + ["--role", "prefill", "--name", s.name] for s in config.prefill]
    for s in config.decode:
        cmds += group_commands(base, config, s)
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
    name = lambda p: p.args[p.args.index("--name") + 1] if "--name" in p.args else ""
    stragglers: dict[int, float] = {}  # a lost group's other processes -> when to kill them
    while frontend.poll() is None:
        for i in sorted(running):
            if procs[i].poll() is not None:  # reaped; the frontend sees it stop heartbeating
                running.discard(i)
                log.warning("%s exited with %s", " ".join(procs[i].args[-8:]), procs[i].returncode)
                # a process of a multi-process decode instance: the instance is lost; its
                # other processes exit on their own (a failed collective, group_timeout_s),
                # else they are killed a little after that
                for j in running:
                    if name(procs[j]) == name(procs[i]) and "--process-id" in procs[j].args:
                        stragglers.setdefault(j, time.monotonic() + config.group_timeout_s + 5)
        for j, when in list(stragglers.items()):
            if procs[j].poll() is not None or time.monotonic() > when:
                if procs[j].poll() is None:
                    log.warning("%s outlived its group; killed", " ".join(procs[j].args[-8:]))
                    procs[j].kill()
                del stragglers[j]
        time.sleep(0.2)
    stop()
    _reap(procs, 15)
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
        spec = config.instance(args.name)
        if isinstance(spec, DecodeSpec) and spec.processes > 1 and args.process_id is None:
            return run_group(args, config, spec)
        return run_instance(config, args.name, args.role, args.process_id, args.coordinator_port)
    except ValueError as e:
        print(f"sunjax cluster: {e}", file=sys.stderr)
        return 2
