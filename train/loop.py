"""The one training loop: the LoRA trainer and every demo stage run through `train`.

A trainer describes its run as a Job, which holds only what differs between trainers:
    models   the modules the optimizer trains (the loop prepares them for accelerate),
    batches  start step -> the micro-batches from there on, a pure function of the step, so that a
             resumed run sees the data and noise a straight run would,
    loss     (models, batch, step) -> (loss, numbers to log),
    hooks    on_checkpoint (validation) and after_step (samples), run on the main process.
The loop does the rest, the same way for all of them: accelerate (one CPU process, a GPU with mixed
precision, several processes under `accelerate launch`), gradient accumulation and clipping, skipping a
step whose gradients are not finite (`max_bad_steps` in a row stop the run), an EMA of the weights where a
job keeps one, atomic checkpoints and an exact resume from them (weights, optimizer, LR schedule, RNG; the
data position follows from the step), Ctrl-C or SIGTERM held until the step is whole and then saved, a time
budget that stops the run at a checkpoint, a JSONL log with a loss-curve PNG beside it, accelerate's trackers
(TensorBoard when it is installed), and a progress bar on stderr (main process only).

    acc = accelerator(cfg.mixed_precision, folder)
    job = Job(name, models, optimizer, schedule, batches, loss, steps, checkpoints, every, folder / "log.jsonl")
    start = resume(acc, job, "latest")
    train(acc, job, start)

A fine-tuning of a t2i model (the LoRA and embedding trainers) starts from `fine_tune` (the checkpoint to
resume, the accelerator, the base model loaded and frozen, its noise schedule) and `start_step` (a resume
only with the settings the checkpoint was trained with).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from t2i.errors import StorageError, T2IError
from t2i.files import atomic_write
from t2i.train.checkpoint import Checkpoints, SavedState, read_training_state, save_training_state

log = logging.getLogger(__name__)


class TrainingError(T2IError):
    """The run cannot go on (e.g. too many non-finite steps in a row)."""


class OutOfTime(Exception):
    """The time budget ran out: the job stopped at the checkpoint of `step`."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@dataclass
class TimeBudget:
    """`minutes` for a whole run, all its stages (0: no limit); once spent, a job stops at its next checkpoint."""

    minutes: float
    start: float = field(default_factory=time.monotonic)

    def spent(self) -> bool:
        return self.minutes > 0 and time.monotonic() > self.start + 60 * self.minutes


class EMA:
    """An exponential moving average of a model's weights, kept in `shadow` (what the demo model exports). The
    decay warms up as (1 + n) / (10 + n) after n steps, capped at `decay`, as diffusers' EMAModel does."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.shadow = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        kept = list(self.shadow.parameters())
        torch._foreach_lerp_(kept, [p.detach().to(e.dtype) for e, p in zip(kept, model.parameters())], 1 - decay)


@dataclass
class Job:
    """One training run, as the loop sees it (see the module docstring)."""

    name: str  # the progress bar's, the notices' and the tracker run's
    models: dict[str, torch.nn.Module]  # what the optimizer trains, by checkpoint name
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler  # stepped once per step, a skipped one too
    batches: Callable[[int], Iterator[Any]]  # start step -> the micro-batches from there on
    loss: Callable[[dict[str, torch.nn.Module], Any, int], tuple[torch.Tensor, dict[str, float]]]
    steps: int  # the step the run ends at (a resumed run goes on to it)
    checkpoints: Checkpoints
    checkpoint_every: int
    log: Path  # JSONL: a record per step and per validation; the loss curve is drawn beside it
    ema: dict[str, EMA] = field(default_factory=dict)  # a model's name -> its average, saved as ema_<name>
    tensors: dict[str, torch.Tensor] | None = None  # if set, checkpoints hold only these (a LoRA's adapters)
    state: dict[str, Any] = field(default_factory=dict)  # more JSON for each checkpoint's state.json
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    max_bad_steps: int = 5
    budget: TimeBudget | None = None
    on_checkpoint: Callable[[int], dict[str, float] | None] | None = None  # validation; its numbers are logged
    after_step: Callable[[int], None] | None = None  # e.g. samples every N steps

    def params(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates: clipped together, and checked finite before a checkpoint."""
        return [p for m in self.models.values() for p in m.parameters() if p.requires_grad]

    def saved_modules(self) -> dict[str, torch.nn.Module]:
        """The modules a checkpoint holds, by file name (none when it holds `tensors`)."""
        if self.tensors is not None:
            return {}
        return {**self.models, **{f"ema_{name}": ema.shadow for name, ema in self.ema.items()}}


def accelerator(mixed_precision: str, folder: Path, cpu: bool = False):
    """The run's Accelerator: `mixed_precision` no, fp16 or bf16; the CPU if `cpu`; metrics also to TensorBoard
    under <folder>/tensorboard when the tensorboard package is installed.

    accelerate keeps one process-wide state: a second run in the same Python process (a notebook, the tests)
    with another precision needs it cleared; the process group itself is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state()
    project = ProjectConfiguration(project_dir=str(folder), logging_dir=str(Path(folder) / "tensorboard"))
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu, project_config=project,
                       log_with="tensorboard" if is_tensorboard_available() else None)


def resume(acc, job: Job, which: str | None) -> int:
    """Restore the checkpoint `which` names ("latest", a folder; None: none) into the job; its step, else 0."""
    path = job.checkpoints.resolve(which)
    if path is None:
        return 0
    return restore(acc, job, read_training_state(path, list(job.saved_modules())))


def restore(acc, job: Job, saved: SavedState) -> int:
    """Put a checkpoint (read and vetted by read_training_state) back into the job: weights, optimizer and LR
    schedule state, RNG. Returns its step; the data position follows from it."""
    saved.restore(job.saved_modules(), job.optimizer, job.schedule)
    if job.tensors is not None:
        if missing := sorted(set(job.tensors) - set(saved.tensors)):
            raise StorageError(f"checkpoint {saved.folder} lacks the weights {missing[0]}; resume from another "
                               "with --resume PATH")
        with torch.no_grad():
            for name, tensor in job.tensors.items():
                tensor.copy_(saved.tensors[name])
    step = saved.state["step"]
    if acc.is_main_process:
        log.info("%s: resumed from %s at step %d", job.name, saved.folder, step)
    return step


@dataclass
class FineTune:
    """What every fine-tuning of a t2i model starts from (see `fine_tune`)."""

    checkpoints: Checkpoints
    saved: SavedState | None  # the checkpoint to resume, read and vetted; None: a fresh start
    acc: Any  # accelerate's Accelerator
    pipe: Any  # t2i.pipelines.Text2Image: the base model, frozen, on acc.device
    noise_scheduler: Any  # diffusers' DDPMScheduler of the model: the noise the training adds
    prediction: str  # the UNet's prediction type (epsilon | v_prediction)


def fine_tune(what: str, cfg, out: Path, resume: str | None, report: str = "") -> FineTune:
    """Steps 1-2 of a LoRA or embedding run: read the checkpoint to resume (a damaged or hostile one is refused
    before a model loads), make the accelerator, load the base model through t2i (safe loading, its hash),
    refuse SDXL, freeze it on the accelerator's device, and take its training noise schedule.

    `cfg` has keep_checkpoints, mixed_precision, model ("" = the bundled one) and allow_pickle; `report` (the
    data's) is logged once the accelerator knows the main process."""
    from diffusers import DDPMScheduler

    from t2i.errors import UsageError
    from t2i.pipelines import Text2Image
    from t2i.train import losses

    checkpoints = Checkpoints(out / "checkpoints", keep=cfg.keep_checkpoints)
    path = checkpoints.resolve(resume)
    saved = read_training_state(path) if path is not None else None
    acc = accelerator(cfg.mixed_precision, out, cpu=not torch.cuda.is_available())
    if report and acc.is_main_process:
        log.info("data: %s", report)
    pipe = Text2Image.from_pretrained(cfg.model or None, device="cpu", dtype="fp32", allow_pickle=cfg.allow_pickle)
    if pipe.model.arch == "sdxl":
        raise UsageError(f"{what} training supports SD 1.x/2.x models so far, not SDXL")
    noise_scheduler = DDPMScheduler.from_config(pipe.pipe.scheduler.config)
    prediction = noise_scheduler.config.prediction_type
    losses.check_prediction_type(prediction)
    pipe.pipe.to(acc.device)
    for m in (pipe.pipe.unet, pipe.pipe.vae, pipe.pipe.text_encoder):
        m.requires_grad_(False).eval()  # the job's models go back to train() in the loop
    return FineTune(checkpoints, saved, acc, pipe, noise_scheduler, prediction)


def start_step(acc, job: Job, saved: SavedState | None, resume: str | None, identity: dict[str, Any],
               was: dict[str, Any] | None = None) -> int:
    """The step a run starts at: 0, or the checkpoint's once its identity (the settings a resume must keep:
    base model, rank, data size...) matches this run's. `was`: what a checkpoint from before a key existed had."""
    if saved is None:
        if resume == "latest" and acc.is_main_process:
            log.info("no checkpoint in %s yet: starting at step 0", job.checkpoints.root)
        return 0
    same_settings(saved, identity, was)
    return restore(acc, job, saved)


def same_settings(saved: SavedState | None, identity: dict[str, Any], was: dict[str, Any] | None = None) -> None:
    """Refuse, in one line naming the first, a checkpoint whose identity differs from `identity` in any key
    (a trainer may check some keys early, before costly work that depends on them)."""
    from t2i.errors import UsageError

    if saved is None:
        return
    before = {**(was or {}), **saved.state.get("identity", {})}
    differs = {k: (before.get(k), v) for k, v in identity.items() if before.get(k) != v}
    if differs:
        k, (then, now) = next(iter(differs.items()))
        raise UsageError(f"checkpoint {saved.folder} was trained with {k}={then}, this run has {k}={now}; "
                         f"use the same settings or a new --output")


def train(acc, job: Job, start: int) -> None:
    """Train `job` from step `start` to job.steps.

    Raises OutOfTime at a checkpoint once job.budget is spent; TrainingError after job.max_bad_steps
    non-finite steps in a row; StorageError when a write fails (the newest checkpoint is intact);
    KeyboardInterrupt on Ctrl-C or SIGTERM, once the step is whole and saved.
    """
    # 1. Prepare for accelerate: the models (DDP across processes), the optimizer, the EMA copies beside them
    *prepared, optimizer = acc.prepare(*job.models.values(), job.optimizer)
    models = dict(zip(job.models, prepared))
    _state_beside_weights(optimizer)
    for ema in job.ema.values():
        ema.shadow.to(acc.device)
    params = job.params()
    main = acc.is_main_process

    def save(step: int) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in params):
            if main:
                log.warning("%s: weights at step %d are not finite; checkpoint not written", job.name, step)
            return
        if main:
            modules = {name: acc.unwrap_model(models.get(name, m)) for name, m in job.saved_modules().items()}
            tensors = {k: t.detach().cpu().contiguous() for k, t in job.tensors.items()} if job.tensors else None
            job.checkpoints.save(step, lambda folder: {
                **save_training_state(folder, modules, optimizer, job.schedule, tensors), **job.state})

    # 2. Where it reports: the JSONL log, the trackers, the progress bar
    job.log.parent.mkdir(parents=True, exist_ok=True)
    if acc.log_with:
        acc.init_trackers(job.name)
    bar = tqdm(range(start, job.steps), initial=start, total=job.steps, desc=job.name, disable=not main)
    batches = job.batches(start)
    done, last_saved, bad = start, start, 0

    # 3. Train
    try:
        with _signals_held():
            for step in bar:
                # 3a. Forward and backward over the step's micro-batches; gradients sync across processes on the last
                for model in models.values():
                    model.train()
                losses, values = [], {}
                for micro in range(job.grad_accum):
                    batch = next(batches)
                    with _sync_unless(acc, models, micro < job.grad_accum - 1):
                        with acc.autocast():
                            loss, more = job.loss(models, batch, step)  # ()
                        acc.backward(loss / job.grad_accum)
                    losses.append(loss.detach())
                    for key, value in more.items():
                        values[key] = values.get(key, 0.0) + value / job.grad_accum
                loss_value = float(torch.stack(losses).mean())

                # 3b. The update, skipped if the gradients are not finite; it and the count that names it are one
                norm = acc.clip_grad_norm_(params, job.max_grad_norm)  # all-reduced: the same on every process
                with _whole_step():
                    finite = math.isfinite(float(norm))
                    if finite or acc.scaler is not None:
                        optimizer.step()  # fp16's grad scaler skips a non-finite step itself and lowers its scale
                    optimizer.zero_grad(set_to_none=True)
                    if finite:
                        bad = 0
                        for name, ema in job.ema.items():
                            ema.update(acc.unwrap_model(models[name]), step + 1)
                    else:
                        bad += 1
                        if main:
                            log.warning("%s: step %d: non-finite loss or gradients; step skipped (%d in a row)",
                                        job.name, step + 1, bad)
                        if bad >= job.max_bad_steps:
                            raise TrainingError(
                                f"{bad} non-finite steps in a row at step {step + 1}; stopped. The last checkpoint "
                                f"(step {last_saved}) is intact: lower the learning rate or turn mixed precision "
                                "off, then --resume latest")
                    job.schedule.step()
                    done = step + 1

                # 3c. Log, checkpoint, validate, and stop here if the time is up
                lr = job.schedule.get_last_lr()[0]
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                if main:
                    _record(acc, job.log, {"step": done, "loss": loss_value, **values, "lr": lr,
                                           "skipped": not finite, "t": time.time()})
                if done % job.checkpoint_every == 0 or done == job.steps:
                    save(done)
                    last_saved = done
                    if main and job.on_checkpoint and (checked := job.on_checkpoint(done)):
                        _record(acc, job.log, {"step": done, **checked})
                    if _out_of_time(acc, job.budget):
                        raise OutOfTime(f"{job.name}: max_minutes ({job.budget.minutes:g}) ran out at step {done}, "
                                        "its checkpoint written", done)
                if main and job.after_step:
                    job.after_step(done)
    except KeyboardInterrupt:
        if done > last_saved:
            save(done)
        if main:
            saved = job.checkpoints.latest()
            log.info("%s: interrupted at step %d: %s", job.name, done,
                     f"checkpoint saved in {job.checkpoints.root}; continue with --resume latest" if saved
                     else "no checkpoint yet")
        raise
    except OSError as e:  # the disk filled up (or went away) while writing the log or a validation image
        newest = job.checkpoints.latest()
        kept = (f"the newest checkpoint ({newest.name}) is intact; once that is fixed, --resume latest continues "
                "from it") if newest else "no checkpoint was written yet"
        raise StorageError(f"could not write {e.filename or job.log.parent}: {e.strerror or e}; {kept}") from None
    finally:
        bar.close()
        for tracker in acc.trackers:
            tracker.finish()
        if main:
            _draw_curve(job)


# --------------------------------------------------------------------------- the loop's parts


def _state_beside_weights(optimizer) -> None:
    """A resumed optimizer's moments go where accelerate put the weights: restored before `prepare`, they stayed
    on the CPU while the weights went to a GPU ("found at least two devices" at the first step)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for group in inner.param_groups:
        for p in group["params"]:
            for k, v in inner.state.get(p, {}).items():
                if torch.is_tensor(v) and k != "step" and v.device != p.device:
                    inner.state[p][k] = v.to(p.device)


def _sync_unless(acc, models: dict[str, torch.nn.Module], accumulating: bool):
    """While accumulating, gradients stay on each process (DDP's no_sync); the last micro-batch syncs them all."""
    stack = contextlib.ExitStack()
    if accumulating:
        for model in models.values():
            stack.enter_context(acc.no_sync(model))
    return stack


def _record(acc, path: Path, record: dict[str, Any]) -> None:
    """One line of the JSONL log, written whole (opened per record: a killed run loses at most its last line);
    its numbers also go to accelerate's trackers."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    numbers = {k: v for k, v in record.items() if k not in ("step", "t") and isinstance(v, (int, float))}
    if acc.trackers:
        acc.log(numbers, step=record["step"])


def _out_of_time(acc, budget: TimeBudget | None) -> bool:
    """Whether the budget is spent, as every process agrees (none waits for another that stopped)."""
    if budget is None or budget.minutes <= 0:
        return False
    late = torch.tensor(float(budget.spent()), device=acc.device)
    return float(acc.reduce(late, reduction="sum")) > 0


_held = {"on": False, "pending": False}  # see _whole_step


def _on_signal(signum, frame):
    if _held["on"]:
        _held["pending"] = True  # raised once the step is whole
    else:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_held():
    """While training, SIGINT (Ctrl-C) and SIGTERM (a cluster's preemption, `kill`) raise KeyboardInterrupt, held
    while a step is being made whole; the loop then saves a checkpoint. The handlers before are restored after.

    SIGINT is set explicitly: a process started in the background by a non-interactive shell inherits it as
    ignored, and `kill -INT` should still save and stop the run."""
    before = {}
    with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
        for sig in (signal.SIGINT, signal.SIGTERM):
            before[sig] = signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _whole_step():
    """An optimizer update and the step count that names it, as one: a signal between them is raised after.
    Raised between, an interrupt saved step N's name on step N+1's weights, and the resumed run differed."""
    _held["on"], _held["pending"] = True, False
    try:
        yield
    finally:
        _held["on"] = False
    if _held["pending"]:
        _held["pending"] = False
        raise KeyboardInterrupt


def _draw_curve(job: Job) -> None:
    """The loss curve beside the log, <name>_loss.png; a run is not failed for want of its picture."""
    png = job.log.with_name(job.log.stem.removesuffix("_log") + "_loss.png")
    try:
        loss_curve(job.log, png, job.name)
    except (OSError, T2IError, ValueError) as e:
        log.warning("%s: loss curve not drawn: %s", job.name, e)


# --------------------------------------------------------------------------- the loss curve


def loss_curve(log_file: Path, png: Path, title: str, size: tuple[int, int] = (800, 450)) -> Path | None:
    """Draw the `loss` of each step of a JSONL training log as a PNG: each step's loss, faint, and their moving
    average; a log scale when the losses span more than a factor of ten. A step logged twice (a run resumed
    from a checkpoint before it) counts as last logged. Returns the PNG, or None when the log has no loss."""
    points: dict[int, float] = {}
    if not Path(log_file).is_file():
        return None
    for line in Path(log_file).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        loss = record.get("loss") if isinstance(record, dict) else None
        if isinstance(loss, (int, float)) and math.isfinite(loss) and isinstance(record.get("step"), int):
            points[record["step"]] = float(loss)
    if not points:
        return None
    steps = sorted(points)
    losses = [points[s] for s in steps]
    log_scale = min(losses) > 0 and max(losses) > 10 * min(losses)
    ys = [math.log10(v) for v in losses] if log_scale else losses
    smooth, window = [], max(1, len(ys) // 40)
    for y in ys:  # an exponential moving average over about `window` steps
        smooth.append(y if not smooth else smooth[-1] + (y - smooth[-1]) / window)

    width, height = size
    left, right, top, bottom = 70, 20, 34, 40
    low, high = min(ys), max(ys)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    first, last = steps[0], max(steps[-1], steps[0] + 1)

    def at(step: float, y: float) -> tuple[float, float]:
        return (left + (step - first) / (last - first) * (width - left - right),
                top + (high - y) / (high - low) * (height - top - bottom))

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for i in range(5):  # grid lines with the loss at each, and the steps below
        y = low + (high - low) * i / 4
        draw.line([at(first, y), at(last, y)], fill=(228, 228, 228))
        draw.text((6, at(first, y)[1] - 6), f"{10 ** y:.3g}" if log_scale else f"{y:.3g}", fill=(80, 80, 80),
                  font=font)
        step = first + (last - first) * i / 4
        draw.text((at(step, low)[0] - 12, height - bottom + 6), f"{step:.0f}", fill=(80, 80, 80), font=font)
    draw.rectangle([left, top, width - right, height - bottom], outline=(140, 140, 140))
    if len(steps) > 1:
        draw.line([at(s, y) for s, y in zip(steps, ys)], fill=(175, 195, 230), width=1)
        draw.line([at(s, y) for s, y in zip(steps, smooth)], fill=(25, 70, 160), width=2)
    else:
        x, y = at(steps[0], ys[0])
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(25, 70, 160))
    scale = ", log scale" if log_scale else ""
    draw.text((left, 10), f"{title}: loss per step{scale} (steps {steps[0]}-{steps[-1]}, last {losses[-1]:.4g})",
              fill=(0, 0, 0), font=font)
    draw.text((width // 2 - 12, height - 18), "step", fill=(80, 80, 80), font=font)
    with atomic_write(png) as tmp:
        image.save(tmp, format="PNG")
    return png


# --------------------------------------------------------------------------- learning-rate schedules


def warmup(steps: int) -> Callable[[int], float]:
    """LambdaLR factor: a linear warm-up over `steps`, then the full rate."""
    return lambda step: min(1.0, (step + 1) / max(1, steps))


def warmup_cosine(warmup_steps: int, steps: int, floor: float = 0.05) -> Callable[[int], float]:
    """LambdaLR factor: a warm-up, then a cosine from the full rate down to `floor` of it at `steps`, so the last
    checkpoint settles instead of wandering with a constant rate."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return factor
