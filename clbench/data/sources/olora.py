"""``olora_order1`` .. ``olora_order3`` and ``olora_long``: O-LoRA's continual benchmarks for language models, read
from the official ``CL_Benchmark`` folder under the data root (``clbench.data.text_olora``; not shipped, not
downloaded). They build a ``clbench.data.text.TextStream``, which a language backbone tokenizes; the task order
and count are the official ones, so ``stream.num_tasks`` must equal the order's length."""

from __future__ import annotations

from clbench.data.registry import StreamSpec, register_stream

# stream -> (number of tasks, what it is); the orders themselves are in clbench/splits/olora_cl_benchmark.json
STREAMS = {
    "olora_order1": (4, "O-LoRA standard CL benchmark, order 1 (dbpedia, amazon, yahoo, agnews), text"),
    "olora_order2": (4, "O-LoRA standard CL benchmark, order 2 (dbpedia, amazon, agnews, yahoo), text"),
    "olora_order3": (4, "O-LoRA standard CL benchmark, order 3 (yahoo, amazon, agnews, dbpedia), text"),
    "olora_long": (15, "O-LoRA long-sequence benchmark, 15 tasks in the order of its scripts/long.sh, text"),
}


def _tasks_problem(cfg) -> str | None:
    tasks = STREAMS[cfg.name][0]
    if cfg.num_tasks != tasks:
        return (f"stream.num_tasks: {cfg.name} is O-LoRA's fixed order of {tasks} tasks; set num_tasks: {tasks}")
    return None


def build(cfg, seed: int, with_test: bool):
    """The stream in its official order (the seed does not reorder it: O-LoRA's orders are fixed; the loop's
    batch order follows the seed). ``with_test`` is ignored: the text is small and a language model's held-out
    evaluation is the model side's."""
    from clbench.data.streams import data_root
    from clbench.data.text_olora import build_text_stream
    from clbench.errors import ClbenchError

    problem = _tasks_problem(cfg)
    if problem:
        raise ClbenchError(problem)
    return build_text_stream(cfg.name, data_root(cfg))


def check(cfg) -> str | None:
    from clbench.data.streams import data_root
    from clbench.data.text_olora import check as data_check

    return _tasks_problem(cfg) or data_check(data_root(cfg), cfg.name)


for _name, (_tasks, _about) in STREAMS.items():
    register_stream(StreamSpec(_name, build, num_classes=None, check=check, about=_about))
