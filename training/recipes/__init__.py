"""Training recipes. Each module defines a :class:`~mixsup.training.recipes.base.Recipe` subclass and exposes
an instance as ``RECIPE``; :func:`get_recipe` looks one up by its command-line name."""
from __future__ import annotations

from importlib import import_module

from mixsup.errors import InputError

RECIPES = ("unet", "teacher-student", "msdn", "lazy", "asdnet")


def get_recipe(name: str):
    if name not in RECIPES:
        raise InputError(f"unknown recipe {name!r}; available: {', '.join(RECIPES)}")
    return import_module(f"mixsup.training.recipes.{name.replace('-', '_')}").RECIPE
