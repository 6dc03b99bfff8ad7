"""The application: the ``polytropon`` command line and what it runs.

* :mod:`.cli` -- the parser and ``main``; one function per verb;
* :mod:`.training` -- loading base models, the Trainer with a router learning rate, per-task evaluation;
* :mod:`.data` -- rows of ``(task, input, target)``, encoding and collation;
* :mod:`.suite` -- the built-in multi-task suite with a known task x skill structure;
* :mod:`.plots` -- the routing figure of a run.

The application uses the tuner and the toolkit; neither of them imports it.
"""
