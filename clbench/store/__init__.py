"""Store: MLflow, and nothing else imports it (an import contract holds it). ``tracking`` writes and reads runs (the
``Tracker`` protocol, the MLflow tracker, a null tracker, the leaderboard's read path), ``storecheck`` checks a local
store before MLflow touches it, ``uiview`` the experiment's MLflow UI settings, ``uiserver`` MLflow's own UI server
with clbench's one hook (``clbench ui``), and ``diskfull`` turns a full disk while writing any store into one line
naming it.
"""
