"""method=distilbert: a static baseline. A shallower student of the same width, distilled from the
fine-tuned backbone on the task (Sanh et al., 2019, used task-specifically). No token is ever dropped: the whole
speedup comes from the layer count, so the FLOPs speedup is L/k at every length (the runner counts
the student's FLOPs with its own config and the baseline with the backbone's).

Depth. The target picks the student's depth: k = round(L / speedup) (half up), at least 1. Depths
come in a grid, speedups L/k (for 6 layers: 6, 3, 2, 1.5, 1.2, 1); a target that is not within
`method.tolerance` (10%) of the speedup its k gives, or that needs fewer than one layer, stops the job
with one sentence listing the reachable targets. The record reports the speedup really achieved.

Initialisation (`method.init=teacher`, the default). The student is the backbone's own class built
from its config with `num_hidden_layers=k`; embeddings, pooler and classifier are copied, and each
student layer copies one teacher layer. The teacher's L layers are cut into k contiguous blocks as
equal as possible and student layer i copies the *last* layer of block i:

    teacher layer of student layer i = floor((i + 1)·L / k) − 1
    6→3: [1, 3, 5]   4→2: [1, 3]   4→3: [0, 1, 3]   12→6: [1, 3, 5, 7, 9, 11]   6→4: [0, 2, 3, 5]

Why the last of each block: student layer i stands in for block i, so its output should live where
the block's output lives, which is what the next block, and at the top the copied pooler and
classifier, were trained to read. The top teacher layer is therefore always kept, so the copied head
reads the representation it was fine-tuned on and the hidden-state cosine term starts small. (At half
depth this is "every other layer", [1, 3, 5]; DistilBERT's own 12→6 choice, [0, 2, 4, 7, 9, 11], keeps
both ends instead; give it, or any other list, as `method.layers`.)

`method.init=hub` is the paper's original point: load the pre-trained, pre-distilled
`distilbert-base-uncased` (6 layers, 768 wide: only a 12-layer BERT-base-sized teacher, model=bert_base,
has the width and vocabulary to match, at speedup 2) and fine-tune it with the same loss. Its weights
are converted into a 6-layer `BertForSequenceClassification` (q/k/v/out_lin → query/key/value/
attention.output.dense, sa_layer_norm → attention LayerNorm, ffn.lin1/lin2 → intermediate/output dense,
output_layer_norm → output LayerNorm; token-type embeddings zero, as DistilBERT has none; pooler and
classifier from the teacher), so that the suite's one encoder loop evaluates and times it like every
other model. It needs the HuggingFace hub (or a local copy in `method.hub_id`): offline, it stops with
one sentence. It cannot be tested offline here; the conversion itself is tested on a random DistilBERT.

Loss, per batch (weights in conf/method/distilbert.yaml):

    alpha_ce   · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))   (batch mean; regression: MSE(z_s, z_t), no T)
  + alpha_hard · CE(z_s, y)                                (regression: MSE(z_s, y))
  + alpha_cos  · mean over real tokens of (1 − cos(h_s, h_t))   (last hidden states)

Phases, each cached: the teacher's logits on train ("teacher-logits", keyed on the backbone: shared
by every depth and loss, and with TR-BERT), its last hidden states on train in float16 ("teacher-hidden"; only
when alpha_cos > 0 and `method.cache_hidden`, otherwise the teacher runs beside the student each step),
and the trained student ("distilbert", keyed on the backbone, k, the layer map, init and the loss).
Training uses the shared loop for `budget.epochs` epochs, best checkpoint by the task metric on calib.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from tokenprune import flops
from tokenprune.errors import UserError
from tokenprune.methods.base import Method
from tokenprune.methods.toolbox import calib_score, teacher_logits
from tokenprune.train import MODEL_INPUTS, fit, task_loss, to_device

# --- depth and layer map ---------------------------------------------------------------------------


def depth_for(layers: int, target: float, tolerance: float = 0.1) -> int:
    """k = round(L / target) (half up); UserError when k < 1 or L/k is not within `tolerance` of target."""
    k = int(np.floor(layers / target + 0.5))
    if k < 1 or abs(layers / k - target) > tolerance * target:
        grid = ", ".join(f"{layers / j:g}" for j in range(1, layers + 1))
        raise UserError(
            f"method=distilbert cannot reach speedup={target:g} with a student of this {layers}-layer backbone, "
            f"whose depths give only the speedups {grid} (L/k): choose a target within {tolerance:.0%} of one of them."
        )
    return k


def layer_map(layers: int, k: int) -> list[int]:
    """The teacher layer each of k student layers copies: the last layer of each of k equal blocks."""
    if not 1 <= k <= layers:
        raise ValueError(f"a student of {k} layers cannot be cut from {layers} teacher layers")
    return [(i + 1) * layers // k - 1 for i in range(k)]


_LAYER = re.compile(r"(\.layer\.)(\d+)\.")


def init_student(teacher: nn.Module, mapping: list[int]) -> nn.Module:
    """The teacher's class with len(mapping) layers; student layer i copies teacher layer mapping[i],
    everything else (embeddings, pooler, classifier) is copied as is."""
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(mapping)
    student = type(teacher)(config)
    source = teacher.state_dict()

    def teacher_key(key: str) -> str:
        return _LAYER.sub(lambda m: f"{m.group(1)}{mapping[int(m.group(2))]}.", key, count=1)

    state = {key: source[teacher_key(key)].clone() for key in student.state_dict()}
    student.load_state_dict(state)
    return student.to(next(teacher.parameters()).device)


# --- DistilBERT from the hub, as a BERT ------------------------------------------------------------

_DISTIL_LAYER = {
    "attention.q_lin": "attention.self.query",
    "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value",
    "attention.out_lin": "attention.output.dense",
    "sa_layer_norm": "attention.output.LayerNorm",
    "ffn.lin1": "intermediate.dense",
    "ffn.lin2": "output.dense",
    "output_layer_norm": "output.LayerNorm",
}


def bert_from_distilbert(distil: nn.Module, teacher: nn.Module) -> nn.Module:
    """A `BertForSequenceClassification` computing what the DistilBERT encoder `distil` (a
    DistilBertModel, or anything with `.distilbert`) computes, with the teacher's pooler and
    classifier. Token-type embeddings are zero (DistilBERT has none), so segments change nothing
    until fine-tuning learns them."""
    distil = getattr(distil, "distilbert", distil)
    dc, tc = distil.config, teacher.config
    mismatched = [f"{a}: {getattr(dc, b)} vs {getattr(tc, a)}" for a, b in
                  (("hidden_size", "dim"), ("num_attention_heads", "n_heads"), ("intermediate_size", "hidden_dim"),
                   ("vocab_size", "vocab_size")) if getattr(dc, b) != getattr(tc, a)]
    if mismatched or getattr(dc, "activation", "gelu") != getattr(tc, "hidden_act", "gelu"):
        raise UserError(
            f"method.init=hub needs a backbone of DistilBERT's shape and vocabulary ({', '.join(mismatched) or 'activation'} "
            f"differ): use model=bert_base, or method.init=teacher."
        )
    config = tc.__class__.from_dict(tc.to_dict())
    config.num_hidden_layers = dc.n_layers
    config.max_position_embeddings = dc.max_position_embeddings
    student = type(teacher)(config)
    src, tsrc = distil.state_dict(), teacher.state_dict()
    prefix = student.base_model_prefix
    state = {}
    for key, value in student.state_dict().items():
        local = key[len(prefix) + 1:] if key.startswith(prefix + ".") else None
        if local is None or local.startswith("pooler."):  # the head: the teacher's
            state[key] = tsrc[key].clone()
        elif local == "embeddings.token_type_embeddings.weight":
            state[key] = torch.zeros_like(value)
        elif local.startswith("embeddings."):
            state[key] = src[local].clone()
        else:
            m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", local)
            if m is None:
                raise KeyError(f"no DistilBERT weight for {key}")
            name = next(d for d, b in _DISTIL_LAYER.items() if b == m.group(2))
            state[key] = src[f"transformer.layer.{m.group(1)}.{name}.{m.group(3)}"].clone()
    student.load_state_dict(state)
    return student


def load_distilbert(hub_id: str) -> nn.Module:
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(hub_id)
    except OSError as e:
        raise UserError(
            f"method.init=hub loads '{hub_id}' from the HuggingFace hub, which is not reachable here "
            f"({e.__class__.__name__}): connect to the network, point method.hub_id at a local copy, or use method.init=teacher."
        ) from e


# --- the loss --------------------------------------------------------------------------------------


def soft_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                    reduction="batchmean") * t * t


def cosine_loss(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens (mask True) of 1 − cos(student, teacher): CosineEmbeddingLoss, target +1."""
    cos = F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    mask = mask.bool()
    return (1 - cos)[mask].mean()


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, temperature: float,
                      alpha_ce: float, alpha_hard: float, alpha_cos: float = 0.0,
                      student_hidden: Tensor | None = None, teacher_hidden: Tensor | None = None,
                      mask: Tensor | None = None) -> tuple[Tensor, dict]:
    """The weighted sum and its terms. Regression heads (one output) use MSE to the teacher's output
    instead of the tempered KL."""
    if student_logits.shape[-1] == 1:
        soft = F.mse_loss(student_logits.squeeze(-1), teacher_logits.squeeze(-1).to(student_logits.dtype))
    else:
        soft = soft_loss(student_logits, teacher_logits.to(student_logits.dtype), temperature)
    hard = task_loss(student_logits, labels)
    total = alpha_ce * soft + alpha_hard * hard
    terms = {"soft": soft.detach(), "hard": hard.detach()}
    if alpha_cos:
        cos = cosine_loss(student_hidden, teacher_hidden, mask)
        total = total + alpha_cos * cos
        terms["cos"] = cos.detach()
    return total, terms


# --- the teacher's targets on train, cached ----------------------------------------------------------


class TeacherTargets:
    """The teacher's logits (and optionally last hidden states) on the train split, looked up by `idx`."""

    def __init__(self, idx: np.ndarray, logits: Tensor, hidden: Tensor | None = None,
                 offsets: np.ndarray | None = None, lengths: np.ndarray | None = None):
        self.row = {int(i): r for r, i in enumerate(idx)}
        self.logits_table, self.hidden_flat, self.offsets, self.lengths = logits, hidden, offsets, lengths

    def rows(self, idx: Tensor) -> list[int]:
        return [self.row[int(i)] for i in idx]

    def logits(self, idx: Tensor) -> Tensor:
        return self.logits_table[self.rows(idx)]

    def hidden(self, idx: Tensor, width: int) -> Tensor:
        """B×width×d, each row's real tokens first, zeros after."""
        rows = self.rows(idx)
        out = torch.zeros(len(rows), width, self.hidden_flat.shape[-1], dtype=torch.float32)
        for b, r in enumerate(rows):
            n, o = int(self.lengths[r]), int(self.offsets[r])
            out[b, :n] = self.hidden_flat[o:o + n].float()
        return out


def teacher_hidden_states(teacher: nn.Module, loader, device: torch.device) -> tuple[np.ndarray, list[Tensor]]:
    """(idx, each example's last hidden states over its real tokens, float16) over a loader, the
    teacher in eval mode."""
    idx, hidden = [], []
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.inference_mode():
            for batch in loader:
                batch = to_device(batch, device)
                out = teacher(**{k: batch[k] for k in MODEL_INPUTS}, output_hidden_states=True)
                idx.append(batch["idx"].cpu())
                last, lengths = out.hidden_states[-1], batch["attention_mask"].sum(1)
                hidden.extend(last[b, :int(n)].to(torch.float16).cpu() for b, n in enumerate(lengths))
    finally:
        teacher.train(was_training)
    return torch.cat(idx).numpy(), hidden


# --- the method --------------------------------------------------------------------------------------


class DistilBert(Method):
    name = "distilbert"

    @property
    def mcfg(self) -> DictConfig:
        return self.cfg.method

    def plan_for(self, target: float) -> dict:
        """The student's depth and layer map for `target` (what the cache keys hold)."""
        L = flops.dims(self.job.backbone.config).layers
        tol = float(self.mcfg.tolerance)
        if self.mcfg.init == "hub":
            k = 6  # distilbert-base-uncased's depth
            if abs(L / k - target) > tol * target:
                raise UserError(
                    f"method.init=hub gives a {k}-layer student, a speedup of {L / k:g} on this {L}-layer backbone, "
                    f"not within {tol:.0%} of speedup={target:g}: use speedup={L / k:g}, or method.init=teacher."
                )
            mapping = None
        elif self.mcfg.init == "teacher":
            if self.mcfg.layers is not None:
                mapping = [int(i) for i in self.mcfg.layers]
                if not mapping or any(not 0 <= i < L for i in mapping):
                    raise UserError(f"method.layers={list(mapping)} must list teacher layers in 0..{L - 1}.")
                k = len(mapping)
                if abs(L / k - target) > tol * target:
                    raise UserError(
                        f"method.layers has {k} layers, a speedup of {L / k:g}, not within {tol:.0%} of speedup={target:g}: "
                        f"give {depth_for(L, target, tol)} layers, or set method.layers=null."
                    )
            else:
                k = depth_for(L, target, tol)
                mapping = layer_map(L, k)
        else:
            raise UserError(f"method.init={self.mcfg.init!r} is not valid: it must be teacher or hub.")
        return {"teacher_layers": L, "k": k, "layer_map": mapping, "init": self.mcfg.init}

    def loss_cfg(self) -> dict:
        return {k: float(self.mcfg[k]) for k in ("temperature", "alpha_ce", "alpha_hard", "alpha_cos")}

    def teacher_targets(self, need_hidden: bool) -> TeacherTargets:
        """The teacher's logits on train (the shared teacher-logits phase) and, when asked, its last
        hidden states (cached float16, keyed on the backbone: shared by every depth and loss)."""
        job = self.job
        logits = teacher_logits(job)
        targets = TeacherTargets(np.fromiter(logits, dtype=np.int64), torch.stack(list(logits.values())))
        if need_hidden:
            def make_hidden(tmp: Path) -> None:
                idx, hidden = teacher_hidden_states(job.backbone, job.loader("train"), job.device)
                lengths = torch.tensor([h.shape[0] for h in hidden])
                offsets = torch.cumsum(lengths, 0) - lengths
                torch.save({"idx": torch.as_tensor(idx), "lengths": lengths, "offsets": offsets,
                            "hidden": torch.cat(hidden)}, tmp / "hidden.pt")

            path = job.phases.get("teacher-hidden", {"backbone": job.backbone_key, "split": "train"}, make_hidden)
            h = torch.load(path / "hidden.pt", weights_only=True, mmap=True)
            hrow = {int(i): r for r, i in enumerate(h["idx"].tolist())}
            order = [hrow[int(i)] for i in logits]  # align with the logits' rows
            targets.hidden_flat = h["hidden"]
            targets.offsets, targets.lengths = h["offsets"].numpy()[order], h["lengths"].numpy()[order]
        return targets

    def train_phases(self, target: float) -> None:
        job, loss = self.job, self.loss_cfg()
        self.plan = plan = self.plan_for(target)
        cached_hidden = loss["alpha_cos"] > 0 and bool(self.mcfg.cache_hidden)
        lr = float(self.mcfg.lr) if self.mcfg.lr is not None else float(self.cfg.train.lr)
        key = {"backbone": job.backbone_key, **plan, "loss": loss, "lr": lr, "epochs": int(self.cfg.budget.epochs),
               "hub_id": self.mcfg.hub_id if plan["init"] == "hub" else None}

        def train(tmp: Path):
            targets = self.teacher_targets(need_hidden=cached_hidden)
            if plan["init"] == "hub":
                student = bert_from_distilbert(load_distilbert(self.mcfg.hub_id), job.backbone)
            else:
                student = init_student(job.backbone, plan["layer_map"])
            teacher = job.backbone
            torch.manual_seed(self.cfg.seed)

            def step(model: nn.Module, batch: dict) -> Tensor:
                inputs = {k: batch[k] for k in MODEL_INPUTS}
                out = model(**inputs, output_hidden_states=loss["alpha_cos"] > 0)
                t_logits = targets.logits(batch["idx"]).to(out.logits.device)
                s_hidden = t_hidden = None
                if loss["alpha_cos"] > 0:
                    s_hidden = out.hidden_states[-1]
                    if cached_hidden:
                        t_hidden = targets.hidden(batch["idx"], s_hidden.shape[1]).to(s_hidden.device)
                    else:
                        with torch.no_grad():
                            t_hidden = teacher(**inputs, output_hidden_states=True).hidden_states[-1]
                total, terms = distillation_loss(out.logits, t_logits, batch["labels"], **loss,
                                                 student_hidden=s_hidden, teacher_hidden=t_hidden,
                                                 mask=batch["attention_mask"])
                job.log({f"distil/{k}": v.item() for k, v in terms.items()})
                return total

            def evaluate(model: nn.Module) -> float:  # checkpoint choice on calib, never on dev
                return calib_score(job, model)

            info = fit(student, job.loader("train", train=True), train_cfg=OmegaConf.merge(self.cfg.train, {"lr": lr}),
                       epochs=int(self.cfg.budget.epochs), device=job.device, evaluate=evaluate, step_fn=step,
                       log_fn=job.log, desc="distil")
            return student, {**info, **plan}

        self.student, info, _ = job.phases.model("distilbert", key, train)
        self.retrained_steps = info["history"][-1]["steps"]  # the student's weights are the backbone's, trained on
        job.info["distilbert"] = {**plan, "loss": loss, "lr": lr, "best_calib_score": info.get("best_score"),
                                  "best_epoch": info.get("best_epoch"), "train_seconds": info.get("train_seconds")}

    def choose_knob(self, target: float) -> dict:
        """Nothing to tune: the depth is the knob. Reports the speedup it gives on calib's lengths."""
        plan = self.plan
        lengths = np.asarray(self.job.splits["calib"]["length"])
        config = self.job.backbone.config
        dm = flops.dims(config)
        student = flops.canonical_baseline(lengths, config) - (dm.layers - plan["k"]) * flops.layer_flops(
            lengths, lengths, dm.d, dm.d_ff)
        expected = flops.speedup(flops.canonical_baseline(lengths, config), student)
        return {"layers": plan["k"], "teacher_layers": plan["teacher_layers"], "layer_map": plan["layer_map"],
                "init": plan["init"], "expected_speedup": expected}

    def model(self) -> nn.Module:
        return self.student
