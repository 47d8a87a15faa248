"""Point-to-point transfers between pipeline stages (same TP and DP coordinates).

Between stages every TP rank of a stage holds the same activation (plain TP: the residual
stream after a row-parallel all-reduce), and the same gradient of it coming back. As
DeepSpeed's PipelineEngine does (`pipe_partitioned`), each TP rank sends only its 1/tp chunk
of the flattened tensor to the same TP rank of the neighbouring stage, and the receiving TP
group all-gathers the chunks: the bytes between stages drop by tp, the rest moves inside the
TP group (the fast links). With sequence parallelism each TP rank already holds a different
1/tp of the sequence, which it sends whole. `activation_shape` is the one place that decides.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from gptscale.parallel.primitives import comm_device
from gptscale.parallel.topology import Topology

TIED_TAG = 1  # the tied embedding's weights (once, at build) and gradient partitions


def activation_tag(chunk: int) -> int:
    """Messages to a stage's model chunk `chunk`: one stream per chunk and direction, so each
    is received in the order it was sent whatever the interleaving."""
    return 2 + 2 * chunk


def gradient_tag(chunk: int) -> int:
    return 3 + 2 * chunk


def activation_shape(cfg, tp: int) -> tuple[tuple[int, ...], bool]:
    """(the shape of the activation each TP rank holds between stages, whether the TP ranks
    hold identical copies, so that each sends only its 1/tp chunk)."""
    micro_batch, seq_len, d = cfg.train.micro_batch, cfg.data.seq_len, cfg.model.n_embd
    if cfg.parallel.sequence_parallel:
        return (micro_batch, seq_len // tp, d), False  # already split along the sequence: sent whole
    return (micro_batch, seq_len, d), tp > 1


class P2P:
    def __init__(self, topo: Topology, shape: tuple[int, ...], dtype: torch.dtype, split_over_tp: bool = False):
        # Neighbours on the ring of stages: with interleaved 1F1B the last stage's chunk c feeds
        # the first stage's chunk c + 1 (the schedule decides which transfers happen).
        stages = topo.layout.pp
        self.prev = topo.pipe_peer((topo.coords.pp - 1) % stages)
        self.next = topo.pipe_peer((topo.coords.pp + 1) % stages)
        self.shape, self.dtype = shape, dtype
        self.tp_group = topo.get_tensor_model_parallel_group() if split_over_tp else None
        self.tp = dist.get_world_size(self.tp_group) if split_over_tp else 1
        self.tp_rank = dist.get_rank(self.tp_group) if split_over_tp else 0
        numel = 1
        for size in shape:
            numel *= size
        self.numel, self.chunk = numel, -(-numel // self.tp)  # the last chunk padded when tp does not divide
        self._sending: list = []

    def send(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        """Start sending `tensor` (this TP rank's chunk of it with `split_over_tp`) and return:
        a stage never waits for a send, only for what it receives, so no two stages can wait
        on each other (the schedule orders every op after its inputs). `wait_sends` ends them."""
        piece = self._my_chunk(tensor.detach())
        self._sending.append((dist.isend(piece, peer, tag=tag), piece))  # the piece lives until sent

    def recv(self, peer: int, tag: int) -> torch.Tensor:
        """The next tensor `peer` sent with `tag` (whole: all-gathered within the TP group)."""
        chunk = torch.empty(self.chunk, dtype=self.dtype, device=comm_device())
        dist.irecv(chunk, peer, tag=tag).wait()
        return self._whole(chunk)

    def wait_sends(self) -> None:
        for request, _ in self._sending:
            request.wait()
        self._sending.clear()

    def _my_chunk(self, tensor: torch.Tensor) -> torch.Tensor:
        flat = tensor.contiguous().view(-1)
        if self.tp == 1:
            return flat
        start = self.tp_rank * self.chunk
        piece = flat[start:start + self.chunk]
        if piece.numel() < self.chunk:
            piece = torch.cat([piece, piece.new_zeros(self.chunk - piece.numel())])
        return piece.contiguous()

    def _whole(self, chunk: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return chunk.view(self.shape)
        whole = torch.empty(self.chunk * self.tp, dtype=self.dtype, device=chunk.device)
        dist.all_gather_into_tensor(whole, chunk, group=self.tp_group)
        return whole[:self.numel].view(self.shape)


def swap_with(tensor: torch.Tensor, peer: int, tag: int) -> torch.Tensor:
    """Send `tensor` to `peer` and receive the peer's tensor of the same shape and dtype."""
    theirs = torch.empty_like(tensor)
    requests = [dist.isend(tensor.contiguous(), peer, tag=tag), dist.irecv(theirs, peer, tag=tag)]
    for request in requests:
        request.wait()
    return theirs
