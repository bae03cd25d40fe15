"""Run: executing a suite. ``runner`` plans the (method, seed) runs and takes each from open to close (a ``Run``,
one MLflow run's life in ``mlflow_run``), ``executors`` run them here or on Ray, ``loop`` is the training loop of one
run (every hook call visible), ``recorder`` records one run (metrics, checkpoints, artifacts), ``summary`` the
suite's figures on the parent run, ``checkpoint`` the run's checkpoint store, ``plan`` what runs and how runs are
keyed, ``preflight`` what is refused before any run exists, ``sweep`` the validation-split search, ``protocol`` the
effective protocol a suite trains with, ``distributed`` torchrun, and ``progress`` the typed events the CLI renders.
"""
