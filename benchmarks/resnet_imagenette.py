"""ResNet-34 on Imagenette (the paper's Sec. 4.3): coarse then fine vs fine only, early stopping.

    python benchmarks/resnet_imagenette.py                       # reduced CPU run: 32 -> 64
    python benchmarks/resnet_imagenette.py --fine 224 --coarse 112 --device cuda --max-epochs 30 \\
        --patience 4 --batch 128                                 # the paper's sizes (GPU)

Data: ``<data-dir>/train`` and ``<data-dir>/val`` (class folders; default ``MSCNN_DATA_DIR`` or
``../shared/data`` + ``imagenet10``), resized to ``--fine``; coarse images are
``restrict_image(gaussian_blur(x, 1))``, as in the pyramid. Schedules, each with AdamW, cosine
learning rate per stage, random horizontal flips, early stopping on validation accuracy:

* ``fine only``: train at the fine resolution;
* ``coarse then fine (<transfer>)``: train at the coarse resolution once, move the network with
  ``resnet_to_resolution`` (each of ``--transfer``), recalibrate batch norm on fine images, continue
  at the fine resolution. With several transfers the coarse stage is shared and counted in each
  row's wall-clock. Free ResNets (``--stencil free``): ``galerkin``, ``naive`` and
  ``naive-prefilter`` (the network blurs its input to the coarse images' bandwidth,
  ``handover_sigma``, and keeps that blur in the fine stage, as the ODE network's prefiltered
  handover does); scale-consistent ResNets (``--stencil gaussian`` etc., ``mscnn.resnet``):
  ``consistent`` (the same weights re-discretised) and ``consistent-prefilter``.

Reports best validation accuracy, wall-clock, fine-equivalent epochs (an epoch at resolution ``n``
costs ``(n / fine)^2``), and the coarse network's accuracy on fine images before any fine training
(every handover that applies to ``--stencil``, each also after batch-norm recalibration).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import ROOT, machine, metrics_of, publish

from mscnn.data import Split, find_data_dir, load_image_folder
from mscnn.hierarchy import handover_sigma
from mscnn.recalibrate import recalibrate_batchnorm
from mscnn.resnet import ResNetConfig, build_resnet, resnet_to_resolution
from mscnn.train import TorchStep, evaluate, fit, split_batches
from mscnn.transfer import gaussian_blur, restrict_image

HANDOVERS_FREE = ["galerkin", "naive", "naive-prefilter"]
HANDOVERS_CONSISTENT = ["consistent", "consistent-prefilter"]


def find_data(arg: str | None) -> Path:
    """``--data-dir`` (only it), else ``MSCNN_DATA_DIR``, else ``shared/data`` beside the repository
    (``mscnn.data.find_data_dir``); the folder itself or its ``imagenet10`` sub-folder."""
    found, tried = find_data_dir("imagenet10", arg,
                                 lambda c: (c / "train").is_dir() and (c / "val").is_dir())
    if found is None:
        raise FileNotFoundError(
            "Imagenette not found: give --data-dir DIR (with train/ and val/ class folders) or set "
            f"MSCNN_DATA_DIR; looked in {[str(c) for c in tried]}")
    return found


def _flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flips (half the batch, drawn from ``g``)."""
    flip = (torch.rand(len(x), generator=g) < 0.5).to(x.device)
    x[flip] = x[flip].flip(-1)
    return x


def _amp(device) -> torch.dtype | None:
    return torch.bfloat16 if device.type == "cuda" else None


def evaluate_on(net, data: Split, device, batch: int) -> float:
    return evaluate(net, split_batches(data, batch, device=device), _amp(device))["accuracy"]


def train_stage(net, train: Split, val: Split, args, device, max_epochs: int, log) -> list[dict]:
    """AdamW + one-cycle over ``max_epochs``, flips, early stopping (patience on val accuracy) in
    ``mscnn.train.fit``; the network ends with its best weights."""
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.wd)
    steps = max_epochs * -(-len(train) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps, pct_start=0.15)
    step = TorchStep(net, opt, sched, autocast=_amp(device))

    def on_epoch(epoch: int, rec: dict) -> None:
        rec["val_acc"] = rec["val_accuracy"]
        log(f"  epoch {epoch}: loss {rec['loss']:.3f} val {100 * rec['val_acc']:.2f}% "
            f"({rec['seconds']:.1f} s)")

    return fit(net, train, max_epochs, batch_size=args.batch, seed=args.seed, step=step, val=val,
               patience=args.patience, device=device, augment=_flip, autocast=_amp(device),
               on_epoch=on_epoch)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--fine", type=int, default=64)
    ap.add_argument("--coarse", type=int, default=32)
    ap.add_argument("--max-epochs", type=int, default=6, help="per stage")
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--transfer", choices=HANDOVERS_FREE + HANDOVERS_CONSISTENT, nargs="+",
                    default=["galerkin"],
                    help="the handovers whose fine stage is trained (consistent*: with --stencil not free)")
    ap.add_argument("--stencil", default="free", help="ResNetConfig.stencil (mscnn.resnet.RESNET_STENCILS)")
    ap.add_argument("--pair", default="full-weighting", help="transfer pair (pyramid, handover, boundaries)")
    ap.add_argument("--scale", type=float, default=0.05, help="ResNetConfig.stencil_scale")
    ap.add_argument("--length", type=float, default=None, help="ResNetConfig.stencil_length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.fine % args.coarse or (args.fine // args.coarse) & (args.fine // args.coarse - 1):
        ap.error(f"--fine {args.fine} must be --coarse {args.coarse} times a power of 2")
    wrong = [t for t in args.transfer if (t in HANDOVERS_CONSISTENT) != (args.stencil != "free")]
    if wrong:
        ap.error(f"--transfer {wrong} does not apply to --stencil {args.stencil}")
    device = torch.device(args.device)
    levels = (args.fine // args.coarse).bit_length() - 1
    t_all = time.perf_counter()
    root = find_data(args.data_dir)
    t0 = time.perf_counter()
    classes, train = load_image_folder(root / "train", args.fine)
    _, val = load_image_folder(root / "val", args.fine)
    mean = train.x.mean(dim=(0, 2, 3), keepdim=True)
    std = train.x.std(dim=(0, 2, 3), keepdim=True)
    train, val = (Split((d.x - mean) / std, d.y) for d in (train, val))

    def coarsen(d: Split) -> Split:
        x = d.x
        for _ in range(levels):
            x = restrict_image(gaussian_blur(x, 1.0), args.pair)
        return Split(x.contiguous(), d.y)

    train_c, val_c = coarsen(train, ), coarsen(val)
    if device.type == "cuda":
        train, val, train_c, val_c = (Split(d.x.to(device), d.y) for d in (train, val, train_c, val_c))
    t_data = time.perf_counter() - t0
    print(f"{len(train)} train / {len(val)} val images of {len(classes)} classes at {args.fine} and "
          f"{args.coarse} from {root} in {t_data:.1f} s; device {device}", flush=True)
    rows = {}

    def new_net(n: int):
        torch.manual_seed(args.seed)
        cfg = ResNetConfig(classes=len(classes), n=n, pair=args.pair, stencil=args.stencil,
                           stencil_scale=args.scale, stencil_length=args.length)
        net = build_resnet(cfg).to(device)
        return net.to(memory_format=torch.channels_last) if device.type == "cuda" else net

    print(f"fine only ({args.fine}x{args.fine})", flush=True)
    t0 = time.perf_counter()
    net = new_net(args.fine)
    h = train_stage(net, train, val, args, device, args.max_epochs, print)
    rows["fine only"] = dict(best_val=max(r["val_acc"] for r in h), seconds=time.perf_counter() - t0,
                             epochs=len(h), fine_equiv=float(len(h)), history=h)

    print(f"coarse ({args.coarse}x{args.coarse}) then fine", flush=True)
    t0 = time.perf_counter()
    net = new_net(args.coarse)
    hc = train_stage(net, train_c, val_c, args, device, args.max_epochs, print)
    t_coarse = time.perf_counter() - t0
    before, moved_nets = {}, {}
    bn_batches = [train.x[i : i + args.batch] for i in range(0, min(len(train), 1024), args.batch)]
    # the prefilter: the fine images taken to the coarse images' bandwidth (the pyramid's blur and
    # the restriction's own smoothing), as the ODE network's handover does
    px = handover_sigma(1.0, args.pair)
    for name in (HANDOVERS_FREE if args.stencil == "free" else HANDOVERS_CONSISTENT):
        moved = resnet_to_resolution(net, levels, naive=name.startswith("naive"), pair=args.pair,
                                     prefilter=px if name.endswith("prefilter") else 0.0)
        if device.type == "cuda":  # a rebuilt network (consistent, prefilter) starts contiguous
            moved = moved.to(memory_format=torch.channels_last)
        before[name] = evaluate_on(moved, val, device, args.batch * 2)
        recalibrate_batchnorm(moved, bn_batches)
        before[f"{name} + BN recalibration"] = evaluate_on(moved, val, device, args.batch * 2)
        if name in args.transfer:
            moved_nets[name] = moved
    print("  coarse network on fine images: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in
                                                          before.items()), flush=True)
    ratio = (args.coarse / args.fine) ** 2
    for name in args.transfer:
        print(f"  fine stage after the {name} handover", flush=True)
        t1 = time.perf_counter()
        hf = train_stage(moved_nets[name], train, val, args, device, args.max_epochs, print)
        rows[f"coarse then fine ({name})"] = dict(
            best_val=max(r["val_acc"] for r in hf), seconds=t_coarse + time.perf_counter() - t1,
            seconds_coarse=t_coarse, epochs=len(hc) + len(hf), fine_equiv=len(hc) * ratio + len(hf),
            coarse_best_val=max(r["val_acc"] for r in hc), history_coarse=hc, history=hf,
            coarse_net_on_fine_images=before, transfer=name)
    target = rows["fine only"]["best_val"]
    for r in rows.values():  # fine-grid epochs until the fine-only best is reached (None: never)
        r["fine_epochs_to_fine_only_best"] = next(
            (i + 1 for i, e in enumerate(r["history"]) if e["val_acc"] >= target), None)

    head = (f"ResNet-34 (3x3 stem, stride 1; GAP -> softmax; stencil {args.stencil}, pair {args.pair}"
            + (f", stencil_scale {args.scale}, stencil_length {args.length}"
               if args.stencil != "free" else "")
            + f") on Imagenette ({len(train)} train / "
            f"{len(val)} val, 10 classes), fine {args.fine}, coarse {args.coarse}; AdamW lr {args.lr} "
            f"one-cycle per stage, batch {args.batch}, at most {args.max_epochs} epochs per stage, "
            f"patience {args.patience}; {machine()}; device {device}; total "
            f"{time.perf_counter() - t_all:.0f} s (data {t_data:.0f} s). Median epoch (training only): "
            f"{statistics.median(e['seconds'] for e in h):.2f} s at {args.fine}, "
            f"{statistics.median(e['seconds'] for e in hc):.2f} s at {args.coarse}"
            + (f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB."
               if device.type == "cuda" else "."))
    md = [head, "", "| schedule | best val % | wall-clock s | epochs | fine-equivalent epochs | "
          "fine epochs to the fine-only best |", "|---|---|---|---|---|---|"]
    for k, r in rows.items():
        md.append(f"| {k} | {100 * r['best_val']:.2f} | {r['seconds']:.0f} | {r['epochs']} | "
                  f"{r['fine_equiv']:.2f} | {r['fine_epochs_to_fine_only_best']} |")
    md += ["", f"Coarse network ({100 * max(r['val_acc'] for r in hc):.2f}% on "
           f"{args.coarse}x{args.coarse}) on {args.fine}x{args.fine} images before fine training: "
           + ", ".join(f"{k} {100 * v:.2f}%" for k, v in before.items()) + "."]
    metrics = metrics_of(rows)
    kind = "" if args.stencil == "free" else f"{args.stencil}_"
    stem = f"resnet34_imagenette_{kind}{args.coarse}_{args.fine}_{'_'.join(args.transfer)}_{device.type}"
    publish(args.out, stem, "\n".join(md), {"args": vars(args), "rows": rows}, vars(args), metrics)


if __name__ == "__main__":
    main()
