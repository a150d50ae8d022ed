"""The training loop shared by the tokenizer and generator stages.

It owns what both need and what is easy to get subtly wrong: the learning-rate schedule,
exact resume (weights, EMA, optimizers, RNG states, data position), atomic checkpoints, the
loss log and plot, progress. What a step computes is the caller's `step_fn`.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from models.ema import param_groups_for_adamw
from tasks.config import TrainConfig
from tasks.progress import Progress
from tasks.store import atomic_write_text
from tasks.training.checkpoint import CheckpointDir
from tasks.training.data import EpochOrder, Position, global_batches, rank_slice
from tasks.training.distributed import Processes, average_gradients, barrier, mean_over_processes

log = logging.getLogger("tok1d")
# Loss lines in the log (the terminal, the flow run's logs in the Prefect UI): about this many
# per run, on log steps, however long it is; every value is in the loss log either way.
LOSS_LINES = 10

# The folder under a run's work_dir that holds its checkpoints (what a rerun resumes from).
CHECKPOINT_DIR = "checkpoints"

# The phases of a training step, as torch.profiler labels (`phase`): bench/train_step.py sums
# them to show where a step's time goes. A label costs ~1 us when no profiler is active.
PHASES = ("data", "forward", "backward", "optimizer", "ema")


def phase(name: str) -> torch.profiler.record_function:
    """A profiler label around one of `PHASES` of a training step."""
    return torch.profiler.record_function(name)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to `min_ratio` of the base rate."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one step on one rank: every process draws its own masks and noise, and
    a resumed run draws exactly what the uninterrupted one drew, whatever RNG state it restored."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA (precision auto or bf16); full precision elsewhere."""
    use_bf16 = device.type == "cuda" and precision in ("auto", "bf16")
    if precision == "bf16" and device.type != "cuda":
        use_bf16 = device.type == "cpu"  # explicit request: honour it on CPU too
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def adamw(module: torch.nn.Module, config: TrainConfig, device: torch.device, lr: float | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups_for_adamw` with the `train` section's rate, betas and decay.

    The fused kernel updates every parameter in one pass (CPU and CUDA): the per-tensor loop of
    the default implementation costs more than the model's math for small models on CPU."""
    return torch.optim.AdamW(param_groups_for_adamw(module, config.weight_decay), lr=lr or config.lr,
                             betas=(config.betas[0], config.betas[1]), fused=device.type in ("cpu", "cuda"))


def log_values(logs: dict[str, Any]) -> dict[str, float]:
    """A step's logs (0-d tensors or floats) as floats, with one device-to-host copy for all of
    them: a `.item()` per value and step would stall a GPU every step, so the loop calls this
    only on the steps it logs or checkpoints."""
    tensors = {k: v for k, v in logs.items() if isinstance(v, torch.Tensor)}
    values = dict(logs)
    if tensors:
        values.update(zip(tensors, torch.stack([v.detach().float().reshape(()) for v in tensors.values()]).tolist()))
    return {k: float(v) for k, v in values.items()}


def check_finite(stage: str, step: int, logs: dict[str, float]) -> dict[str, float]:
    """Stop a diverged run before it logs or checkpoints a NaN: the rerun resumes from the last
    good checkpoint with whatever settings the user changes."""
    bad = [f"{k} is {v}" for k, v in logs.items() if not math.isfinite(v)]
    if bad:
        section = stage.replace("-", "_")
        raise FloatingPointError(f"{stage}: {', '.join(bad)} at step {step}; lower {section}.train.lr or "
                                 f"raise {section}.train.warmup_steps")
    return logs


def optimize(
    loss: torch.Tensor,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    grad_clip: float,
    processes: Processes,
    ddp_wrapped: bool,
) -> float:
    """Backward, cross-process gradient mean (if not DDP), clip, step. Returns the grad norm (a
    tensor: the loop reads logs on the host only on the steps it logs)."""
    optimizer.zero_grad(set_to_none=True)
    with phase("backward"):
        loss.backward()
        if not ddp_wrapped:
            average_gradients(module, processes)
    with phase("optimizer"):
        norm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        optimizer.step()
    return norm.detach()


@dataclass
class TrainingRun:
    """One training run: what to optimise, where its state lives, what a step does."""

    stage: str
    work_dir: Path
    total_steps: int
    batch_size: int
    warmup_steps: int
    min_lr_ratio: float
    checkpoint_every: int
    log_every: int
    # Modules saved in checkpoints by name ("model", "ema", "discriminator", ...): unwrapped.
    modules: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    processes: Processes
    order: EpochOrder
    step_fn: Callable[[np.ndarray, int], dict[str, Any]]  # logs: 0-d tensors or floats

    @classmethod
    def from_config(
        cls,
        stage: str,
        work_dir: Path,
        config: TrainConfig,
        modules: dict[str, torch.nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        processes: Processes,
        order: EpochOrder,
        step_fn: Callable[[np.ndarray, int], dict[str, Any]],
    ) -> "TrainingRun":
        """The run a stage's `train` section describes (steps, batch, schedule, checkpoint and log cadence)."""
        return cls(
            stage=stage,
            work_dir=work_dir,
            total_steps=config.steps,
            batch_size=config.batch_size,
            warmup_steps=config.warmup_steps,
            min_lr_ratio=config.min_lr_ratio,
            checkpoint_every=config.checkpoint_every,
            log_every=config.log_every,
            modules=modules,
            optimizers=optimizers,
            processes=processes,
            order=order,
            step_fn=step_fn,
        )

    @property
    def checkpoints(self) -> CheckpointDir:
        return CheckpointDir(self.work_dir / CHECKPOINT_DIR)

    @property
    def loss_log(self) -> Path:
        return self.work_dir / "losses.jsonl"


@dataclass
class TrainingResult:
    """Where a finished `train` call stands: its last step, the step it resumed from, the loss log."""

    steps: int
    resumed_from: int
    history: list[dict[str, float]]
    loss_log: Path  # the whole run's log (JSON lines), also of the steps before a resume


def _read_history(path: Path, up_to_step: int) -> list[dict[str, float]]:
    if not path.exists():
        return []
    history = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if entry["step"] <= up_to_step:
            history.append(entry)
    return history


def train(run: TrainingRun, on_step: Callable[[], None] | None = None) -> TrainingResult:
    """Run (or resume) to `total_steps`; checkpoints every `checkpoint_every` and at the end.
    `on_step` is called after every step (the thread governor follows the load there)."""
    processes = run.processes
    for optimizer in run.optimizers.values():
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
    step, position = 0, Position()
    latest = run.checkpoints.latest()
    if latest is not None:
        state = CheckpointDir.load(latest, run.modules, run.optimizers, map_location=processes.device)
        step, position = state["step"], Position(**state["position"])
    resumed_from = step
    # Entries after the checkpoint were made by the killed run; the resumed run makes them again.
    history = _read_history(run.loss_log, step)
    if processes.is_main:
        atomic_write_text(run.loss_log, "".join(json.dumps(h) + "\n" for h in history))
    progress = Progress(run.stage, run.total_steps, "training", unit="step", initial=step) if processes.is_main else None
    batches = global_batches(run.order, run.batch_size, position)
    line_every = max(run.log_every, math.ceil(run.total_steps / LOSS_LINES))
    next_line = step + line_every
    try:
        while step < run.total_steps:
            rows, position = next(batches)
            factor = lr_factor(step, run.total_steps, run.warmup_steps, run.min_lr_ratio)
            for optimizer in run.optimizers.values():
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
            logs = run.step_fn(rank_slice(rows, processes.rank, processes.world), step)
            step += 1
            log_now = step % run.log_every == 0 or step == run.total_steps
            checkpoint_now = step % run.checkpoint_every == 0 or step == run.total_steps
            postfix = {}
            if log_now:  # every process takes part in the mean, then all judge the same values
                logs = check_finite(run.stage, step, mean_over_processes(log_values(logs), processes))
                entry = {"step": step, "lr_factor": factor, **logs}
                history.append(entry)
                if processes.is_main:
                    with open(run.loss_log, "a") as handle:
                        handle.write(json.dumps(entry) + "\n")
                postfix = {k: f"{v:.4g}" for k, v in list(logs.items())[:3]}
                if processes.is_main and (step >= next_line or step == run.total_steps):
                    log.info("%s: step %d/%d %s", run.stage, step, run.total_steps,
                             " ".join(f"{k}={v:.4g}" for k, v in logs.items()))
                    next_line = step + line_every
            elif checkpoint_now:
                check_finite(run.stage, step, log_values(logs))
            if checkpoint_now:
                if processes.is_main:
                    run.checkpoints.save(
                        step, run.modules, run.optimizers, {"position": position.__dict__}
                    )
                barrier(processes)
            if progress is not None:
                progress.update(1, **postfix)
            if on_step is not None:
                on_step()
    finally:
        if progress is not None:
            progress.close()
    return TrainingResult(step, resumed_from, history, run.loss_log)


def plot_losses(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Loss curves (one panel per logged quantity) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in (history[0] if history else {}) if k not in ("step", "lr_factor")]
    columns = max(1, min(3, len(keys)))
    rows = max(1, math.ceil(len(keys) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    steps = [h["step"] for h in history]
    for axis, key in zip(axes.flat, keys):
        axis.plot(steps, [h.get(key, float("nan")) for h in history])
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(keys):]:
        axis.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(path)
