"""The `qwenvl serve --ray ...` flags and the CPU plan of a replica. No Ray import here: plain `qwenvl serve`
parses these flags too and must not load Ray (qwenvl/deploy.py does, when --ray is given)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .errors import QwenVLError
from .runtime import physical_cores

DEFAULT_REPLICAS = 2
POLICIES = ("prefix", "pow2")  # prefix: by the request's prefix key on a hash ring; pow2: Ray Serve's default
RAY_ONLY = ("replicas", "threads_per_replica", "ray_address", "router", "no_pin")
PROXY_ONLY = ("header_timeout",)  # uvicorn's in `qwenvl serve`; Ray Serve's proxy has no such deadline


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("replicas on Ray Serve (pip install 'qwenvl[ray]'; see docs/scale-out.md)")
    group.add_argument(
        "--ray",
        action="store_true",
        help="serve with --replicas copies of the server on Ray Serve, each loading the model and batching "
        "on its own, behind one address",
    )
    group.add_argument("--replicas", type=int, metavar="N", help=f"replicas (default {DEFAULT_REPLICAS})")
    group.add_argument(
        "--threads-per-replica",
        type=int,
        metavar="T",
        help="threads of each replica (default: --threads, else this host's physical cores / N, at least 1)",
    )
    group.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join this Ray cluster ('auto': the one `ray start` runs on this host); default: start a "
        "Ray instance of this machine for this server only",
    )
    group.add_argument(
        "--router",
        choices=POLICIES,
        help="prefix (default): a request goes to the replica its system prompt and first user message hash to "
        "(every turn of a conversation to one replica), the least-loaded one while that is saturated; "
        "pow2: Ray Serve's default, the less loaded of two random replicas",
    )
    group.add_argument(
        "--no-pin", action="store_true", help="do not pin each replica's threads to cores of its own on its host"
    )
    # flags of the HTTP server that Ray Serve's proxy replaces (added before this call): their defaults
    parser.set_defaults(proxy_defaults={name: parser.get_default(name) for name in PROXY_ONLY})


def check_ray_arguments(args: argparse.Namespace) -> None:
    """Refuse Ray flags without --ray; fill in the defaults of the Ray ones with it."""
    if not args.ray:
        given = [name for name in RAY_ONLY if getattr(args, name) not in (None, False)]
        if given:
            raise QwenVLError(f"--{given[0].replace('_', '-')} needs --ray")
        return
    for name, default in getattr(args, "proxy_defaults", {}).items():
        if default is not None and getattr(args, name, default) != default:
            raise QwenVLError(
                f"--{name.replace('_', '-')} cannot be applied with --ray (Ray Serve's HTTP proxy takes the "
                "connections and has no such setting): leave it out"
            )
    args.replicas = DEFAULT_REPLICAS if args.replicas is None else args.replicas
    if args.replicas < 1:
        raise QwenVLError(f"--replicas must be at least 1, got {args.replicas}")
    if args.threads_per_replica is not None and args.threads is not None and args.threads != args.threads_per_replica:
        raise QwenVLError("--threads and --threads-per-replica disagree: give one of them")
    threads = args.threads_per_replica or args.threads or max(1, physical_cores() // args.replicas)
    if threads < 1:
        raise QwenVLError(f"--threads-per-replica must be at least 1, got {threads}")
    args.threads_per_replica = args.threads = threads
    args.router = args.router or "prefix"


def pin_to_cores(local_rank: int, threads: int) -> list[int] | None:
    """Pin this process (all its threads, and so the ones it starts) to ``threads`` CPUs of its own: the
    ``local_rank``-th such slice of this host's CPUs, one per physical core before any hyper-thread
    sibling. None (nothing pinned) when the host has fewer CPUs than that slice needs."""
    cpus = _cpus_by_core()
    first = local_rank * threads
    if first + threads > len(cpus):
        return None
    chosen = sorted(cpus[first : first + threads])
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), chosen)
        except OSError:  # a thread that just ended
            pass
    return chosen


def _cpus_by_core() -> list[int]:
    """The CPUs this process may use, the first logical CPU of every physical core first."""
    allowed = sorted(os.sched_getaffinity(0))
    seen: set[tuple[str, str]] = set()
    first, siblings = [], []
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            core = ((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip())
        except OSError:
            core = ("", str(cpu))
        (siblings if core in seen else first).append(cpu)
        seen.add(core)
    return first + siblings
