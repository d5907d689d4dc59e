"""The fine-tuning loop: ``finetune(FinetuneSettings(...))``.

Output folder
-------------
``settings.json``   what is trained and how (a resumed run must match it, epochs aside)
``split.json``      the seeded training/validation cases
``train_state.pt``  everything a resume needs: weights (heads too), optimizer, scheduler, step,
                    history, random generator states of every process; written at the end of each
                    epoch and on Ctrl+C, always whole (temporary file, then rename)
``model.pt``        the latest model as the engine loads it (export.py), rewritten each epoch
``best.pt``         the model with the best validation Dice so far
``history.json``    loss per optimizer step and validation Dice per epoch (epoch 0: starting model)
``curves.png``      the same as a picture

Training (see forward.py for the forward pass): AdamW with linear warm-up and cosine decay to a tenth
of the learning rate, gradient clipping, ``accumulate`` micro-batches per optimizer step, bf16
autocast on CUDA (float32 elsewhere), the image encoder frozen unless ``unfreeze_encoder``.

Several GPUs: under ``torchrun --nproc_per_node N`` each process reads RANK / WORLD_SIZE / LOCAL_RANK
(as the evaluation runner does), takes GPU LOCAL_RANK, trains on its share of one global batch of
``batch * N`` clips that every process draws alike (shard.py), and ``DistributedDataParallel`` averages
the gradients: the losses are those of one process with ``--batch`` N times larger. Validation cases
are shared out and the Dice summed across processes; rank 0 writes the files. No option changes: the
same command runs on one GPU, on the CPU, or under torchrun.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from medsam2.datasets.training import TrainingDataset, open_training_dataset, split_cases
from medsam2.distributed import RankInfo, rank_info
from medsam2.errors import MedSAM2Error, ModelError
from medsam2.evaluation.protocols import PromptProtocol
from medsam2.evaluation.settings import EvaluationSettings
from medsam2.finetune.curves import plot_curves
from medsam2.finetune.data import CaseStore
from medsam2.finetune.export import export_checkpoint, keep_copy
from medsam2.finetune.forward import FinetuneModel
from medsam2.finetune.heads import boundary_head_for, srpp_head_for
from medsam2.finetune.losses import LossWeights
from medsam2.finetune.sampler import ClipSampler
from medsam2.finetune.settings import (
    DEFAULT_HEAD_LR,
    RESUME_MAY_CHANGE,
    FinetuneResult,
    FinetuneSettings,
)
from medsam2.finetune.shard import ShardedSampler
from medsam2.finetune.validation import reduce_validation, validate
from medsam2.geometry import SliceLayout, VolumeGeometry
from medsam2.intensity import parse_intensity
from medsam2.io.atomic import atomic_output, write_text_atomic
from medsam2.predictor import EngineVideoPredictor

Log = Callable[[str], None]

STATE_FILE = "train_state.pt"
# ------------------------------------------------------------------------------------------ helpers
def _layout_for(axis: str) -> Callable[[VolumeGeometry], SliceLayout]:
    def layout(geometry: VolumeGeometry) -> SliceLayout:
        return SliceLayout.for_axis(geometry.voxel_axis_for_view(axis), geometry)

    return layout


def _device(settings: FinetuneSettings, info: RankInfo) -> torch.device:
    from medsam2.devices import resolve_device

    device = resolve_device(settings.device)
    if info.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def _share_cpu(info: RankInfo, device: torch.device) -> None:
    """Under torchrun on the CPU, give each process its share of the cores. Each taking all of them
    (what resolve_device, and so load_model, sets) oversubscribes the machine, and OpenMP's spinning
    threads then slow every process many times over. Called after the model is loaded, for that reason."""
    if info.world_size < 2 or device.type != "cpu":
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(1, local)))


def _init_distributed(info: RankInfo, device: torch.device) -> bool:
    import torch.distributed as dist

    if not info.launched or dist.is_initialized():
        return info.launched
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def _modality_key(modality: str) -> Optional[str]:
    text = (modality or "").upper()
    if "CT" in text:
        return "CT"
    if any(tag in text for tag in ("MR", "T1", "T2", "FLAIR", "ADC", "DWI", "PD")):
        return "MR"
    if "US" in text or "ULTRASOUND" in text:
        return "US"
    return None


def _intensity_spec(settings: FinetuneSettings, entry: Any, dataset: TrainingDataset) -> str:
    if settings.intensity:
        parse_intensity(settings.intensity)
        return settings.intensity
    if entry is not None:
        modality = _modality_key(dataset.modality)
        table = dict(getattr(entry, "modality_intensity", ()) or ())
        spec = table.get(modality or "") or table.get("*")
        if spec:
            return str(spec)
    return "minmax"


def _load_model(settings: FinetuneSettings, device: torch.device) -> tuple[EngineVideoPredictor, Any]:
    if not settings.model and not settings.checkpoint:
        raise ModelError("no starting model given; pass --model NAME or --checkpoint FILE")
    from medsam2.models.registry import load_model

    predictor, entry = load_model(
        name=settings.model,
        checkpoint=settings.checkpoint,
        config=settings.config,
        image_size=settings.image_size,
        device="cpu",
        progress=not settings.quiet,
    )
    return predictor.to(device), entry


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return dict(rng.bit_generator.state)


def _gather(obj: Any, distributed: bool) -> list[Any]:
    if not distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier(distributed: bool) -> None:
    if distributed:
        import torch.distributed as dist

        dist.barrier()


def _check_settings(out: Path, settings: FinetuneSettings, resume: bool) -> None:
    path = out / "settings.json"
    wanted = settings.as_json()
    if not path.is_file():
        if resume:
            raise MedSAM2Error(f"nothing to resume in {out}: it holds no training run (no settings.json)")
        if out.is_dir() and any(out.iterdir()):
            # never write model.pt/best.pt over files of the user's that happen to be there
            raise MedSAM2Error(f"--out {out} is a folder with other files in it; choose a new or empty folder")
        return
    try:
        existing = json.loads(path.read_text())
    except ValueError:
        existing = {}
    if not resume:
        if not (out / STATE_FILE).is_file():
            return  # our own run that never finished an epoch: nothing to lose, start it again
        raise MedSAM2Error(
            f"{out} already holds a training run; pass --resume to continue it or choose another --out folder"
        )
    differing = sorted(
        k for k in set(wanted) | set(existing) if k not in RESUME_MAY_CHANGE and existing.get(k) != wanted.get(k)
    )
    if differing:
        shown = ", ".join(f"{k} ({existing.get(k)!r} -> {wanted.get(k)!r})" for k in differing[:3])
        raise MedSAM2Error(f"cannot resume {out} with different settings: {shown}; only epochs and device may change")


def _schedule(settings: FinetuneSettings) -> Callable[[int], float]:
    total = settings.epochs * settings.steps
    warmup = settings.warmup_steps if settings.warmup_steps is not None else min(200, max(1, total // 20))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# ------------------------------------------------------------------------------------------ the run
def finetune(
    settings: FinetuneSettings,
    *,
    resume: bool = False,
    predictor: Optional[EngineVideoPredictor] = None,
    log: Optional[Log] = None,
) -> FinetuneResult:
    """Fine-tune a model on a labelled dataset (see the module notes). ``predictor`` starts from an
    already built model instead of ``settings.model``/``checkpoint`` (``settings.config`` is then
    required, to describe the exported checkpoint)."""
    info = rank_info()
    main_process = info.rank == 0
    say: Log = log or ((lambda m: print(m, file=sys.stderr, flush=True)) if not settings.quiet else (lambda m: None))

    def note(message: str) -> None:
        if main_process:
            say(message)

    out = Path(settings.out)
    if out.exists() and not out.is_dir():
        raise MedSAM2Error(f"--out {out} is a file; choose a folder")
    _check_settings(out, settings, resume)
    device = _device(settings, info)
    distributed = _init_distributed(info, device)

    # Data first where it costs nothing: a wrong folder or label fails before any model is loaded.
    dataset = open_training_dataset(settings.dataset, settings.layout, settings.labels, settings.channel)
    entry = None
    if predictor is None:
        predictor, entry = _load_model(settings, device)
        config, image_size = entry.config, int(entry.image_size)
    else:
        if not settings.config:
            raise ModelError("a predictor passed in needs settings.config (its sam2 config name) for the export")
        config, image_size = settings.config, int(predictor.image_size)
        predictor = predictor.to(device)
    _share_cpu(info, device)
    intensity = _intensity_spec(settings, entry, dataset)
    layout_for = _layout_for(settings.axis)
    note(f"checking {len(dataset.records)} case(s) of {dataset.root} ...")
    index = dataset.check(layout_for, parse_intensity(intensity))
    train_ids, val_ids = split_cases(list(index), settings.val_fraction, settings.seed)
    note(
        f"{len(train_ids)} training / {len(val_ids)} validation case(s); intensity {intensity}; "
        f"structures: {', '.join(sorted({s for e in index.values() for s, v in e.present.items() if v}))}"
    )

    # Model, heads, optimizer.
    torch.manual_seed(settings.seed)
    weights = LossWeights(srpp=settings.effective_srpp_weight, bd=settings.bd_weight)
    srpp = srpp_head_for(predictor) if weights.srpp > 0 and settings.mode == "3d" else None
    boundary = boundary_head_for(predictor) if weights.bd > 0 else None
    cache_gb = (
        settings.feature_cache_gb if settings.feature_cache_gb is not None else (4.0 if device.type == "cpu" else 0.0)
    )
    model = FinetuneModel(
        predictor,
        weights,
        srpp=srpp,
        boundary=boundary,
        freeze_encoder=not settings.unfreeze_encoder,
        feature_cache_bytes=int(cache_gb * 2**30),
    ).to(device)
    trainable = [p for p in model.sam.parameters() if p.requires_grad]
    head_params = [p for head in (srpp, boundary) if head is not None for p in head.parameters()]
    groups: list[dict[str, Any]] = [{"params": trainable, "lr": settings.lr}]
    if head_params:
        head_lr = settings.head_lr if settings.head_lr is not None else DEFAULT_HEAD_LR
        groups.append({"params": head_params, "lr": head_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings))

    # One generator stream on every process: they draw the same global batch and each trains its own
    # rows (shard.py), so a torchrun job follows the one-process run of the same global batch.
    rng = np.random.default_rng([settings.seed, 0])
    history: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
    step, best_dice = 0, float("-inf")
    if resume:
        step, best_dice, history = _restore(out, model, optimizer, scheduler, rng, info, train_ids, val_ids)
        note(f"resuming {out} at step {step}")
        if step >= settings.epochs * settings.steps:
            note(f"{out} has finished its {step // settings.steps} epoch(s); raise --epochs to train longer")
    # (before anything is written: a clip length the cases cannot give fails here)
    store = CaseStore(
        dataset, layout_for, parse_intensity(intensity), image_size, device, int(settings.case_cache_gb * 2**30)
    )
    global_sampler = ClipSampler(
        store,
        index,
        train_ids,
        mode=settings.mode,
        clip_length=settings.clip_length,
        prompt_slices=settings.prompt_slices,
        prompt_kinds=settings.prompt_kinds,
        batch_size=settings.batch * info.world_size,
        rng=rng,
        log=note,
    )
    sampler = ShardedSampler(global_sampler, info.rank, info.world_size)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "settings.json", json.dumps(settings.as_json(), indent=2) + "\n")
        write_text_atomic(out / "split.json", json.dumps({"train": train_ids, "validation": val_ids}, indent=2) + "\n")
    _barrier(distributed)

    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        engine: torch.nn.Module = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    else:
        engine = model

    val_settings = EvaluationSettings(
        protocol=PromptProtocol(prompt=settings.val_prompt, slice_choice="middle", seed=settings.seed),
        axis=settings.axis,
        intensity=intensity,
    )

    def run_validation(epoch: int) -> Optional[float]:
        if not val_ids:
            return None
        mine = [c for i, c in enumerate(val_ids) if i % info.world_size == info.rank]
        model.train(False)
        try:
            result = validate(predictor, dataset, mine, val_settings, settings.mode, settings.val_max_slices)
        finally:
            model.train(True)
        mean, count = reduce_validation(result)
        history["validation"].append({"epoch": epoch, "step": step, "dice": mean, "scored": count})
        return mean

    def save(epoch: int) -> None:
        states = _gather(_rng_state(rng), distributed)
        if main_process:
            rng_states: dict[str, Any] = {
                "numpy": states,
                "torch": torch.get_rng_state(),
                "world_size": info.world_size,
            }
            if device.type == "cuda":
                rng_states["cuda"] = torch.cuda.get_rng_state(device)
            payload = {
                "model": {k: v.detach().cpu() for k, v in predictor.state_dict().items()},
                "heads": {
                    name: head.state_dict() for name, head in (("srpp", srpp), ("bd", boundary)) if head is not None
                },
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "epoch": epoch,
                "best_dice": best_dice,
                "history": history,
                "rng": rng_states,
                "split": {"train": train_ids, "validation": val_ids},
            }
            with atomic_output(out / STATE_FILE) as tmp:
                torch.save(payload, tmp)
            write_text_atomic(out / "history.json", json.dumps(history, indent=1) + "\n")
            plot_curves(
                out / "curves.png", history["train"], history["validation"], title=f"fine-tuning {dataset.name}"
            )
        _barrier(distributed)

    model.train(True)
    if not resume and not history["validation"]:
        dice0 = run_validation(0)
        if dice0 is not None:
            note(f"starting model: validation Dice {dice0:.3f}")

    export = {"config": config, "image_size": image_size, "intensity": intensity}
    total_steps = settings.epochs * settings.steps
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    epoch = step // settings.steps
    try:
        while step < total_steps:
            epoch = step // settings.steps + 1
            bar = _progress(settings, main_process, epoch, step - (epoch - 1) * settings.steps)
            started = time.perf_counter()
            while step < epoch * settings.steps:
                record = _optimizer_step(
                    engine, sampler, optimizer, scheduler, [trainable, head_params], settings, autocast, distributed
                )
                step += 1
                record["step"] = step
                if not math.isfinite(record["total"]):
                    raise MedSAM2Error(f"the training loss became {record['total']} at step {step}; lower --lr")
                history["train"].append(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['total']:.4f}")
            if bar is not None:
                bar.close()
            dice_now = run_validation(epoch)
            seconds = time.perf_counter() - started
            recent = [r["total"] for r in history["train"][-settings.steps :]]
            message = f"epoch {epoch}/{settings.epochs}: loss {np.mean(recent):.4f} ({seconds:.0f} s)"
            if dice_now is not None:
                message += f", validation Dice {dice_now:.3f}"
            note(message)
            improved = dice_now is not None and dice_now > best_dice
            if improved:
                best_dice = float(dice_now)  # type: ignore[arg-type]
            if main_process:
                export_checkpoint(out / "model.pt", predictor, **export)
                if improved:
                    keep_copy(out / "model.pt", out / "best.pt")
            save(epoch)
    except KeyboardInterrupt:
        # Keep what was trained: a resume continues from this very step. (Under torchrun the other
        # processes may be anywhere; there the last finished epoch is what a resume starts from.)
        if not distributed:
            save(epoch)
        raise

    baseline = (
        history["validation"][0]["dice"] if history["validation"] and history["validation"][0]["epoch"] == 0 else None
    )
    best = best_dice if math.isfinite(best_dice) else None
    if main_process and baseline is not None and best is not None and best <= baseline:
        note(f"warning: no epoch beat the starting model on validation (best {best:.3f}, start {baseline:.3f})")
    best_path = out / "best.pt" if (out / "best.pt").is_file() else None
    return FinetuneResult(out, out / "model.pt", best_path, step, epoch, baseline, best, history)


def _progress(settings: FinetuneSettings, main_process: bool, epoch: int, done: int) -> Any:
    if settings.quiet or not main_process:
        return None
    from tqdm import tqdm

    return tqdm(
        total=settings.steps,
        initial=done,
        desc=f"epoch {epoch}/{settings.epochs}",
        unit="step",
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    )


def _optimizer_step(
    engine: torch.nn.Module,
    sampler: Union[ClipSampler, ShardedSampler],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    trainable: Sequence[Any],
    settings: FinetuneSettings,
    autocast: Any,
    distributed: bool,
) -> dict[str, Any]:
    """``accumulate`` micro-batches, one optimizer step; returns the mean losses (over processes too).
    ``trainable``: the parameters, or sets of them clipped each on its own (SAM 2's, the heads'), so
    the size of the segmentation gradient does not scale the heads' updates."""
    sums: dict[str, float] = {}
    for micro in range(settings.accumulate):
        batch = sampler.next_batch()
        last = micro == settings.accumulate - 1
        sync = nullcontext() if (last or not distributed) else engine.no_sync()  # type: ignore[operator]
        with sync:
            with autocast:
                losses = engine(batch)
            (losses["total"] / settings.accumulate).backward()
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach()) / settings.accumulate
    if settings.grad_clip > 0:
        sets = [trainable] if all(isinstance(p, torch.Tensor) for p in trainable) else trainable
        for params in sets:
            if params:
                torch.nn.utils.clip_grad_norm_(list(params), settings.grad_clip)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if distributed:
        import torch.distributed as dist

        keys = sorted(sums)
        values = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            values = values.cuda()
        dist.all_reduce(values)
        sums = {k: float(v) / dist.get_world_size() for k, v in zip(keys, values.tolist())}
    return {**sums, "lr": lr}


def _restore(
    out: Path,
    model: FinetuneModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    rng: np.random.Generator,
    info: RankInfo,
    train_ids: list[str],
    val_ids: list[str],
) -> tuple[int, float, dict[str, list[dict[str, Any]]]]:
    from medsam2.models.build import load_state_dict_strict
    from medsam2.models.checkpoints import torch_load_weights_only

    path = out / STATE_FILE
    if not path.is_file():
        raise MedSAM2Error(f"nothing to resume in {out}: its first epoch never finished; run again without --resume")
    state = torch_load_weights_only(path, fix="delete the folder and train again")
    if not isinstance(state, dict) or "model" not in state:
        raise MedSAM2Error(f"{path} is not a training state written by medsam2 finetune")
    split = state.get("split", {})
    if split.get("train") != train_ids or split.get("validation") != val_ids:
        raise MedSAM2Error(
            f"the dataset's cases changed since {out} was started (training/validation split differs); "
            "train into a new folder"
        )
    load_state_dict_strict(model.sam, state["model"])
    heads = state.get("heads", {})
    for name, head in (("srpp", model.srpp), ("bd", model.boundary)):
        if head is not None:
            if name not in heads:
                raise MedSAM2Error(f"{path} has no {name} head; resume with the settings it was trained with")
            head.load_state_dict(heads[name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_state = state.get("rng", {})
    states = rng_state.get("numpy", [])
    if rng_state.get("world_size") == info.world_size and info.rank < len(states):
        rng.bit_generator.state = states[info.rank]
    # (a different number of processes draws fresh batches: the seeded generator of this rank)
    if "torch" in rng_state:
        torch.set_rng_state(rng_state["torch"])
    if "cuda" in rng_state and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng_state["cuda"])
    history = state.get("history", {"train": [], "validation": []})
    best = float(state.get("best_dice", float("-inf")))
    return int(state["step"]), best, history


__all__ = ["FinetuneResult", "FinetuneSettings", "finetune"]
