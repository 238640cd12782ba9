"""Sub-commands of the ``weakclip`` CLI, one module each.

Every module listed in ``COMMAND_MODULES`` defines ``register(subparsers)``, which adds its parser
and sets ``func`` to a function that imports the heavy parts (torch, models) only when it runs.
"""

COMMAND_MODULES: tuple[str, ...] = (
    "weakclip.commands.evaluate",
    "weakclip.commands.data",
    "weakclip.commands.weights",
    "weakclip.commands.seeds",
    "weakclip.commands.train",
    "weakclip.commands.retrain",
    "weakclip.commands.pseudo_masks",
    "weakclip.commands.predict",
    "weakclip.commands.run",
)
