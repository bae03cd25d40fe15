"""Analysis: reading results. ``metrics`` defines accuracy, forgetting and their summaries from the accuracy
matrix, ``stats`` the statistics across seeds and methods, ``leaderboard`` aggregates runs read back from MLflow
into groups and rows, ``report`` renders the HTML leaderboard, ``claim`` a claim suite's paired effects and figures,
and ``plots`` every figure. It reads the store; it never trains.
"""
