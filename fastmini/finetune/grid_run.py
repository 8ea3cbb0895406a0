"""One run of a fine-tuning grid: train one (mode, learning rate, seed) setting, evaluate every epoch, keep the
best epoch, checkpoint, resume.

A run's directory (``runs/<mode>-lr<lr>-seed<seed>/``) holds result.json once it has finished, log.jsonl,
best/ (the best epoch's model) and, while it runs, checkpoints/step-N/ (model + trainer_state.pt)."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fastmini.data.masking import IGNORE_INDEX
from fastmini.files import write_json_atomically
from fastmini.finetune.models import load_task_model
from fastmini.finetune.selection import Setting, is_better
from fastmini.models.checkpoint import SAFETENSORS_NAME
from fastmini.training import checkpoints, distributed, faults, precision
from fastmini.training.batching import StepBatches, check_resumed_split, derived_seed
from fastmini.training.checkpoints import CHECKPOINTS_DIR, STATE_NAME
from fastmini.training.errors import UsageError
from fastmini.training.memory import enable_activation_checkpointing
from fastmini.training.normalization import backward_share, share_of_mean, step_totals
from fastmini.training.optimization import WarmupDecay, build_adamw, checked_step, warmup_steps_from_ratio
from fastmini.training.run_log import RunLog

if TYPE_CHECKING:
    from fastmini.finetune.trainer import FineTuning

log = logging.getLogger("fastmini.finetune")

RESULT_NAME = "result.json"
BEST_DIR = "best"


class GridRun:
    """One (mode, learning rate, seed) run: train, evaluate every epoch, keep the best epoch, checkpoint."""

    def __init__(self, job: FineTuning, setting: Setting):
        self.job, self.setting = job, setting
        self.config, self.context, self.device = job.config, job.context, job.device
        self.directory = job.runs_dir / setting.name
        self.checkpoint_root = self.directory / CHECKPOINTS_DIR
        self.last_checkpoint: Path | None = None

    def run(self) -> dict[str, Any]:
        result_path = self.directory / RESULT_NAME
        if self.config.resume and result_path.is_file():
            result = json.loads(result_path.read_text())
            log.info("run %s finished earlier (best epoch %s)", self.setting.name, result["best_epoch"])
            return result
        distributed.on_main(self.context, lambda: self.directory.mkdir(parents=True, exist_ok=True))
        result = self._train()

        def publish() -> None:
            write_json_atomically(result_path, result)
            shutil.rmtree(self.checkpoint_root, ignore_errors=True)  # the best epoch is kept in best/

        distributed.on_main(self.context, publish)
        return result

    # ------------------------------------------------------------------------- setup, resume
    def _train(self) -> dict[str, Any]:
        config, setting, job = self.config, self.setting, self.job
        model, fresh_head = load_task_model(
            job.source, job.spec, job.data.labels, setting.seed, setting.mode == "adapter"
        )
        self.model = model.to(self.device)
        if config.gradient_checkpointing:
            enable_activation_checkpointing(model)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.counts = (sum(p.numel() for p in self.trainable), sum(p.numel() for p in model.parameters()))
        self.optimizer = build_adamw(model, setting.lr, config.weight_decay)
        self.batches = StepBatches(
            job.train,
            config.batch_size,
            self.context.world_size,
            config.grad_accumulation,
            self.context.rank,
            setting.seed,
        )
        warmup = warmup_steps_from_ratio(config.warmup_ratio, job.total_steps)
        self.scheduler = WarmupDecay(self.optimizer, warmup, job.total_steps, config.schedule)
        self.trained = model
        if self.context.is_distributed:
            self.trained = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.state: dict[str, Any] = {
            "step": 0,
            "history": [],
            "best": None,
            "bad_evaluations": 0,
            "elapsed": 0.0,
            "loss_sum": 0.0,
            "loss_steps": 0,
        }
        rng = self._maybe_resume()
        run_log = RunLog(self.directory, self.context.is_main, self.state["step"] if rng is not None else None)
        if rng is not None:
            checkpoints.restore_rng_state(rng)
        else:
            torch.manual_seed(derived_seed(setting.seed, "dropout", self.context.rank))
        try:
            self._loop(run_log)
        finally:
            run_log.close()
        best = self.state["best"]
        return {
            "name": setting.name,
            "mode": setting.mode,
            "lr": setting.lr,
            "seed": setting.seed,
            "best_epoch": best["epoch"],
            "best_step": best["step"],
            "selection_value": best["value"],
            "validation": best["validation"],
            "history": self.state["history"],
            "steps": self.state["step"],
            "stopped_early": self.state["step"] < job.total_steps,
            "seconds": round(self.state["elapsed"], 2),
            "trainable_parameters": self.counts[0],
            "total_parameters": self.counts[1],
            "fresh_head": fresh_head,
        }

    def _maybe_resume(self) -> dict[str, Any] | None:
        """Load the latest checkpoint of this run when resuming; the RNG state to restore, or None."""
        if not self.config.resume:
            return None
        found = checkpoints.list_checkpoints(self.checkpoint_root)
        if not found:
            return None
        path = found[-1][1]
        try:
            state = checkpoints.load_state(path / STATE_NAME)
        except Exception as error:  # a truncated or foreign file
            raise UsageError(f"--resume {path}: {STATE_NAME} cannot be read ({error})") from error
        from safetensors.torch import load_file

        try:
            weights = load_file(str(path / SAFETENSORS_NAME), device=str(self.device))
        except Exception as error:  # safetensors raises several types for a damaged file
            raise UsageError(f"--resume {path}: model.safetensors cannot be read ({error})") from error
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise UsageError(
                f"--resume {path}: the checkpoint does not fit this run's model "
                f"(missing {missing[:4]}, unexpected {unexpected[:4]})"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.state = state["progress"]
        self.last_checkpoint = path
        check_resumed_split(
            (state["world_size"], state.get("grad_accumulation")),
            (self.context.world_size, self.config.grad_accumulation),
            self.config.batch_size,
            log,
        )
        precision.check_resumed_precision(state.get("precision"), self.job.autocast_dtype, self.config.precision, log)
        log.info(
            "run %s: resuming from %s (step %d of %d)",
            self.setting.name,
            path,
            self.state["step"],
            self.job.total_steps,
        )
        return checkpoints.rng_state_of_rank(state["rng"], self.context.rank)

    def _save_best(self) -> None:
        with checkpoints.atomic_directory(self.directory / BEST_DIR) as directory:
            self.model.save_pretrained(directory)

    def _save_checkpoint(self) -> None:
        step = self.state["step"]
        rng_states = [checkpoints.capture_rng_state()]
        if self.context.is_distributed:
            gathered: list[Any] = [None] * self.context.world_size
            torch.distributed.all_gather_object(gathered, rng_states[0])
            rng_states = gathered

        def publish() -> None:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_states,
                "progress": self.state,
                "world_size": self.context.world_size,
                "grad_accumulation": self.config.grad_accumulation,
                "precision": precision.precision_name(self.job.autocast_dtype),
            }
            final = self.checkpoint_root / checkpoints.checkpoint_name(step)
            checkpoints.remove_temporaries(self.checkpoint_root)
            with checkpoints.atomic_directory(final) as directory:
                self.model.save_pretrained(directory)
                checkpoints.save_state(directory / STATE_NAME, state)
                faults.kill_if_armed("kill-in-checkpoint", step)
                faults.fail_if_armed("fail-in-checkpoint", step)
            checkpoints.prune(self.checkpoint_root, 1)

        distributed.on_main(self.context, publish)
        # On every rank, once rank 0 has published it: each rank's messages after a stop name it.
        self.last_checkpoint = self.checkpoint_root / checkpoints.checkpoint_name(step)

    # ---------------------------------------------------------------------------------- loop
    def _loss_items(self, batch: dict[str, torch.Tensor]) -> int:
        """How many items the model's loss averages over: labelled real tokens (NER), else examples."""
        if self.job.spec.kind == "ner":
            return int(((batch["labels"] != IGNORE_INDEX) & batch["attention_mask"].bool()).sum())
        return int(batch["input_ids"].shape[0])

    def _train_step(self, step: int) -> dict[str, float]:
        micro_batches = self.batches.micro_batches(step)
        items = [self._loss_items(batch) for batch in micro_batches]
        total = step_totals({"items": sum(items)}, self.context)["items"]  # the global batch's, before any backward
        share_sum = None  # on the device: the host reads the step's loss once, after every micro-batch is queued
        for index, (batch, count) in enumerate(zip(micro_batches, items, strict=True)):
            batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
            last = index == len(micro_batches) - 1
            sync = self.trained.no_sync() if self.context.is_distributed and not last else contextlib.nullcontext()
            with sync:
                with precision.autocast(self.device, self.job.autocast_dtype):
                    output = self.trained(**batch)
                # The model's mean over this micro-batch's items, as its share of the global batch's mean.
                share = share_of_mean(output.loss, count, total)
                if share is None:  # no labelled token here: nothing to add, but DDP expects every gradient
                    share = output.logits.sum() * 0.0
                backward_share(share, self.context)
            share = share.detach().double().reshape(1)
            share_sum = share if share_sum is None else share_sum + share
        values = {"loss": float(distributed.sum_over_processes(share_sum, self.context)[0])}
        if faults.nan_if_armed(step + 1):
            values["loss"] = float("nan")
        values["grad_norm"], values["lr"] = checked_step(
            self.optimizer,
            self.scheduler,
            self.trainable,
            self.config.max_grad_norm,
            values,
            lambda problem, details: (
                f"run {self.setting.name}: {problem} at step {step + 1} ({details}); stopped without updating the "
                f"model; {self._last_good()}"
            ),
        )
        return values

    def _last_good(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint of this run was written yet"
        return f"the checkpoints written so far hold finite weights (the latest: {self.last_checkpoint})"

    def _end_of_epoch(self, run_log: RunLog) -> bool:
        """Evaluate, keep the best epoch, checkpoint; True when early stopping ends the run."""
        state, config, job = self.state, self.config, self.job
        step = state["step"]
        epoch = step // job.steps_per_epoch
        validation = job.evaluate(self.model)
        value = validation[next(iter(validation))][job.spec.main_metric]
        train_loss = state["loss_sum"] / max(1, state["loss_steps"])
        state["history"].append(
            {"epoch": epoch, "step": step, "train_loss": round(train_loss, 6), "validation": validation}
        )
        state["loss_sum"], state["loss_steps"] = 0.0, 0
        run_log.write("eval", step, {"epoch": epoch, "train_loss": train_loss, **_flat(validation)})
        best = state["best"]
        if is_better(value, None if best is None else best["value"], job.spec.main_metric):
            state["best"] = {"epoch": epoch, "step": step, "value": value, "validation": validation}
            state["bad_evaluations"] = 0
            distributed.on_main(self.context, self._save_best)
        else:
            state["bad_evaluations"] += 1
        stopping = bool(config.early_stopping) and state["bad_evaluations"] >= config.early_stopping
        if step < job.total_steps and not stopping:  # a run that ends here writes its result instead
            self._save_checkpoint()
        return stopping

    def _loop(self, run_log: RunLog) -> None:
        config, job, state = self.config, self.job, self.state
        from tqdm.auto import tqdm

        bar = tqdm(
            total=job.total_steps,
            initial=state["step"],
            desc=self.setting.name,
            unit="step",
            dynamic_ncols=True,
            leave=False,
            disable=not (self.context.is_main and config.progress),
        )
        started = time.perf_counter()
        elapsed_before = state["elapsed"]
        stopped = bool(config.early_stopping) and state["bad_evaluations"] >= config.early_stopping
        try:
            while state["step"] < job.total_steps and not stopped:
                values = self._train_step(state["step"])
                state["step"] += 1
                state["loss_sum"] += values["loss"]
                state["loss_steps"] += 1
                state["elapsed"] = elapsed_before + time.perf_counter() - started
                step = state["step"]
                faults.kill_if_armed("kill-after-step", step)
                bar.update(1)
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.1e}", refresh=False)
                if step % config.log_every == 0:
                    run_log.write("train", step, values)
                if step % job.steps_per_epoch == 0:
                    stopped = self._end_of_epoch(run_log)
                    if self.context.is_main and config.progress:
                        bar.write(self._epoch_line())
                elif config.save_every and step % config.save_every == 0:
                    self._save_checkpoint()
        finally:
            bar.close()

    def _epoch_line(self) -> str:
        metric, best, last = self.job.spec.main_metric, self.state["best"], self.state["history"][-1]
        value = next(iter(last["validation"].values()))[metric]
        return (
            f"{self.setting.name} epoch {last['epoch']}: train loss {last['train_loss']:.4f}, dev {metric} "
            f"{value:.4f} (best {best['value']:.4f} at epoch {best['epoch']})"
        )


def _flat(validation: dict[str, dict[str, float]]) -> dict[str, float]:
    if len(validation) == 1:
        return dict(next(iter(validation.values())))
    return {f"{split}/{name}": value for split, scores in validation.items() for name, value in scores.items()}
