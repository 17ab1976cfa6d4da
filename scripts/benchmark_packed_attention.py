"""Time packed multi-crop attention against the per-resolution forward, side by side in one run.

    python scripts/benchmark_packed_attention.py [--preset reference|quickdraw] [--batch 64]
        [--modes per_resolution,sdpa_split,sdpa_mask,njt,flex] [--rounds 3] [--threads 1]

The student backbone's forward + backward over one step's crops (``forward_features_list`` on the
global and the local crops, iBOT masks on the global crops where the preset trains iBOT), once per
mode in each round, modes interleaved so that every mode sees the same machine load; the median
per mode is reported with its ratio to ``per_resolution`` and the FLOPs that
``dinov2_tools.step_profile.flop_counter_mode`` counts for it (the dense mask's T^2 attention shows
there). Presets (fp32):

* ``reference``: ViT dim 192, depth 6, 3 heads, patch 4, 2 x 32 px global + 4 x 16 px local
  crops, batch 64 (the issue's reference configuration, which the official code also runs on CPU);
* ``quickdraw``: configs/train/quickdraw_vit_tiny.yaml's backbone (dim 192, depth 4, 6 heads, MLP
  ratio 2, patch 4, 28 px global crops) with 4 local 12 px crops: the recipe itself trains without
  local crops, so it has only one resolution and nothing to pack.

``flex`` has no backward on the CPU (torch 2.14), so on the CPU it is timed as a forward under
``no_grad`` beside the per-resolution forward under ``no_grad`` (``flex_fwd`` / ``per_resolution_fwd``);
``--flex-compiled`` also compiles it there (minutes on a small machine). ``sdpa_mask`` is
skipped above ``--max-mask-tokens`` packed tokens (its mask and work grow with T^2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2_tools.step_profile import flop_counter_mode  # noqa: E402

PRESETS = {
    # name: model kwargs, global px, local px, local crops, iBOT masks
    "reference": (dict(embed_dim=192, depth=6, num_heads=3, mlp_ratio=4, patch_size=4), 32, 16, 4, True),
    "quickdraw": (dict(embed_dim=192, depth=4, num_heads=6, mlp_ratio=2, patch_size=4), 28, 12, 4, False),
}


def build(preset: str, batch: int, seed: int = 0):
    from dinov2.models import make_vit

    kwargs, global_px, local_px, n_local, ibot = PRESETS[preset]
    torch.manual_seed(seed)
    model = make_vit("vit_tiny", img_size=global_px, **kwargs).train()
    crops = [torch.randn(2 * batch, 3, global_px, global_px), torch.randn(n_local * batch, 3, local_px, local_px)]
    n_patches = (global_px // kwargs["patch_size"]) ** 2
    masks = [torch.rand(2 * batch, n_patches) < 0.3 if ibot else None, None]
    return model, crops, masks


def run_once(model, crops, masks, mode: str, backward: bool) -> None:
    model.set_packed_attention(mode.removesuffix("_fwd"))
    if backward:
        model.zero_grad(set_to_none=True)
        outputs = model.forward_features_list(crops, masks)
        sum(o["x_prenorm"].float().square().mean() for o in outputs).backward()
    else:
        with torch.no_grad():
            model.forward_features_list(crops, masks)


def timed(model, crops, masks, mode: str) -> float:
    start = time.perf_counter()
    run_once(model, crops, masks, mode, backward=not mode.endswith("_fwd"))
    return time.perf_counter() - start


def counted_flops(model, crops, masks, mode: str):
    """FlopCounterMode's count, or None where it cannot count (njt: its CPU math kernel on nested
    tensors does not decompose under the counter; flex: its higher-order op has no counter rule)."""
    counter = flop_counter_mode()
    try:
        with counter:
            run_once(model, crops, masks, mode, backward=not mode.endswith("_fwd"))
    except (RuntimeError, TypeError):
        return None
    return counter.get_total_flops()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="reference")
    parser.add_argument("--batch", type=int, default=64, help="images per step (each: 2 global + N local crops)")
    parser.add_argument("--modes", default="per_resolution,sdpa_split,sdpa_mask,njt,flex")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-mask-tokens", type=int, default=4096, help="skip sdpa_mask above this many tokens")
    parser.add_argument("--flex-compiled", action="store_true", help="also time compiled flex (forward) on the CPU")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from dinov2.layers.packing import PackedLayout

    model, crops, masks = build(args.preset, args.batch)
    modes = [m for m in args.modes.split(",") if m]
    tokens = [model.prepare_tokens_with_masks(x, m) for x, m in zip(crops, masks)]
    layout = PackedLayout.of(tokens, "sdpa_split")
    skipped = {}
    if "sdpa_mask" in modes and layout.total_tokens > args.max_mask_tokens:
        modes.remove("sdpa_mask")
        skipped["sdpa_mask"] = f"{layout.total_tokens} packed tokens > --max-mask-tokens {args.max_mask_tokens}"
    if "flex" in modes:
        # No flex backward on the CPU: compare forwards, each against the per-resolution forward.
        modes.remove("flex")
        modes += ["per_resolution_fwd", "flex_fwd"]
    if args.flex_compiled:
        os.environ["DINOV2_FLEX_COMPILE"] = "1"
    load_start = os.getloadavg()
    for mode in modes:  # warm-up: allocator, masks and block masks built once per layout
        timed(model, crops, masks, mode)
    flops = {mode: counted_flops(model, crops, masks, mode) for mode in modes}
    times = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode in modes:
            times[mode].append(timed(model, crops, masks, mode))
    load_end = os.getloadavg()

    kwargs, global_px, local_px, n_local, ibot = PRESETS[args.preset]
    print(
        f"preset {args.preset}: {kwargs}, batch {args.batch} x (2 x {global_px} px + {n_local} x {local_px} px), "
        f"iBOT masks {ibot}, fp32, {torch.get_num_threads()} threads"
    )
    print(f"packed sequence: {layout.total_tokens} tokens in {len(layout.seqlens)} crops {layout.groups}")
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    rows = {}
    for mode in modes:
        base = "per_resolution_fwd" if mode.endswith("_fwd") else "per_resolution"
        ratio = medians[mode] / medians[base] if base in medians else float("nan")
        what = "forward (no_grad)" if mode.endswith("_fwd") else "forward + backward"
        gflop = None if flops[mode] is None else flops[mode] / 1e9
        rows[mode] = dict(seconds=medians[mode], samples=times[mode], ratio=ratio, gflop=gflop)
        counted = "(FLOPs not countable)" if gflop is None else f"{gflop:7.1f} GFLOP counted"
        print(
            f"  {mode:<20} {what:<19} median {medians[mode] * 1000:8.0f} ms over {args.rounds} rounds, "
            f"{ratio:5.2f}x {base}, {counted}"
        )
    for mode, why in skipped.items():
        print(f"  {mode:<20} skipped: {why}")
    print(
        f"load average (1, 5, 15 min): start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, "
        f"end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f} on {os.cpu_count()} CPUs"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(dict(vars(args), rows=rows, skipped=skipped), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
