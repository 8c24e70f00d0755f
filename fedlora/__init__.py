"""fedlora: federated LoRA fine-tuning on Flower.

The public API (what the docs tell users to import; everything else may move between releases)::

    from fedlora import simulate, load_exported
    folder = simulate(["model=tiny", "rounds=2"])        # fedlora simulate, from Python: the run's folder
    model = load_exported(folder / "adapter")            # the exported adapter on its rebuilt base model

``compose(overrides)`` gives the validated :class:`RunConfig` the CLI would run (and Hydra's form),
``model_folder(ModelConfig(...))`` a model preset's local folder; bad input raises :class:`ConfigError`.
The names load on first use, so ``import fedlora`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ModelConfig",
    "RunConfig",
    "RunFailed",
    "__version__",
    "compose",
    "load_exported",
    "model_folder",
    "simulate",
]


def __getattr__(name: str) -> Any:
    if name in ("ConfigError", "RunFailed", "RunConfig"):
        from fedlora.config import run

        return getattr(run, name)
    if name == "ModelConfig":
        from fedlora.config.groups import ModelConfig

        return ModelConfig
    if name == "compose":
        from fedlora.config.compose import compose

        return compose
    if name == "simulate":
        from fedlora.commands.simulate import run as simulate

        return simulate
    if name == "load_exported":
        from fedlora.outputs.export import load_exported

        return load_exported
    if name == "model_folder":
        from fedlora.learning.model import model_folder

        return model_folder
    raise AttributeError(f"module 'fedlora' has no attribute {name!r}")
