"""Data: the class-incremental streams a suite trains on. ``registry`` holds one spec per stream (name, class count,
builder, preflight check, default augmentation), registered by the stream's own module in ``sources`` (one file per
stream); ``streams`` builds a stream through it (tasks of uint8 images and stream-wide labels, a class order from the
seed) from the datasets' own files (``datasets``: CIFAR-100, ImageNet-R, DomainNet; pinned splits in
``clbench/splits``), ``imagecache`` decodes real images once into a memmap, ``augment`` holds the training
augmentations and test transforms, ``validation`` holds out part of the training set for a sweep, and ``batching``
draws rows into device batches. The language-model track's streams are text: ``text`` holds their types
(``TextStream`` of ``TextTask`` of ``TextExample``) and ``text_olora`` reads O-LoRA's benchmarks from its
``CL_Benchmark`` folder (pinned task lists in ``clbench/splits``); ``lm_synthetic`` holds the offline synthetic
text tasks of the language quickstart. A language model tokenizes text streams into the loop's tensors
(``clbench.model.lm``). Nothing here knows methods, models or MLflow.
"""
