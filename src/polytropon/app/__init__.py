"""The application: the ``polytropon`` command line and what it runs.

* :mod:`.cli` -- ``main``, the parser, the exit codes and the one-line error handling;
* :mod:`.commands` -- one module per verb (``train``, ``eval``, ``inspect``, ``export-lora``, ``merge``,
  ``suite``), each a ``run(args)`` that reads as named steps, and its ``add_parser``;
* :mod:`.runs` -- the files of a run directory (``run.json``, ``metrics.json``) and strict JSON writing;
* :mod:`.adapters` -- a saved adapter directory: find it, read its files, load it onto its base model;
* :mod:`.report` -- per-task tables and the summary a run prints;
* :mod:`.console`, :mod:`.arguments`, :mod:`.defaults` -- messages and errors, shared argument types,
  the demo's and a user's run's default settings;
* :mod:`.training` -- loading base models, the Trainer with a router learning rate, per-task evaluation;
* :mod:`.data` -- rows of ``(task, input, target)``, encoding and collation;
* :mod:`.suite` -- the built-in multi-task suite with a known task x skill structure;
* :mod:`.plots` -- the routing figure of a run.

The application uses the tuner and the toolkit; neither of them imports it. Within it, :mod:`.cli`
imports the commands, and the commands import the shared modules, never each other.
"""
