"""Inference and training speed of SD-FSMIS: the naive reference path against the fast path, in one process.

Random weights of the real architectures (weights do not change cost):

* ``--model sd15``: SD-1.5's VAE and UNet and a DINOv2-small-sized ViT, from the diffusers / transformers configs
  shipped in ``monai_sdfsmis/networks/configs/``;
* ``--model no_prior``: the weight-free default (``small`` stage-1 autoencoder, ``default`` UNet, as the bundle);
* ``--model tiny``: ``SDFSMIS.tiny`` (tests; no timing claims).

The zero-initialised SII output projections and the VTCT gate are set to small random values, so that the support
actually changes the prediction and a wrong support reuse would show in the comparison.

Inference, for a query volume of ``--slices`` slices (all organ slices, 3 protocol chunks):

* reference: fp32, one query slice per call, the support re-encoded (VAE, VTCT, support UNet pass) for every
  slice, on ``--reference_slices`` slices;
* fast: ``SlidingSupportInferer`` (support encoded once per chunk and reused, ``--batch`` query slices per call,
  scaled-dot-product attention) with ``--dtype`` weights (bf16 on CUDA by default), optionally ``--compile``
  (``torch.compile`` of the UNet and the VAE; the compile time is reported on its own);
* their soft masks are compared on the reference slices; beyond the tolerance of the fast path's dtype the script
  exits with status 1.

Reported: ms per query slice (fast network call at ``--batch``, and end to end through the inferer), seconds per
volume (measured; for ``--slices`` other than 40 also a 40-slice figure extrapolated from the measured per-slice
cost and labelled so), FLOPs (``torch.utils.flop_counter``: matrix products and convolutions), achieved TFLOP/s,
peak GPU memory. Training (``--train``): s per episode through ``EpisodeTrainer`` (AdamW, clip 1.0, bf16 autocast
on CUDA) at batch 1 and at each of ``--train_batches`` until memory runs out, peak memory at batch 1,
``--grad_ckpt`` for UNet gradient checkpointing.

    python benchmarks/speed.py --model sd15 --train --compile --output_dir OUT     # GPU
    python benchmarks/speed.py --cpu --model no_prior --slices 40 --output_dir OUT   # 2-core CPU figures
    python benchmarks/speed.py --cpu --tiny --size 64 --slices 6                     # smoke (tests)
"""

from __future__ import annotations

__all__ = ["build_network", "main"]

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from monai_sdfsmis.inferers import SlidingSupportInferer  # noqa: E402
from monai_sdfsmis.networks.sdfsmis import SDFSMIS  # noqa: E402
from monai_sdfsmis.networks.sqi import sii_blocks  # noqa: E402
from monai_sdfsmis.utils import atomic_write, configure_cpu_threads  # noqa: E402

MODELS = ("sd15", "no_prior", "tiny")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Soft-mask tolerance of the fast path against the fp32 reference, by the fast path's dtype: (mean |d|, max |d|).
#: Soft masks lie in [-1, 1]; bf16 keeps 8 significant bits (relative rounding 2^-9) through ~100 layers.
TOLERANCES = {"fp32": (1e-4, 2e-3), "bf16": (3e-2, 0.5), "fp16": (1e-2, 0.25)}
VOLUME_SLICES = 40


# ---------------------------------------------------------------------------------------------- building
def build_network(model: str, device: torch.device, size: int, seed: int = 0, ae_width: str = "small",
                  unet_width: str = "default") -> SDFSMIS:
    """A randomly initialised SD-FSMIS of ``model``'s architecture, in eval mode on ``device``."""
    torch.manual_seed(seed)
    if model == "tiny":
        net = SDFSMIS.tiny(seed=seed)
    elif model == "sd15":
        from monai_sdfsmis.networks.pretrained import build_dinov2_small, build_sd15_unet, build_sd15_vae

        # Built on the target device: initialising 1 B parameters on a CPU takes longer than the benchmark.
        build_on = device if device.type == "cuda" else None
        net = SDFSMIS(build_sd15_vae(device=build_on), build_sd15_unet(device=build_on),
                      build_dinov2_small(device=build_on), torch.randn(1, 77, 768, device=device))
    elif model == "no_prior":
        from monai_sdfsmis.networks.autoencoder import build_autoencoder
        from monai_sdfsmis.networks.no_prior import build_no_prior_sdfsmis

        net = build_no_prior_sdfsmis(build_autoencoder(ae_width, sample_size=size), unet_width, seed=seed)
    else:
        raise ValueError(f"--model must be one of {MODELS}, got {model!r}.")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, block in sii_blocks(net.unet):
            if "attn_sq" in block._modules:
                out = block.attn_sq.attn.to_out[0]
                out.weight.copy_((torch.randn(out.weight.shape, generator=g) * 0.1).to(out.weight))
        if net.vtct is not None and hasattr(net.vtct, "gate"):
            net.vtct.gate.fill_(0.5)
    return net.to(device).eval()


def synthetic_case(size: int, slices: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Query volume ``[1, 1, S, S, slices]`` (every slice an organ slice) and a 12-slice support with a disc mask."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = (((yy - size / 2) ** 2 + (xx - size / 2.3) ** 2) < (size / 5) ** 2).float()

    def volume(depth: int) -> torch.Tensor:
        noise = torch.rand(1, 1, size, size, depth, generator=g) * 0.6 - 0.8
        return (noise + 1.2 * disc[None, None, :, :, None]).clamp(-1, 1)

    support_label = torch.zeros(1, 1, size, size, 12)
    support_label[..., 2:10] = disc[None, None, :, :, None]
    return {"query": volume(slices), "query_label": torch.ones(1, 1, size, size, slices),
            "support": volume(12), "support_label": support_label}


# ---------------------------------------------------------------------------------------------- measuring
class Clock:
    """Wall time of a block, with the device synchronised before and after."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, work: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        start = time.perf_counter()
        result = work()
        self.sync()
        return time.perf_counter() - start, result


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated since :func:`reset_peak`, GiB; ``None`` on CPU (see ``max_rss_gib``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def max_rss_gib() -> float:
    """The process's peak resident memory so far (Linux ``ru_maxrss`` is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def count_flops(work: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        work()
    return int(counter.get_total_flops())


def flops_per_pass(net: SDFSMIS, case: dict[str, torch.Tensor], device: torch.device) -> tuple[int, int]:
    """FLOPs of one support pass and of one query slice's pass (the count does not depend on the dtype)."""
    # The counter's module tracker hooks the autograd graph of every module output that requires grad; a
    # parameter returned as is (VTCT's learned condition) has no graph, so gradients are switched off meanwhile.
    trainable = [p for p in net.parameters() if p.requires_grad]
    net.requires_grad_(False)
    try:
        with torch.no_grad():
            s_img, s_lab = support_slice(case, device)
            context = net.encode_support(s_img, s_lab)
            support = count_flops(lambda: net.encode_support(s_img, s_lab))
            query = count_flops(lambda: net.segment(query_slices(case, range(1), device), context))
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return support, query


def support_slice(case: dict[str, torch.Tensor], device: torch.device, z: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    image = case["support"][..., z].expand(-1, 3, -1, -1).to(device)
    return image, case["support_label"][..., z].to(device)


def query_slices(case: dict[str, torch.Tensor], index: range, device: torch.device) -> torch.Tensor:
    return case["query"][0, :, :, :, list(index)].permute(3, 0, 1, 2).expand(-1, 3, -1, -1).contiguous().to(device)


# ---------------------------------------------------------------------------------------------- inference
def protocol_pairs(case: dict[str, torch.Tensor], n: int) -> list[tuple[int, int]]:
    """``n`` (query slice, support slice) pairs spread over the volume, paired as the protocol pairs them."""
    from monai_sdfsmis.data.protocol import chunk_bounds, support_slice_indices

    depth = case["query"].shape[-1]
    organ = torch.nonzero(case["support_label"][0, 0].flatten(0, 1).any(dim=0)).flatten().tolist()
    picks = [organ[k] for k in support_slice_indices(len(organ), 3)]
    chunk_of = {d: j for j, (a, b) in enumerate(chunk_bounds(depth, 3)) for d in range(a, b)}
    slices = sorted({round(i * (depth - 1) / max(n - 1, 1)) for i in range(n)})
    return [(d, picks[chunk_of[d]]) for d in slices]


def reference_path(net: SDFSMIS, case: dict, pairs: list[tuple[int, int]], device: torch.device,
                   clock: Clock) -> dict[str, Any]:
    """fp32, batch 1, the support re-encoded for every query slice (what a straightforward port does)."""
    queries = query_slices(case, range(case["query"].shape[-1]), device)
    softs = []

    def one(d: int, z: int) -> torch.Tensor:
        return net.segment(queries[d : d + 1], net.encode_support(*support_slice(case, device, z)))

    with torch.no_grad():
        one(*pairs[0])  # warm-up (allocator, cuDNN autotuning)
        reset_peak(device)
        seconds = 0.0
        for d, z in pairs:
            dt, soft = clock.time(lambda: one(d, z))
            seconds += dt
            softs.append(soft.float().cpu())
    return {"ms_per_slice": 1e3 * seconds / len(pairs), "slices": len(pairs), "peak_gib": peak_gib(device),
            "soft": torch.cat(softs), "pairs": pairs}


def fast_network_call(net: SDFSMIS, case: dict, batch: int, device: torch.device, clock: Clock,
                      repeats: int) -> dict[str, Any]:
    """One support context reused by ``batch`` query slices per call: ms per slice of the batched call."""
    s_img, s_lab = support_slice(case, device)
    n = case["query"].shape[-1]
    queries = query_slices(case, range(n), device)
    reps = max(1, math.ceil(batch / n))
    batch_in = queries.repeat(reps, 1, 1, 1)[:batch]
    with torch.no_grad():
        context = net.encode_support(s_img, s_lab)
        net.segment(batch_in, context)  # warm-up
        reset_peak(device)
        times = [clock.time(lambda: net.segment(batch_in, context))[0] for _ in range(repeats)]
        support_s = min(clock.time(lambda: net.encode_support(s_img, s_lab))[0] for _ in range(repeats))
    best = min(times)
    return {"batch": batch, "ms_per_slice": 1e3 * best / batch, "support_ms": 1e3 * support_s,
            "peak_gib": peak_gib(device)}


def fast_volume(net: SDFSMIS, case: dict, batch: int, device: torch.device, clock: Clock,
                repeats: int) -> dict[str, Any]:
    """The query volume through ``SlidingSupportInferer`` (3 chunks), soft masks kept for the comparison."""
    inferer = SlidingSupportInferer(n_chunks=3, sw_batch_size=batch, spatial_size=case["query"].shape[2],
                                    device=device, amp=True)
    softs: list[torch.Tensor] = []
    decode = net.decode_mask  # the inferer's last step to a soft mask (it encodes each query slice once, then decodes)

    def keep(latent: torch.Tensor) -> torch.Tensor:
        soft = decode(latent)
        softs.append(soft)
        return soft

    def run() -> torch.Tensor:
        softs.clear()
        return inferer(case["query"].to(device), net, support_image=case["support"].to(device),
                       support_label=case["support_label"].to(device), query_label=case["query_label"].to(device))

    net.decode_mask = keep  # instance attribute: records the soft masks the inferer binarises
    try:
        first_s, _ = clock.time(run)  # warm-up; with --compile this includes the compilation
        reset_peak(device)
        times = [clock.time(run)[0] for _ in range(repeats)]
        soft = torch.cat([s.float().cpu() for s in softs])
    finally:
        del net.decode_mask
    n = case["query"].shape[-1]
    best = min(times)
    return {"volume_s": best, "slices": n, "ms_per_slice_end_to_end": 1e3 * best / n, "first_run_s": first_s,
            "peak_gib": peak_gib(device), "soft": soft}


def compare(fast_soft: torch.Tensor, reference_soft: torch.Tensor, dtype_name: str) -> dict[str, Any]:
    diff = (fast_soft - reference_soft).abs()
    mean_tol, max_tol = TOLERANCES[dtype_name]
    agree = ((fast_soft > 0) == (reference_soft > 0)).float().mean()
    result = {"mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()), "mean_tolerance": mean_tol,
              "max_tolerance": max_tol, "binary_agreement": float(agree)}
    result["ok"] = result["mean_abs_diff"] <= mean_tol and result["max_abs_diff"] <= max_tol
    return result


# ---------------------------------------------------------------------------------------------- training
def train_speed(net_factory: Callable[[], SDFSMIS], size: int, batch: int, device: torch.device, clock: Clock,
                iterations: int, grad_ckpt: bool) -> dict[str, Any]:
    """s per episode of ``EpisodeTrainer`` at ``batch`` episodes per step (after 2 warm-up steps)."""
    from ignite.engine import Events

    from monai_sdfsmis.engines.trainer import EpisodeTrainer

    net = net_factory().train()
    if grad_ckpt:
        net.unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(net.parameter_groups())
    case = synthetic_case(size, 4, seed=1)
    s_img, s_lab = support_slice(case, torch.device("cpu"))
    q_img = query_slices(case, range(1), torch.device("cpu"))
    episode = {"support_image": s_img[0], "support_label": s_lab[0], "query_image": q_img[0],
               "query_label": case["support_label"][0, :, :, :, 5]}
    batch_dict = {k: v[None].expand(batch, *v.shape).contiguous() for k, v in episode.items()}
    warmup = 2
    trainer = EpisodeTrainer(device=device, max_epochs=1, train_data_loader=[batch_dict] * (warmup + iterations),
                             network=net, optimizer=optimizer, amp=True, epoch_length=warmup + iterations)
    marks: list[float] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _mark(engine: Any) -> None:
        clock.sync()
        marks.append(time.perf_counter())
        if engine.state.iteration == warmup - 1:
            reset_peak(device)

    reset_peak(device)
    trainer.run()
    per_step = (marks[-1] - marks[warmup - 1]) / iterations
    result = {"batch": batch, "s_per_episode": per_step / batch, "s_per_step": per_step,
              "peak_gib": peak_gib(device), "grad_ckpt": grad_ckpt}
    del trainer, optimizer, net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------------------------------- report
def machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"host": platform.node(), "cpu": cpu, "cpus_available": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def markdown(r: dict[str, Any]) -> str:
    m, c = r["machine"], r["config"]
    where = m.get("gpu") or f"CPU {m['cpu']} ({m['threads']} threads)"
    lines = [f"# SD-FSMIS speed: {c['model']} at {c['size']}x{c['size']}, {where}", "",
             f"{r['date']}, host {m['host']}, torch {m['torch']}. Command: `{r['command']}`", ""]
    if c["model"] == "tiny":
        lines += ["**Tiny test network: these numbers measure nothing about SD-FSMIS.**", ""]
    ref, fast, vol = r.get("reference"), r["fast_call"], r["fast_volume"]
    lines += ["| path | ms per query slice |", "|---|---|"]
    if ref:
        lines.append(f"| reference: fp32, batch 1, support re-encoded per slice ({ref['slices']} slices) | "
                     f"{ref['ms_per_slice']:.1f} |")
    lines.append(f"| fast network call: {c['dtype']}, batch {fast['batch']}, support reused | {fast['ms_per_slice']:.2f} |")
    lines.append(f"| fast end to end: {c['dtype']} weights (SlidingSupportInferer, {vol['slices']} slices, 3 support "
                 f"passes) | {vol['ms_per_slice_end_to_end']:.2f} |")
    auto = r.get("fast_volume_autocast")
    if auto:
        lines.append(f"| fast end to end: fp32 weights, bf16 autocast (the inferer's default) | "
                     f"{auto['ms_per_slice_end_to_end']:.2f} |")
    if ref:
        lines += ["", f"Speed-up of the fast end-to-end path over the reference: {r['speedup_end_to_end']:.1f}x."]
    lines += ["", f"Query volume of {vol['slices']} slices: {vol['volume_s']:.3f} s (measured)."]
    if "volume_40_s_extrapolated" in r:
        lines.append(f"40-slice volume: {r['volume_40_s_extrapolated']:.2f} s (extrapolated from {vol['slices']} "
                     "measured slices: 3 support passes + 40 x the measured per-slice cost).")
    if r.get("compile_s") is not None:
        lines.append(f"torch.compile (UNet + VAE, backend {c['compile_backend']}): {r['compile_s']:.1f} s of compilation "
                     "(first volume minus the best timed one), not in the figures above.")
    fl = r["flops"]
    lines += ["", f"FLOPs: {fl['query_slice_gflop']:.1f} GFLOP per query slice, {fl['support_gflop']:.1f} GFLOP per "
              f"support pass; achieved {fl['achieved_tflops']:.3f} TFLOP/s on the volume."]
    if fast["peak_gib"] is not None:
        lines.append(f"Peak GPU memory: fast call {fast['peak_gib']:.2f} GiB, volume {vol['peak_gib']:.2f} GiB.")
    else:
        lines.append(f"Peak resident memory of the process: {r['max_rss_gib']:.2f} GiB.")
    cmp_ = r["comparison"]
    if not cmp_["slices"]:
        lines += ["", "No reference run (--reference_slices 0): soft masks not compared."]
    else:
        lines += ["", f"Fast vs reference soft masks on {cmp_['slices']} slices: mean |d| "
                  f"{cmp_['mean_abs_diff']:.2e} (tolerance {cmp_['mean_tolerance']:g}), max |d| "
                  f"{cmp_['max_abs_diff']:.2e} (tolerance {cmp_['max_tolerance']:g}), sign agreement "
                  f"{100 * cmp_['binary_agreement']:.2f}%: {'within' if cmp_['ok'] else 'BEYOND'} tolerance."]
    if r.get("training"):
        lines += ["", "| training | s per episode | s per step | peak GPU memory (GiB) |", "|---|---|---|---|"]
        for t in r["training"]:
            peak = "" if t.get("peak_gib") is None else f"{t['peak_gib']:.2f}"
            if "error" in t:
                lines.append(f"| batch {t['batch']} | {t['error']} | | |")
            else:
                ck = ", gradient checkpointing" if t["grad_ckpt"] else ""
                lines.append(f"| batch {t['batch']}{ck} | {t['s_per_episode']:.4f} | {t['s_per_step']:.4f} | {peak} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="sd15")
    p.add_argument("--tiny", action="store_true", help="same as --model tiny")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--slices", type=int, default=VOLUME_SLICES, help="query volume depth (40 in the targets)")
    p.add_argument("--reference_slices", type=int, default=None,
                   help="slices of the reference path [8 on CUDA, 2 on CPU]; 0 skips it (and the comparison)")
    p.add_argument("--batch", type=int, default=None, help="query slices per fast call [32 on CUDA, 8 on CPU]")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="fast-path weights [bf16 on CUDA, fp32 on CPU]")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet and the VAE for the fast path")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend ('eager' only traces: tests)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, best kept [5 on CUDA, 1 on CPU]")
    p.add_argument("--train", action="store_true", help="also time training")
    p.add_argument("--train_batches", type=int, nargs="+", default=None, help="[1 2 4 8 16 32 on CUDA, 1 2 on CPU]")
    p.add_argument("--train_iterations", type=int, default=None, help="timed steps per batch [10 on CUDA, 2 on CPU]")
    p.add_argument("--grad_ckpt", action="store_true", help="UNet gradient checkpointing in training")
    p.add_argument("--ae_width", default="small", help="no_prior: stage-1 autoencoder width (bundle default)")
    p.add_argument("--unet_width", default="default", help="no_prior: UNet width (bundle default)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (monai_sdfsmis.utils.configure_cpu_threads)")
    p.add_argument("--output_dir", default=None, help="write results.json and results.md here")
    args = p.parse_args(argv)
    if args.tiny:
        args.model = "tiny"
    if args.size % 8 or args.size < 16:
        p.error(f"--size must be a multiple of 8 and at least 16, got {args.size}")
    if args.slices < 3:
        p.error(f"--slices must be at least 3 (one per chunk), got {args.slices}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    configure_cpu_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    cuda = device.type == "cuda"
    dtype_name = args.dtype or ("bf16" if cuda else "fp32")
    batch = args.batch or (32 if cuda else 8)
    repeats = args.repeats or (5 if cuda else 1)
    n_ref = args.reference_slices if args.reference_slices is not None else (8 if cuda else 2)
    n_ref = min(n_ref, args.slices)
    clock = Clock(device)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference is true fp32
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result: dict[str, Any] = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
                              "config": {"model": args.model, "size": args.size, "slices": args.slices,
                                         "batch": batch, "dtype": dtype_name, "compile": args.compile,
                                         "compile_backend": args.compile_backend if args.compile else None,
                                         "device": str(device)}}

    def log(message: str) -> None:
        print(f"[speed {time.strftime('%H:%M:%S')}] {message}", flush=True)

    log(f"building {args.model} on {device}")
    build_s, net = clock.time(lambda: build_network(args.model, device, args.size, 0, args.ae_width, args.unet_width))
    result["build_s"] = build_s
    result["parameters_m"] = {"unet": sum(p.numel() for p in net.unet.parameters()) / 1e6,
                              "vae": sum(p.numel() for p in net.vae.parameters()) / 1e6}
    case = synthetic_case(args.size, args.slices)

    reference = None
    if n_ref:
        log(f"reference path (fp32, batch 1, support re-encoded) on {n_ref} slices")
        reference = reference_path(net, case, protocol_pairs(case, n_ref), device, clock)
        log(f"  {reference['ms_per_slice']:.1f} ms per slice")

    support_flops, query_flops = flops_per_pass(net, case, device)

    autocast_volume = None
    if cuda and not args.compile:
        # What the inferer does by default with fp32 weights on CUDA: bf16 autocast.
        log(f"fast path (fp32 weights, bf16 autocast, batch {batch})")
        autocast_volume = fast_volume(net, case, batch, device, clock, repeats)
        autocast_volume.pop("soft")
        result["fast_volume_autocast"] = autocast_volume
    net = net.to(DTYPES[dtype_name])
    compile_s = None
    if args.compile:
        # dynamic: the support pass (batch 1), the chunks' batches and the last partial batch share one graph each
        # instead of a recompilation per batch size.
        net.unet.compile(fullgraph=True, dynamic=True, backend=args.compile_backend)
        net.vae.compile(dynamic=True, backend=args.compile_backend)
    log(f"fast path ({dtype_name}, batch {batch}{', compiled' if args.compile else ''})")
    volume = fast_volume(net, case, batch, device, clock, repeats)
    if args.compile:
        compile_s = max(0.0, volume["first_run_s"] - volume["volume_s"])
    call = fast_network_call(net, case, batch, device, clock, repeats)
    log(f"  network call {call['ms_per_slice']:.2f} ms per slice; volume {volume['volume_s']:.3f} s")

    total_flops = 3 * support_flops + args.slices * query_flops
    result.update({
        "reference": None if reference is None else {k: v for k, v in reference.items() if k not in ("soft", "pairs")},
        "fast_call": call,
        "fast_volume": {k: v for k, v in volume.items() if k != "soft"},
        "compile_s": compile_s,
        "flops": {"support_gflop": support_flops / 1e9, "query_slice_gflop": query_flops / 1e9,
                  "volume_tflop": total_flops / 1e12, "achieved_tflops": total_flops / volume["volume_s"] / 1e12},
        "max_rss_gib": max_rss_gib(),
    })
    if args.slices != VOLUME_SLICES:
        per_query = (volume["volume_s"] - 3 * call["support_ms"] / 1e3) / args.slices
        result["volume_40_s_extrapolated"] = 3 * call["support_ms"] / 1e3 + VOLUME_SLICES * max(per_query, 0.0)
    if reference is not None:
        result["speedup_end_to_end"] = reference["ms_per_slice"] / volume["ms_per_slice_end_to_end"]
        # every query slice is an organ slice, so the inferer segments them in slice order: soft row d is slice d
        fast_soft = volume["soft"][[d for d, _ in reference["pairs"]]]
        comparison = compare(fast_soft, reference["soft"], dtype_name)
        comparison["slices"] = reference["slices"]
        result["comparison"] = comparison
    else:
        result["comparison"] = {"slices": 0, "mean_abs_diff": float("nan"), "max_abs_diff": float("nan"),
                                "mean_tolerance": TOLERANCES[dtype_name][0], "max_tolerance": TOLERANCES[dtype_name][1],
                                "binary_agreement": float("nan"), "ok": True}
    del net
    if cuda:
        torch.cuda.empty_cache()

    if args.train:
        if not cuda and args.model == "sd15":
            log("warning: SD-1.5-sized training on the CPU holds about 16 GiB (weights, gradients, AdamW state)")
        batches = args.train_batches or ([1, 2, 4, 8, 16, 32] if cuda else [1, 2])
        iterations = args.train_iterations or (10 if cuda else 2)

        def factory() -> SDFSMIS:
            return build_network(args.model, device, args.size, 0, args.ae_width, args.unet_width)

        result["training"] = []
        for b in batches:
            log(f"training, batch {b}")
            try:
                t = train_speed(factory, args.size, b, device, clock, iterations, args.grad_ckpt)
            except torch.cuda.OutOfMemoryError:
                result["training"].append({"batch": b, "error": "out of memory"})
                torch.cuda.empty_cache()
                break
            result["training"].append(t)
            log(f"  {t['s_per_episode']:.4f} s per episode")
        done = [t for t in result["training"] if "error" not in t]
        if done:
            result["training_best"] = min(done, key=lambda t: t["s_per_episode"])

    result["machine"] = machine(device)
    text = markdown(result)
    print(text)
    if args.output_dir:
        out = Path(args.output_dir)
        atomic_write(out / "results.json", json.dumps(result, indent=2, default=str) + "\n")
        atomic_write(out / "results.md", text)
    if not result["comparison"]["ok"]:
        print("speed.py: the fast path's soft masks differ from the reference beyond the tolerance of "
              f"{dtype_name}", file=sys.stderr)
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
