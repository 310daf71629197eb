"""One module per method. `get(name)` returns the method's class."""

from __future__ import annotations

import importlib

from tokenprune.errors import UserError
from tokenprune.methods.base import Job, Method

# method name (conf/method/<name>.yaml) -> "module:Class"
REGISTRY = {
    "bert": "tokenprune.methods.base:Method",
    "topk": "tokenprune.methods.topk:TopK",
    "powerbert": "tokenprune.methods.powerbert:PowerBert",
    "random": "tokenprune.methods.random_drop:RandomDrop",
    "distilbert": "tokenprune.methods.distilbert:DistilBert",
    "truncate": "tokenprune.methods.truncate:Truncate",
    "trbert": "tokenprune.methods.trbert:TrBert",
    "adapler": "tokenprune.methods.adapler:AdapLeR",
    "tome": "tokenprune.methods.tome:ToMe",
    "pitome": "tokenprune.methods.pitome:PiToMe",
    "ltp": "tokenprune.methods.ltp:LTP",
    "gate": "tokenprune.methods.gate:Gate",
}


def get(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise UserError(f"method={name} has no implementation; choose one of {', '.join(sorted(REGISTRY))}.")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["Job", "Method", "get", "REGISTRY"]
