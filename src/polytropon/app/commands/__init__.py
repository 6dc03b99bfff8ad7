"""One module per verb of the ``polytropon`` command line.

Each module has ``VERB`` (the word typed on the command line), ``HELP`` and ``DESCRIPTION`` (its
lines in ``--help``), ``add_arguments(parser)`` and ``run(args) -> int`` (the exit code). :mod:`polytropon.app.cli`
lists the modules in :data:`~polytropon.app.cli.COMMANDS`; a new verb is a new module here plus its
line there. A verb imports the data, training and plotting modules inside ``run``, when it runs.
"""
