"""The built-in prompt methods (L2P, DualPrompt, CODA-Prompt): a frozen backbone steered by learned prompts chosen
per input, on clbench's shared prompt machinery (``clbench.PromptMethod``, ``clbench.PromptModel``). They have no
low-rank weight update (``low_rank_updates = False``). Each module registers through the ``clbench`` entry-point
group like the other built-ins.
"""
