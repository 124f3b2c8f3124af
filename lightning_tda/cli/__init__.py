"""The ``lightning-tda`` command: train with the callback, attribute, report and evaluate, all from one YAML config.

* :mod:`~lightning_tda.cli.options`: the config's sections beyond LightningCLI's, and each subcommand's parser;
* :mod:`~lightning_tda.cli.job`: the objects a config names, built once per run;
* :mod:`~lightning_tda.cli.steps`: ``fit``, ``attribute``, ``report`` (``run`` is all three);
* :mod:`~lightning_tda.cli.evaluate`: ``evaluate``, each method's LDS on the user's own config;
* :mod:`~lightning_tda.cli.main`: the entry point, ``inspect`` and ``clean``, and one-line errors.
"""

from lightning_tda.cli.main import main, run

__all__ = ["main", "run"]
