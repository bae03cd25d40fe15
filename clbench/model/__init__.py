"""Model: the backbone and the low-rank updates on it. ``backbones`` builds a timm ViT wrapped in ``CLModel``
(per-task heads, preprocessing), ``pretrain`` is the recipe of the shipped tiny backbone's weights, ``lora`` the
adapter sites and branches every LoRA method injects, ``dense`` a dense weight change as factors, ``spectra``
the singular-value statistics of each task's update, ``fit`` the backbone's shape that method params check
themselves against (``BackboneFacts``), and ``lm`` the language backbones (T5 and causal LMs through
transformers, their tokenizers, the text rows and label-word heads the loop trains and evaluates). Below the
methods; uses only the data layer (pretraining).
"""
