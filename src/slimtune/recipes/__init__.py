"""Recipes: end-to-end jobs built from the library's parts. :func:`slimtune.recipes.train.train` runs every trainer method;
:mod:`slimtune.recipes.pema` is PEMA's two-party workflow."""
