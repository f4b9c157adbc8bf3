"""Started by ``tests/test_ddp.py``: a few training steps of the tiny SD-FSMIS, either under ``torchrun`` (each process
takes its share of every global batch, the network wrapped in ``DistributedDataParallel``, gloo, CPU) or as one
process on the whole global batch (the reference). Writes the last gradients, the weights and the number of DDP
bucket all-reduces to ``OUTPUT_DIR/rank{r}.pt``.

Usage: ``torchrun --nproc_per_node=2 tests/ddp_worker.py OUTPUT_DIR`` or ``python tests/ddp_worker.py OUTPUT_DIR``
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from monai_sdfsmis.engines.trainer import EpisodeTrainer
from monai_sdfsmis.networks.sdfsmis import SDFSMIS
from monai_sdfsmis.networks.sqi import sii_blocks

STEPS = 3
GLOBAL_BATCH = 2  # episodes per step over all processes
SIZE = 64


def episode(index: int) -> dict[str, torch.Tensor]:
    """Episode ``index`` of the run: a bright disc on noise, its mask; the query disc is shifted."""
    g = torch.Generator().manual_seed(1000 + index)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    out = {}
    for who, shift in (("support", 0), ("query", 4)):
        cy, cx = (int(v) for v in torch.randint(24, 40, (2,), generator=g))
        disc = (((yy - cy - shift) ** 2 + (xx - cx) ** 2) < 12**2).float()[None]
        noise = torch.rand(1, SIZE, SIZE, generator=g) * 0.6 - 0.8
        out[f"{who}_image"] = (noise + 1.2 * disc).clamp(-1, 1).expand(3, -1, -1).clone()
        out[f"{who}_label"] = disc
    return out


def batches(rank: int, world: int) -> list[dict[str, torch.Tensor]]:
    """This process's share of each global batch: items ``rank, rank + world, ...`` of it."""
    result = []
    for step in range(STEPS):
        items = [episode(step * GLOBAL_BATCH + i) for i in range(rank, GLOBAL_BATCH, world)]
        result.append({k: torch.stack([e[k] for e in items]) for k in items[0]})
    return result


def network() -> SDFSMIS:
    net = SDFSMIS.tiny(seed=0, vae_sample_in_training=False)  # no posterior sampling: ranks draw no random numbers
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # SII away from its zero init, so that its gradients are not trivially zero
        for _, block in sii_blocks(net.unet):
            block.attn_sq.attn.to_out[0].weight.copy_(torch.randn(block.attn_sq.attn.to_out[0].weight.shape, generator=g) * 0.2)
    return net


def main(output_dir: str) -> None:
    torch.set_num_threads(1)
    distributed = "LOCAL_RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    net = network()
    # SGD: a weight then differs from the reference by lr times the gradient difference; AdamW's normalisation
    # would magnify the float rounding of near-zero gradients into lr-sized steps.
    optimizer = torch.optim.SGD(net.parameter_groups(lr_unet=0.05, lr_new=0.05, weight_decay=0.0), momentum=0.9)
    wrapped: torch.nn.Module = net
    reduces = [0]
    if distributed:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        wrapped = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=False)

        def counting_hook(state, bucket):  # DDP's own bucket all-reduce, counted
            reduces[0] += 1
            return allreduce_hook(state, bucket)

        wrapped.register_comm_hook(None, counting_hook)
    trainer = EpisodeTrainer(
        device="cpu", max_epochs=1, train_data_loader=batches(rank, world), network=wrapped, optimizer=optimizer,
        grad_clip=1.0, amp=False, epoch_length=STEPS,
    )
    trainer.run()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}
    weights = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    n_params = sum(1 for p in net.parameters() if p.requires_grad)
    torch.save({"grads": grads, "weights": weights, "reduces": reduces[0], "params": n_params},
               Path(output_dir) / f"rank{rank}.pt")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
