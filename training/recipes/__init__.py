"""Training recipes. Each module names itself (``NAME``) and provides ``build_network(config)`` and
``loss(network, images, labels)``; :func:`get_recipe` looks one up by its command-line name."""
from __future__ import annotations

from types import ModuleType

from mixsup.errors import InputError

RECIPES = ("unet",)


def get_recipe(name: str) -> ModuleType:
    if name not in RECIPES:
        raise InputError(f"unknown recipe {name!r}; available: {', '.join(RECIPES)}")
    from importlib import import_module

    return import_module(f"mixsup.training.recipes.{name.replace('-', '_')}")
