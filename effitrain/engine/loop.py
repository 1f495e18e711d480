"""The training loop over a DeepSpeed engine.

It knows nothing of particular methods: everything method-specific happens in hooks (``effitrain.engine.events``)
or in the blocks that built the model, optimizer and sampler.  Per step it does the forward/backward/step calls,
keeps the loss on the device, and ticks the progress bar; host syncs happen only at log, eval and save points (plus
the one inside the non-finite guard).
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from effitrain.console import say, say_from_signal_handler
from effitrain.engine import checkpoint as ckpt
from effitrain.engine.events import EventBus
from effitrain.engine.guard import NonFiniteGuard
from effitrain.engine.metrics import device_peak_flops, flops_per_token, peak_memory_bytes
from effitrain.objectives.common import mean_token_loss
from effitrain.run_layout import CHECKPOINTS
from effitrain.engine.state import State
from effitrain.memory import held_gradient_bytes, memory_report
from effitrain.errors import RunFailed


class StopSignal:
    """SIGTERM / SIGUSR1 (what SLURM sends before pre-emption), SIGUSR2 (submitit's warning before a time limit or
    a preemption, docs/cluster.md) and Ctrl-C (SIGINT) ask the loop to save and exit at the next check.  A second Ctrl-C exits at once (KeyboardInterrupt), without saving."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        first_ctrl_c = signum == signal.SIGINT and self.received != signal.SIGINT
        if signum == signal.SIGINT and not first_ctrl_c:
            raise KeyboardInterrupt
        # Recorded before the message is written: Python runs a second signal's handler between any two bytecodes,
        # including inside this one, so a Ctrl-C that lands during the write must already see the first one.
        self.received = signum
        if first_ctrl_c:
            say_from_signal_handler("Ctrl-C: saving a checkpoint at the end of this step (press Ctrl-C again to "
                                    "quit without saving)", err=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class LogWindow:
    """The steps since the last log line: the summed loss that line will average, and the training time it will
    divide the tokens by (evaluation and saving excluded).

    It is part of every checkpoint (per rank: each rank sums its own losses), so that a run stopped between two log
    lines (Ctrl-C, SIGTERM, a save_every that is not a multiple of log_every) logs, once resumed, exactly the line
    the run that was never stopped logs: the same mean over the same steps, not a mean over only the steps after
    the resume."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)  # summed step losses, kept on the device (no host sync)
        self.steps = 0
        self.start = time.perf_counter()
        self.paused = 0.0           # seconds of evaluation and saving inside the window
        self.carried = 0.0          # training seconds of this window spent before the resume

    def add(self, step_loss: torch.Tensor) -> None:
        self.loss_sum += step_loss
        self.steps += 1

    def seconds(self, now: float) -> float:
        return max(now - self.start - self.paused + self.carried, 1e-9)

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.steps = 0
        self.start, self.paused, self.carried = time.perf_counter(), 0.0, 0.0

    def state_dict(self, now: float) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum.detach().cpu(), "steps": self.steps, "seconds": self.seconds(now)
                if self.steps else 0.0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum = state["loss_sum"].to(self.loss_sum.device)
        self.steps = int(state["steps"])
        self.start, self.paused, self.carried = time.perf_counter(), 0.0, float(state["seconds"])


def _any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag, true if it is true on any rank (one small all-reduce)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([float(f) for f in flags], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]
    return flags


class Trainer:
    def __init__(self, *, state: State, bus: EventBus, packed_train: Any, eval_sets: dict[str, Any],
                 sinks: Any, guard: NonFiniteGuard, seq_len: int, objective: Callable[..., Any],
                 save_final_model: Callable[[], None], on_started: Callable[[], None] = lambda: None) -> None:
        self.state = state
        self.bus = bus
        self.train_ids = packed_train           # numpy int array [N, seq_len]
        self.eval_sets = eval_sets              # domain -> numpy int array
        self.sinks = sinks
        self.guard = guard
        # what is minimised: objective(engine, batch, state) -> (loss, metrics), built by the objective block
        self.objective = objective
        self._metric_sums: dict[str, torch.Tensor] = {}  # the objective's metrics summed since the last log line
        self._metric_count = 0
        guard.watch_clipping(state.engine)  # so the logged grad_norm is the one before clipping in every mode
        self.seq_len = seq_len
        self.save_final_model = save_final_model
        self.on_started = on_started  # called once, after the first optimizer step of this launch
        self.train_cfg = state.spec.train
        self.device = state.engine.device
        self.stop = StopSignal()
        self.is_main = state.rank == 0
        self.global_batch = self.train_cfg.micro_batch_size * self.train_cfg.grad_accum * state.data_parallel_size
        self.tokens_per_step = self.global_batch * seq_len
        self.flops_per_token = flops_per_token(state.model, seq_len)
        self._peak_flops = device_peak_flops()
        self.tokens_per_s: float = 0.0
        self.gradient_bytes_at_step: Optional[int] = None  # gradients held just before this launch's first step
        # the optimizer's state right after this launch's first step, when Adam-like optimizers have allocated all of
        # it; a method that frees state (a momentum reset on the last step) must not report a smaller state
        self.optimizer_state_bytes_at_step: Optional[int] = None
        self.train_seconds = 0.0
        self.window = LogWindow(self.device)

    # ------------------------------------------------------------------------------------------------- batches
    def _to_batch(self, array: np.ndarray) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.ascontiguousarray(array)).to(self.device, dtype=torch.long, non_blocking=True)
        if ids.dim() > 2:  # chat rows carry their own labels and position ids (effitrain.data.chat)
            from effitrain.data.chat import to_batch

            return to_batch(ids)
        return {"input_ids": ids, "labels": ids}

    # ------------------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean token loss per domain on the held-out split; each rank takes a strided share of the sequences.
        Always the model's own next-token loss, never the training objective, so that eval losses of runs with
        different objectives (distillation, weighting, layer-wise) stay comparable."""
        engine, st = self.state.engine, self.state
        engine.eval()
        mb = self.train_cfg.micro_batch_size
        sums = torch.zeros(len(self.eval_sets), 2, dtype=torch.float64, device=self.device)  # loss sum, count
        # an objective with sub-models (layerwise) also reports each one's loss: eval_loss_depth/K over all domains
        depth_losses = getattr(self.objective, "eval_losses", None)
        depth_sums: dict[str, torch.Tensor] = {}
        for i, (domain, rows) in enumerate(self.eval_sets.items()):
            limit = min(len(rows), self.train_cfg.eval_batches * mb)
            mine = np.arange(st.rank, limit, st.world_size)
            for start in range(0, len(mine), mb):
                batch = self._to_batch(rows[mine[start:start + mb]])
                # the next-token loss from the logits: a model's own .loss may carry extra terms (an MoE router's
                # load-balancing loss) that are not the eval loss
                loss = mean_token_loss(engine(**batch).logits, batch["labels"])
                n = batch["input_ids"].shape[0]
                sums[i, 0] += loss.double() * n
                sums[i, 1] += n
                for name, value in (depth_losses(engine, batch) if depth_losses else {}).items():
                    depth_sums[name] = depth_sums.get(name, 0) + value.double() * n
        names = sorted(depth_sums)
        depth_totals = torch.stack([depth_sums[n] for n in names]) if names else None
        if dist.is_initialized() and st.world_size > 1:
            dist.all_reduce(sums)
            if depth_totals is not None:
                dist.all_reduce(depth_totals)
        engine.train()
        values = sums.cpu().numpy()
        result = {f"eval_loss/{d}": float(values[i, 0] / max(values[i, 1], 1)) for i, d in enumerate(self.eval_sets)}
        result["eval_loss"] = float(values[:, 0].sum() / max(values[:, 1].sum(), 1))
        for name, total in zip(names, depth_totals.tolist() if depth_totals is not None else []):
            result[name] = float(total / max(values[:, 1].sum(), 1))
        return result

    def _eval_and_log(self) -> None:
        st = self.state
        st.eval_metrics = self.evaluate()
        self.bus.emit("eval_end", st)
        if self.is_main:
            self.sinks.log({"step": st.step, "tokens": st.tokens, **st.eval_metrics})

    # ------------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        st = self.state
        root = st.run_dir / CHECKPOINTS
        client = {"step": st.step, "micro_step": st.micro_step, "tokens": st.tokens,
                  "sampler": st.sampler.state_dict(), "hooks": self.bus.state_dict(),
                  "guard": self.guard.state_dict(), "train_seconds": self.train_seconds}
        log_window = self._log_window_state()  # before the save: its time is not the window's training time

        def write(tmp: Path) -> None:
            st.engine.save_checkpoint(str(tmp), tag="ds", client_state={}, save_latest=False)
            objective_state = getattr(self.objective, "state_dict", None)  # per-rank state, e.g. grpo's samples
            torch.save({"python": random.getstate(), "numpy": np.random.get_state(),
                        "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                        "objective": objective_state() if objective_state is not None else None,
                        "log_window": log_window},
                       tmp / f"rank{st.rank}.pt")
            if self.is_main:
                torch.save(client, tmp / "state.pt")

        barrier = dist.barrier if dist.is_initialized() and st.world_size > 1 else (lambda: None)
        try:
            path = ckpt.write_atomically(root, st.step, write, is_writer=self.is_main, barrier=barrier,
                                         meta={"tokens": st.tokens, "world_size": st.world_size,  # elastic resume
                                               "micro_batch_size": self.train_cfg.micro_batch_size,
                                               "grad_accum": self.train_cfg.grad_accum})
        except ckpt.DiskFull as exc:
            raise RunFailed(str(exc)) from None
        if self.is_main:
            ckpt.prune(root, self.train_cfg.keep_checkpoints)
        self.bus.emit("checkpoint", st)
        return path

    def load_checkpoint(self, path: Path, engine_dir: Optional[Path] = None) -> None:
        """Resume from ``path``; DeepSpeed's state comes from ``engine_dir`` instead when given (the universal
        conversion of an elastic resume, effitrain.engine.elastic), the loop's own state always from ``path``."""
        st = self.state
        loaded, _ = st.engine.load_checkpoint(str(engine_dir or path), tag="ds", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {engine_dir or path}")
        client = torch.load(path / "state.pt", weights_only=False)
        st.step, st.micro_step, st.tokens = client["step"], client["micro_step"], client["tokens"]
        st.sampler.load_state_dict(client["sampler"])
        self.bus.load_state_dict(client["hooks"])
        self.guard.load_state_dict(client["guard"])
        self.train_seconds = client.get("train_seconds", 0.0)
        rng_file = path / f"rank{st.rank}.pt"
        if rng_file.exists():  # absent when resuming with more ranks than saved: fresh RNG for the new ones
            rng = torch.load(rng_file, weights_only=False)
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            if rng.get("objective") is not None:
                self.objective.load_state_dict(rng["objective"])
            self._load_log_window(rng.get("log_window"))

    # ------------------------------------------------------------------------------------------------- logging
    def _log_window_state(self) -> dict[str, Any]:
        """This rank's part of the next log line: the window's loss and time, the objective's metric sums, and the
        hooks' values not logged yet (e.g. LISA's switch count at a step between two log lines)."""
        return {"world_size": self.state.world_size, **self.window.state_dict(time.perf_counter()),
                "metric_sums": {name: value.detach().cpu() for name, value in self._metric_sums.items()},
                "metric_count": self._metric_count, "hook_metrics": dict(self.state.metrics)}

    def _load_log_window(self, saved: Optional[dict[str, Any]]) -> None:
        """Continue the log window the checkpoint was saved in.  A checkpoint from before windows were saved, or
        saved by another number of processes (each rank's sums belong to its own rows), starts an empty window:
        the first line after the resume then averages only the steps since the resume."""
        if saved is None or saved["world_size"] != self.state.world_size:
            return
        self.window.load_state_dict(saved)
        self._metric_sums = {name: value.to(self.device) for name, value in saved["metric_sums"].items()}
        self._metric_count = int(saved["metric_count"])
        self.state.metrics = dict(saved["hook_metrics"])

    def _add_metrics(self, metrics: dict[str, torch.Tensor]) -> None:
        """Sum the objective's detached 0-d metrics on the device: no host sync until the log point."""
        for name, value in metrics.items():
            total = self._metric_sums.get(name)
            self._metric_sums[name] = value.detach().double() if total is None else total + value.detach()
        self._metric_count += 1

    def _window_metrics(self) -> dict[str, float]:
        """The mean of each objective metric over the micro-batches since the last log line (and over ranks)."""
        if not self._metric_sums:
            return {}
        names = sorted(self._metric_sums)
        means = torch.stack([self._metric_sums[n] for n in names]) / max(self._metric_count, 1)
        if dist.is_initialized() and self.state.world_size > 1:
            dist.all_reduce(means)
            means /= self.state.world_size
        self._metric_sums, self._metric_count = {}, 0
        return dict(zip(names, means.tolist()))

    def _log(self) -> None:
        """One log line for the window of steps since the last one.  ``.item()`` is the loop's host sync, so the
        window's time is read after it (on a GPU the queued work has finished by then)."""
        st, engine, window = self.state, self.state.engine, self.window
        window_steps = window.steps
        loss = (window.loss_sum / window_steps).item()
        if dist.is_initialized() and st.world_size > 1:
            t = torch.tensor([loss], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            loss = float(t.item()) / st.world_size
        elapsed = window.seconds(time.perf_counter())
        self.train_seconds += elapsed
        self.tokens_per_s = self.tokens_per_step * window_steps / elapsed
        line = {"step": st.step, "tokens": st.tokens, "loss": loss, "lr": st.scheduler.get_last_lr()[0],
                "tokens_per_s": self.tokens_per_s, "step_time_s": elapsed / window_steps,
                "peak_memory_bytes": peak_memory_bytes(), "skipped_steps": self.guard.total_skipped}
        grad_norm = engine.get_global_grad_norm()  # before clipping (ZeRO and bf16 optimizers set it; else None)
        if grad_norm is None:
            grad_norm = self.guard.last_grad_norm
        if grad_norm is not None:
            line["grad_norm"] = float(grad_norm)
        if self._peak_flops:
            line["mfu"] = self.tokens_per_s * self.flops_per_token / st.world_size / self._peak_flops
        line.update(self._window_metrics())
        line.update(st.metrics)
        st.metrics = {}
        if self.is_main:
            self.sinks.log(line)
        window.reset()

    # ------------------------------------------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        st, cfg, engine = self.state, self.train_cfg, self.state.engine
        self.stop.install()
        try:
            return self._fit(st, cfg, engine)
        finally:
            self.stop.restore()
            self.sinks.close()

    def _fit(self, st: State, cfg: Any, engine: Any) -> dict[str, Any]:
        self.bus.emit("fit_start", st)
        engine.train()
        if st.step == 0 and cfg.evaluates_at_start():
            self._eval_and_log()
        batches = iter(st.sampler)
        window = self.window  # restored by load_checkpoint when the run was stopped between two log lines
        window.start, window.paused = time.perf_counter(), 0.0  # building and loading are not training time
        last_saved = st.step if st.step > 0 else -1
        stopped_by: Optional[str] = None
        started = False
        last_saved_at = time.monotonic()

        while st.step < cfg.max_steps:
            step_loss = torch.zeros((), device=self.device)
            for _ in range(cfg.grad_accum):
                st.batch = self._to_batch(self.train_ids[next(batches)])
                self.bus.emit("batch_start", st)
                st.loss, metrics = self.objective(engine, st.batch, st)
                self._add_metrics(metrics)
                self.bus.emit("after_forward", st)
                engine.backward(st.loss)
                self.bus.emit("after_backward", st)
                step_loss += st.loss.detach()
                if engine.is_gradient_accumulation_boundary():
                    self.guard.arm(step_loss)
                    if self.gradient_bytes_at_step is None:  # after the step DeepSpeed frees them: read them now
                        self.gradient_bytes_at_step = held_gradient_bytes(st.model)
                engine.step()
                st.micro_step += 1
            st.step += 1
            st.tokens += self.tokens_per_step
            if not started:
                started = True
                self.optimizer_state_bytes_at_step = memory_report(st.model, st.optimizer).get("optimizer_state_bytes")
                self.on_started()
            window.add(step_loss / cfg.grad_accum)
            self.bus.emit("step_end", st)
            if self.is_main:
                self.sinks.on_step(st.step)
            if self.guard.should_stop:
                st.should_stop, st.stop_reason = True, f"{self.guard.consecutive_bad} non-finite steps in a row"

            at_log = st.step % cfg.log_every == 0 or st.step == cfg.max_steps
            if at_log:
                self._log()
            # one process sees a signal at the next step; several agree on it at log points (a collective)
            signalled = self.stop.received is not None
            timed = cfg.save_every_minutes > 0 and time.monotonic() - last_saved_at >= 60 * cfg.save_every_minutes
            if st.world_size > 1:  # the ranks agree at log points (a collective), never one rank alone
                signalled, timed = _any_rank([signalled, timed], self.device) if at_log else (False, False)
            if signalled:
                received = self.stop.received
                stopped_by = f"signal {signal.Signals(received).name if received else 'on another rank'}"

            pause_start = time.perf_counter()  # evaluation and saving do not count towards tokens/s
            if cfg.eval_every and st.step % cfg.eval_every == 0 and st.step < cfg.max_steps:
                self._eval_and_log()
            if (cfg.save_every and st.step % cfg.save_every == 0) or timed or stopped_by or st.should_stop:
                window.paused += time.perf_counter() - pause_start  # the window's training time ends here
                pause_start = time.perf_counter()
                self.save_checkpoint()
                last_saved, last_saved_at = st.step, time.monotonic()
            if stopped_by or st.should_stop:
                break
            window.paused += time.perf_counter() - pause_start

        finished = st.step >= cfg.max_steps and not st.should_stop
        if finished:
            self._eval_and_log()
            if last_saved != st.step:
                self.save_checkpoint()
            self.save_final_model()
        self.bus.emit("fit_end", st)
        return {"finished": finished, "stopped_by": stopped_by or st.stop_reason, "signal": stopped_by is not None,
                "signal_name": signal.Signals(received).name if stopped_by and received else None,
                "train_seconds": self.train_seconds}
