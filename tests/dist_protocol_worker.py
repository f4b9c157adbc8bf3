"""Started by ``tests/test_evaluator.py`` under ``torchrun``: the support-copy protocol evaluation of 5 CHAOS
cases split over the processes (gloo, CPU), rows saved by :class:`ProtocolResultsSaver`.

Usage: ``torchrun --nproc_per_node=2 tests/dist_protocol_worker.py DATASET_DIR OUTPUT_DIR``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from monai.data import DataLoader, DistributedSampler

from monai_sdfsmis.engines import ProtocolDataset, ProtocolEvaluator, ProtocolResultsSaver
from monai_sdfsmis.networks.support_copy import SupportMaskCopy

CASES = range(5)  # not divisible by 2 processes: the ranks evaluate 3 and 2 cases


def main(dataset_dir: str, output_dir: str) -> None:
    dist.init_process_group("gloo")
    dataset = torch.utils.data.Subset(ProtocolDataset(dataset_dir, fold_ids=[0], organ_ids=[2, 3]), CASES)
    sampler = DistributedSampler(dataset, even_divisible=False, shuffle=False)
    saver = ProtocolResultsSaver(output_dir=output_dir, method="copy")
    evaluator = ProtocolEvaluator(device="cpu", val_data_loader=DataLoader(dataset, batch_size=1, sampler=sampler),
                                  network=SupportMaskCopy(), val_handlers=[saver], surface_metrics=False)
    evaluator.run()
    rank = dist.get_rank()
    (Path(output_dir) / f"rank{rank}_rows.json").write_text(json.dumps({"local_cases": len(sampler), "rows": saver.rows}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
