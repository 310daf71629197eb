"""The one optimisation loop: AdamW, linear warmup and decay, grad-norm clipping, an evaluation
after every epoch, the best checkpoint kept. Fine-tuning uses it as is; methods pass their own loss
(`step_fn`) and parameter groups for their phases."""

from __future__ import annotations

import copy
import logging
import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from tokenprune.backbones import hf_inputs

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: training stops instead of going on with broken weights."""


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def task_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The task loss every phase uses, as the HF head computes it: cross-entropy, or MSE for a
    regression head (one logit). reduction="none": one loss per row (rewards, per-example weights)."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype), reduction=reduction)
    return F.cross_entropy(logits, labels, reduction=reduction)


def classification_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The task loss of a plain (unpruned) model on a batch."""
    return task_loss(model(**hf_inputs(model, batch, MODEL_INPUTS)).logits, batch["labels"])


def default_param_groups(model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # biases and LayerNorm weights
    return [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]


def fit(
    model: torch.nn.Module,
    train_loader: Iterable[dict],
    *,
    train_cfg: DictConfig,
    epochs: int,
    device: torch.device,
    evaluate: Callable[[torch.nn.Module], float] | None = None,
    step_fn: Callable[[torch.nn.Module, dict], torch.Tensor] = classification_loss,
    param_groups: list[dict] | None = None,
    after_step: Callable[[int], None] | None = None,
    log_fn: Callable[..., None] = lambda metrics, step=None: None,
    desc: str = "train",
    patience: int | None = None,
    max_steps: int | None = None,
) -> dict:
    """Train `model` in place; at the end it holds the best epoch's weights (by `evaluate`, higher is
    better; the last epoch's when there is no evaluation). Returns the per-epoch history. `log_fn` gets
    every step's metrics as `<desc>/<name>`, with the phase's own step as `<desc>/step`.

    patience: stop once this many epochs in a row did not beat the best score (early stopping; the
    schedule still decays over `epochs`). max_steps: stop after this many steps, the schedule
    decaying over them (an epoch cut short is evaluated like a whole one)."""
    model.to(device)
    groups = param_groups or default_param_groups(model, train_cfg.lr, train_cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=train_cfg.lr, eps=1e-8)
    total = max(1, epochs * len(train_loader))
    if max_steps is not None:
        total = max(1, min(total, int(max_steps)))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(train_cfg.warmup_ratio * total), total)

    best_score, best_state, best_epoch, history, step = -math.inf, None, -1, [], 0
    for epoch in range(epochs):
        model.train()
        # a bar on a terminal only (disable=None); off one, the log gets a line at each quarter of the epoch
        bar = tqdm(train_loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False, mininterval=2, disable=None)
        quarter = math.ceil(len(train_loader) / 4)
        for i, batch in enumerate(bar, start=1):
            if step >= total:
                break
            loss = step_fn(model, to_device(batch, device))
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"{desc}: the loss became {loss.item()} at step {step} (epoch {epoch + 1}); "
                    "lower the learning rate or check the data."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            if after_step is not None:
                after_step(step)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if bar.disable and i % quarter == 0 and i < len(train_loader):
                log.info(f"{desc} epoch {epoch + 1}/{epochs}: step {i}/{len(train_loader)}, loss {loss.item():.4f}")
            log_fn({f"{desc}/loss": loss.item(), f"{desc}/lr": scheduler.get_last_lr()[0], f"{desc}/step": step})
        model.eval()
        score = evaluate(model) if evaluate is not None else float(epoch)
        history.append({"epoch": epoch + 1, "score": score, "steps": step})
        if evaluate is not None:
            log_fn({f"{desc}/eval_score": score, f"{desc}/epoch": epoch + 1, f"{desc}/step": step})
            log.info(f"{desc} epoch {epoch + 1}/{epochs}: eval score {score:.2f}")
        else:
            log.info(f"{desc} epoch {epoch + 1}/{epochs} done (no evaluation: the last epoch is kept)")
        if score > best_score:
            best_score, best_epoch = score, epoch + 1
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        stalled = patience is not None and evaluate is not None and epoch + 1 - best_epoch >= patience
        if (step >= total or stalled) and epoch + 1 < epochs:
            why = "its step budget is spent" if step >= total else f"no better score for {patience} epochs"
            log.info(f"{desc}: stopped after epoch {epoch + 1} of {epochs}: {why}")
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"best_score": best_score, "best_epoch": best_epoch, "history": history, "steps": step}
