"""The research toolkit: what the Poly and MHR papers do with a trained :class:`~polytropon.model.PolyModel`.

* :mod:`.tasks` -- name an adapter's tasks, add tasks after training;
* :mod:`.few_shot` -- MHR-z (train only the routing) and MHR-mu (average the skills into one LoRA);
* :mod:`.optim` -- parameter groups with their own router learning rate;
* :mod:`.priors` -- the Indian Buffet Process prior on learned allocations;
* :mod:`.analysis` -- read-outs of the learned routing (allocation matrices, task similarity);
* :mod:`.recovery` -- how well a learned allocation matches a known task x skill structure;
* :mod:`.diagnostics` -- the tasks a trained model answers the same way for every example (collapse);
* :mod:`.plots` -- figures of them (needs matplotlib and scipy, imported on demand).

The toolkit builds on the tuner's public surface only; the tuner never imports it.
"""
