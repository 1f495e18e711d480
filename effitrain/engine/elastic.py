"""Elastic resume: continue a ZeRO-1/2 run with a different number of processes.

ZeRO partitions the optimizer state (and, at stage 2, the gradients) over the processes that saved it, and DeepSpeed
refuses to load such a checkpoint into another world size.  Its *universal checkpoint* format stores every
parameter's fp32 master weight and optimizer moments whole (``zero/<param>/fp32.pt, exp_avg.pt, ...``), which any
world size can load with ``checkpoint: {load_universal: true}`` in the DeepSpeed config
(``deepspeed.checkpoint.ds_to_universal``; DeepSpeed's docs: "Universal Checkpointing").

The conversion is written beside the checkpoint, ``checkpoints/step_00000100.universal``, never inside it (the
original stays byte-for-byte as its ``meta.json`` records), atomically (``.tmp-`` folder, checksums, ``COMPLETE``
marker, rename) and is reused by the next resume at another world size; :func:`effitrain.engine.checkpoint.prune`
removes it together with its checkpoint.  Everything the loop itself saved (step counters, the sampler, hooks, RNG)
is read from the original checkpoint; the sampler converts its position to the new world size itself.
"""

from __future__ import annotations

import json
import shutil
from argparse import Namespace
from pathlib import Path
from typing import Callable, Optional

from effitrain.engine import checkpoint as ckpt
from effitrain.fsutil import fsync_dir

UNIVERSAL_SUFFIX = ".universal"
ENGINE_TAG = "ds"  # the folder of DeepSpeed's own files inside a checkpoint (Trainer.save_checkpoint's tag)


def saved_world_size(path: Path) -> int:
    """How many processes wrote the checkpoint: recorded in its ``meta.json``; for a checkpoint from before that
    record, the number of ZeRO optimizer partitions DeepSpeed wrote (1 without ZeRO)."""
    try:
        recorded = json.loads((path / ckpt.META).read_text()).get("world_size")
        if recorded:
            return int(recorded)
    except (OSError, ValueError):
        pass
    return max(1, len(list((path / ENGINE_TAG).glob("*zero_pp_rank_*_optim_states.pt"))))


def universal_path(path: Path) -> Path:
    return path.parent / (path.name + UNIVERSAL_SUFFIX)


def engine_checkpoint_for(path: Path, *, world_size: int, zero_stage: int, is_main: bool,
                          barrier: Callable[[], None], report: Callable[[str], None]) -> Optional[Path]:
    """The folder DeepSpeed should load for a resume from ``path`` with ``world_size`` processes: None when the
    checkpoint's own files fit (same world size, or ZeRO-0 whose optimizer state is not partitioned), else the
    universal conversion (made on the main process, verified, then shared by all).  Every rank must call it."""
    saved = saved_world_size(path)
    if saved == world_size or zero_stage == 0:
        return None
    target = universal_path(path)
    if is_main:
        if ckpt.is_complete(target):
            try:
                ckpt.verify_checkpoint(target)
                report(f"resume: {saved} -> {world_size} processes: reusing the universal checkpoint {target.name}")
            except ckpt.CheckpointDamaged as exc:
                report(f"warning: {exc}; converting again")
                _discard(target)
        if not ckpt.is_complete(target):
            report(f"resume: {saved} -> {world_size} processes: converting {path.name} to DeepSpeed's universal "
                   f"format in {target.name} (ZeRO-{zero_stage} state is partitioned by world size)")
            convert_to_universal(path, target)
    barrier()
    return target


def convert_to_universal(path: Path, target: Path) -> None:
    """Run DeepSpeed's ``ds_to_universal`` on ``path/ds`` into ``target/ds``, atomically."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = target.parent / f".tmp-{target.name}"
    if tmp.exists():  # left over by a process that died mid-conversion
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        # One worker each: the conversion runs inside the training process, which must not fork a pool.
        # inject_missing_state: the "universal_checkpoint_info" that Megatron-style clients save describes tensor-
        # and pipeline-parallel slicing; a data-parallel model has none, and DeepSpeed's own option records the
        # format version in its place.
        ds_to_universal(Namespace(input_folder=str(path / ENGINE_TAG), output_folder=str(tmp / ENGINE_TAG),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True))
        step = json.loads((path / ckpt.META).read_text()).get("step", 0)
        ckpt.seal(tmp, step, {"universal_of": path.name, "source_world_size": saved_world_size(path)})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(target)
    fsync_dir(target.parent)


def _discard(target: Path) -> None:
    trash = target.parent / f".trash-{target.name}"
    target.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)
