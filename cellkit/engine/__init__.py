"""Training: the loop and its Hook base (:mod:`~cellkit.engine.train_loop`), the concrete hooks, and
the assembly of a plain run (:mod:`~cellkit.engine.defaults`: ``DefaultTrainer``, ``train``)."""
