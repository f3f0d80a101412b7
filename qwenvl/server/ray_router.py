"""The request router of qwenvl's Ray Serve replicas (Ray Serve's custom request router API).

Ray Serve asks ``choose_replicas`` for ranks of replicas, tries the first rank, and among the replicas of
a rank takes the one with the shortest queue that still has room. A replica takes up to its --max-batch
requests in its batch plus a queue (as `qwenvl serve` does); from --max-batch ongoing requests on it is
*saturated*. So:

- ``policy="prefix"`` (the default): a request with a routing key (routing.prefix_key: its system prompt
  and first user message) goes to its key's owner on the consistent-hash ring of live replicas, so the
  turns of one conversation meet on one replica (whose prefix cache, once it has one, holds their KV);
  while the owner is saturated, to the least-loaded replica (the owner on a tie);
- ``policy="pow2"``, and requests without a key: Ray's own default, the less loaded of two random replicas;
- a request naming a ``target`` replica (the ingress asking each replica for /health or /metrics) goes
  to that replica only.

Ray ships this module to the processes that route by value (cloudpickle), so its globals are only
imports: the registry the ingress reads lives in server/routing.py.
"""

from __future__ import annotations

import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from ..scaleout import POLICIES
from .routing import VIRTUAL_NODES, HashRing, register_router


class PrefixAffinityRouter(RequestRouter):
    """Consistent hashing of each request's prefix key over the live replicas; least-loaded fallback."""

    def initialize_state(
        self, policy: str = "prefix", saturation: int = 8, virtual_nodes: int = VIRTUAL_NODES, **kwargs
    ) -> None:
        """``saturation``: ongoing requests from which a replica counts as saturated (its --max-batch)."""
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose {', '.join(POLICIES)}")
        self.policy = policy
        self.saturation = saturation
        self.virtual_nodes = virtual_nodes
        self.ring = HashRing(virtual_nodes=virtual_nodes)
        register_router(self.app_name, self)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        members = {replica.replica_id.unique_id for replica in replicas}
        if members != self.ring.members:
            self.ring = HashRing(members, self.virtual_nodes)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        """Ranks of replicas; Ray takes the least-loaded replica of the first rank that has room."""
        if not candidate_replicas:
            return []
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # back off between full rounds
        request = pending_request.args[0] if pending_request is not None and pending_request.args else None
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        target = getattr(request, "target", None)
        if target is not None:
            return [[by_id[target]]] if target in by_id else []
        key = getattr(request, "route_key", None)
        if key is None or self.policy != "prefix":
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        order = [by_id[member] for member in self.ring.preference(key) if member in by_id]
        order += [replica for member, replica in by_id.items() if member not in self.ring.members]
        load = self.replica_queue_len_cache.get(order[0].replica_id)
        if len(order) == 1 or load is None or load < self.saturation:
            return [order[:1], order[1:]] if len(order) > 1 else [order]
        return [order]  # the owner is saturated: the least-loaded replica (the owner on a tie)
