"""Point-to-point transfers between neighbouring pipeline stages (same TP and DP coordinates)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from gptscale.parallel.primitives import comm_device
from gptscale.parallel.topology import Topology


class P2P:
    def __init__(self, topo: Topology, shape: tuple[int, ...], dtype: torch.dtype):
        self.prev = topo.pipe_peer(topo.coords.pp - 1)
        self.next = topo.pipe_peer(topo.coords.pp + 1)
        self.shape, self.dtype = shape, dtype

    def exchange(self, send: list[tuple[torch.Tensor, int]], recv_from: list[int]) -> list[torch.Tensor]:
        """Post every send and receive at once, then wait: neighbours exchanging in opposite
        directions never wait on each other's blocking send."""
        received = [torch.empty(self.shape, dtype=self.dtype, device=comm_device()) for _ in recv_from]
        requests = [dist.isend(t.contiguous(), peer) for t, peer in send]
        requests += [dist.irecv(buf, peer) for buf, peer in zip(received, recv_from)]
        for request in requests:
            request.wait()
        return received
