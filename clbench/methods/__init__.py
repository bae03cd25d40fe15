"""Methods: how a continual-learning method is written, found and called. ``method`` is the base class a plugin
subclasses, ``hookspecs`` the hook contract, ``context`` the per-task facts a hook sees, ``rehearsal`` the samples a
rehearsal method adds, ``prompts`` the shared prompt-method machinery, ``registry`` discovery (entry points and
plugin folders) and the per-run pluggy manager that knows its method, ``hookcheck`` the checked hook caller the loop
uses, and ``probes`` the harness's read-only hooks. A plugin imports only the public names of ``clbench``.
"""
