"""``weakclip train``: train the refinement model on CAM seeds (one process, or many under ``torchrun``); with
another method's preset (``--preset excel-voc``) that method's training (:mod:`weakclip.methods`: its
``"train_config"`` and ``"train"`` entry points), the same flags where they apply."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from weakclip.commands import lock_folder
from weakclip.commands.flags import PRESET_HELP, add_amp, add_device, add_training_data

# direct flag -> config key
_FLAG_KEYS: tuple[tuple[str, str], ...] = (
    ("dataset", "data.kind"),
    ("split", "data.split"),
    ("iters", "train.iters"),
    ("batch_size", "train.batch_size"),
    ("lr", "train.lr"),
    ("crop_size", "data.crop_size"),
    ("amp", "train.amp"),
    ("seed", "train.seed"),
    ("checkpoint_every", "train.checkpoint_every"),
    ("num_workers", "data.num_workers"),
)


def build_config(args: argparse.Namespace):
    """The preset, then ``--data-root``/``--seeds``, the direct flags, then ``--set`` (the last wins)."""
    from weakclip.commands import flag_overrides, folder_default_split
    from weakclip.config import apply_overrides, load_preset
    from weakclip.sections import override_keys

    cfg = load_preset(args.preset)
    overrides = flag_overrides(args, _FLAG_KEYS, **{"data.root": args.data_root, "data.seeds": args.seeds})
    overrides += list(args.set or [])
    cfg = apply_overrides(cfg, overrides)
    if cfg.data.kind == "folder" and args.split is None and "data.split" not in override_keys(args.set):
        # the presets' splits are VOC's / COCO's: a folder dataset trains on its own training split
        split = folder_default_split("weakclip train", cfg.data.root, "training", "training split",
                                     to_stderr=args.print_config)
        cfg = apply_overrides(cfg, [f"data.split={split or 'none'}"])
    return cfg


def folder_method(workdir: Path):
    """The method whose training the work folder holds (its ``config.yaml``, else its latest checkpoint);
    None when it holds none."""
    from weakclip.engine.checkpoint import latest_checkpoint, load_checkpoint
    from weakclip.methods import of_checkpoint, of_folder

    latest = latest_checkpoint(workdir) if workdir.is_dir() else None
    if latest is None:
        return None
    return of_folder(workdir, tolerant=True) or of_checkpoint(load_checkpoint(latest))


def check_resumed_method(args: argparse.Namespace, wanted) -> None:
    """``--resume`` of a work folder that holds another method's training: one line before any work."""
    from weakclip.methods import check_same

    if not args.resume:
        return
    found = folder_method(Path(args.workdir))
    if found is not None:
        check_same(found, wanted, str(args.workdir),
                   f"resume it with a {found.title} preset (--preset {found.presets[0]}) or start in another "
                   "--workdir")


def run(args: argparse.Namespace) -> int:
    from weakclip.methods import DEFAULT_METHOD, of_preset

    method = of_preset(args.preset)
    if method.name != DEFAULT_METHOD:
        return run_method(args, method)
    return run_weakclip(args, method)


def run_method(args: argparse.Namespace, method) -> int:
    """Another method's training (``--preset excel-voc``): its config with the flags and ``--set``, then its
    ``"train"`` entry point; ``--seeds`` is WeakCLIP's only."""
    from weakclip.commands import flag_overrides, folder_default_split
    from weakclip.distributed import env_world
    from weakclip.errors import WeakclipError
    from weakclip.methods import entry
    from weakclip.sections import override_keys

    if args.seeds is not None:
        raise WeakclipError(f"--seeds: {method.title} trains on the images' labels, without seeds (seeds are "
                            "WeakCLIP's, --preset voc)")
    overrides = flag_overrides(args, _FLAG_KEYS, **{"data.root": args.data_root}) + list(args.set or [])
    load_config = entry(method, "train_config")
    cfg = load_config(args.preset, overrides)
    if cfg.data.kind == "folder" and args.split is None and "data.split" not in override_keys(args.set):
        split = folder_default_split("weakclip train", cfg.data.root, "training", "training split",
                                     to_stderr=args.print_config)
        cfg = load_config(args.preset, [*overrides, f"data.split={split or 'none'}"])
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    check_resumed_method(args, method)
    summary = entry(method, "train")(cfg, args.workdir, clip_weights=args.clip_weights,
                                     descriptors=args.descriptors, resume=args.resume, device=args.device,
                                     max_iters_this_run=args.max_iters_this_run, progress=not args.quiet)
    if env_world()[0] == 0:
        slim = {k: v for k, v in summary.items() if k not in ("history", "model")}
        print(json.dumps(slim, indent=1, default=str))
    return 0


def run_weakclip(args: argparse.Namespace, method) -> int:
    from weakclip.distributed import env_world
    from weakclip.engine.trainer import train
    from weakclip.errors import WeakclipError
    from weakclip.inference.periodic import build_evaluator

    if args.descriptors is not None:
        raise WeakclipError("--descriptors: the class descriptors of ExCEL's text (--preset excel-voc or "
                            "excel-coco); WeakCLIP's refinement takes none")
    cfg = build_config(args)
    if args.print_config:  # the resolved settings, before any path is checked
        print(cfg.to_yaml(), end="")
        return 0
    check_resumed_method(args, method)
    if not cfg.data.root:
        raise WeakclipError("no dataset given: pass --data-root")
    if not Path(cfg.data.root).exists():
        raise WeakclipError(f"dataset folder not found: {cfg.data.root}")
    if cfg.data.seeds is None and cfg.data.kind != "folder":
        raise WeakclipError("no seeds given: pass --seeds DIR (a folder of seed PNGs, 255 = unsure)")
    if cfg.data.seeds is not None and not Path(cfg.data.seeds).is_dir():
        raise WeakclipError(f"seed folder not found: {cfg.data.seeds}")
    if args.clip_weights is not None and not args.clip_weights.is_file():
        raise WeakclipError(f"CLIP weights file not found: {args.clip_weights}")
    summary = train(cfg, args.workdir, clip_weights=args.clip_weights, resume=args.resume, device=args.device,
                    max_iters_this_run=args.max_iters_this_run, progress=not args.quiet,
                    evaluator=build_evaluator)
    rank = env_world()[0]
    if rank == 0:
        slim = {k: v for k, v in summary.items() if k != "history"}
        print(json.dumps(slim, indent=1, default=str))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train the WeakCLIP refinement model on seeds, or ExCEL (--preset excel-voc)",
        description="Train WeakCLIP (frozen CLIP + adapter, prompts, matching, decoder) on CAM seed masks, "
                    "or, with --preset excel-voc / excel-coco, ExCEL's decoder on a frozen CLIP from the "
                    "images' labels (--descriptors: its class descriptors file). "
                    "Runs alone or under `torchrun --nproc_per_node=N` (DDP; NCCL on GPU, gloo on CPU); "
                    "--batch-size is the GLOBAL batch. Settings: the preset, then the flags below, then "
                    "--set key=value (e.g. --set train.warmup_iters=500 --set model.match_mode=release). "
                    "--resume of a work folder of the other method is refused.")
    p.add_argument("--preset", default="voc",
                   help=f"refinement preset: {PRESET_HELP} (voc / coco: the release; -plus: our unmeasured "
                        f"departures); excel-voc, excel-coco: ExCEL's training (the release's); or a config "
                        f".yaml file (default voc)")
    p.add_argument("--data-root", type=Path, default=None,
                   help="dataset root (VOC2012, prepared COCO, folder); needed except with --print-config")
    add_training_data(p)
    p.add_argument("--seeds", type=Path, default=None,
                   help="folder of seed PNGs (<id>.png, 255 = unsure; WeakCLIP only)")
    p.add_argument("--descriptors", type=Path, default=None, metavar="FILE",
                   help="ExCEL only: the class descriptors JSON file (class name -> sentences; the authors' "
                        "attributes_text/*.json); checked against the data's classes before any work; "
                        "default: the preset's text.descriptors, none: plain class prompts")
    p.add_argument("--clip-weights", type=Path, default=None,
                   help="CLIP weights file (OpenAI ViT-B-16.pt, open_clip or Hugging Face)")
    p.add_argument("--workdir", type=Path, required=True, help="output folder: config, log.csv, checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the workdir's latest checkpoint")
    add_device(p)
    p.add_argument("--iters", type=int, default=None, help="total iterations (train.iters)")
    p.add_argument("--batch-size", type=int, default=None, help="GLOBAL batch size (train.batch_size)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (train.lr)")
    p.add_argument("--crop-size", type=int, default=None, help="training crop (data.crop_size)")
    add_amp(p, "autocast on CUDA: bf16, fp16 (with a gradient scaler) or none (train.amp; default: the "
               "preset's, none)")
    p.add_argument("--seed", type=int, default=None, help="random seed (train.seed)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="iterations between checkpoints")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers per process")
    p.add_argument("--max-iters-this-run", type=int, default=None,
                   help="stop (with a checkpoint) after this many iterations; continue later with --resume")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override any config value, e.g. train.weight_decay=1e-4 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resulting config and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    lock_folder(p, "workdir")
