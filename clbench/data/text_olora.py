"""O-LoRA's continual benchmarks for language models, read from the ``CL_Benchmark`` folder of its official repository.

Wang et al., "Orthogonal Subspace Learning for Language Model Continual Learning", EMNLP 2023 Findings
(arXiv 2310.14152); official code and data: github.com/cmnfriend/O-LoRA. Two benchmarks:

* the standard CL benchmark: dbpedia, amazon, yahoo, agnews in the three orders of ``scripts/order_{1,2,3}.sh``
  (streams ``olora_order1`` .. ``olora_order3``);
* the long-sequence benchmark: 15 tasks in the one order the repository scripts, ``scripts/long.sh``
  (stream ``olora_long``; the repository has no script for the paper's other long orders).

What is pinned. ``clbench/splits/olora_cl_benchmark.json`` (its sha256 in ``clbench/splits/SHA256SUMS``, checked
before every use) holds the task orders, every dataset's folder, label words, train and test row counts,
the instructions (``configs/instruction_config.json``), the input format settings of the scripts and the git blob
id of each data file in the official tree at the pinned commit. The datasets are not shipped: the reader takes
them from ``<root>/CL_Benchmark/`` (or ``<root>`` itself when it holds the category folders), where ``root`` is
``stream.root``, else ``$CLBENCH_DATA``, else the cache's data folder, and refuses any file whose bytes are not
the official file's (git blob id) or whose row count differs from the pinned one.

What a task is, as the official code builds it (``src/uie_dataset_lora.py``, ``src/uie_collator.py`` with
``--add_task_name True --add_dataset_name True``): every row of the task's ``train.json`` (the configs' sampling
strategy is ``full``: no subsampling, no oversampling), in file order, and every row of its ``test.json``; the
model input is ``"Task:<category>\\nDataset:<dataset>\\n<instruction>Option: <label words, ', '-joined> \\n
<sentence>\\nAnswer:"`` (COPA: no instruction and no options: ``"Task:COPA\\nDataset:COPA\\n<sentence>\\nAnswer:"``);
the target is the row's label word. The truncation of long inputs to 512 tokens (``max_source_length``) and of
targets to 50 is the tokenizer's, so it belongs to the model side: the stream carries the numbers in ``meta``.

One difference from the official evaluation: a test row whose label is none of the task's label words (MNLI's
``test.json`` holds 131 rows labelled ``-``, the GLUE rows without a gold label) cannot be an example here
(``TextExample.label`` indexes the label words); such rows are left out and counted in
``meta["unscorable_test_rows"]``. The official exact match counts them as wrong (the model never generates ``-``
after training on the label words), so an official MNLI accuracy is ours times (7600 - 131) / 7600.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from clbench.data.text import TextExample, TextStream, TextTask
from clbench.errors import ClbenchError

PINNED = "olora_cl_benchmark.json"
REPOSITORY = "https://github.com/cmnfriend/O-LoRA"
FOLDER = "CL_Benchmark"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Dataset:
    name: str
    category: str  # the official task type: SC, TC, NLI, QQP, BoolQA, COPA, MultiRC, WiC
    folder: str  # relative to CL_Benchmark/
    labels: list[str]
    counts: dict[str, int]  # split -> rows
    git_blob: dict[str, str]  # file name -> git blob id in the official tree


@dataclass(frozen=True)
class Benchmark:
    source: str
    format: dict
    instructions: dict[str, str]
    no_instruction: list[str]
    datasets: dict[str, Dataset]
    streams: dict[str, list[str]]  # stream name -> task order
    scripts: dict[str, str]  # stream name -> the official script it follows
    sha256: str  # of the pinned file


def benchmark(folder: Path | None = None) -> Benchmark:
    """The pinned task lists, checked against ``SHA256SUMS`` (``folder``: a splits folder other than the shipped
    one, for tests)."""
    from clbench.data.datasets.splitfiles import read_pinned, splits_dir

    blob = read_pinned(PINNED, folder)
    where = (folder or splits_dir()) / PINNED
    if blob is None:
        raise ClbenchError(f"{where} is missing from the installation; reinstall clbench")
    try:
        raw = json.loads(blob)
        datasets = {name: Dataset(name, d["category"], d["folder"], list(d["labels"]),
                                  {s: int(d[s]) for s in SPLITS}, dict(d["git_blob"]))
                    for name, d in raw["datasets"].items()}
        streams = {name: list(s["tasks"]) for name, s in raw["streams"].items()}
        scripts = {name: str(s["script"]) for name, s in raw["streams"].items()}
        bench = Benchmark(raw["source"], dict(raw["format"]), dict(raw["instructions"]),
                          list(raw["no_instruction"]), datasets, streams, scripts, hashlib.sha256(blob).hexdigest())
    except (ValueError, KeyError, TypeError) as exc:
        raise ClbenchError(f"{where}: not the task-list format ({type(exc).__name__}: {exc}); restore it from "
                           "the repository") from None
    for name, tasks in streams.items():
        unknown = [t for t in tasks if t not in datasets]
        if unknown:
            raise ClbenchError(f"{where}: stream {name} names unknown datasets {unknown}; restore it from the "
                               "repository")
    return bench


def stream_names(folder: Path | None = None) -> list[str]:
    return list(benchmark(folder).streams)


def model_input(bench: Benchmark, dataset: Dataset, sentence: str) -> str:
    """The model's input for one row, byte for byte as the official collator builds it."""
    text = ""
    if bench.format.get("add_task_name", True):
        text += f"Task:{dataset.category}\n"
    if bench.format.get("add_dataset_name", True):
        text += f"Dataset:{dataset.name}\n"
    if dataset.category not in bench.no_instruction:
        text += bench.instructions[dataset.category] + "Option: " + ", ".join(dataset.labels) + " \n"
    return text + sentence + "\nAnswer:"


def locate(root: Path) -> Path:
    """The folder holding the category folders (TC/, SC/, ...): ``root/CL_Benchmark`` or ``root`` itself."""
    nested = root / FOLDER
    if nested.is_dir() or not any((root / category).is_dir() for category in ("TC", "SC", "NLI")):
        return nested  # (when neither holds the data: the place a missing file is reported at)
    return root


def how_to(root: Path) -> str:
    return (f"get the {FOLDER}/ folder of the official O-LoRA repository ({REPOSITORY}: git clone it, or download "
            f"its zip, and copy {FOLDER}/ into {root}), or set stream.root / CLBENCH_DATA to a folder that holds "
            f"{FOLDER}/")


def _files(bench: Benchmark, stream: str) -> list[tuple[Dataset, str]]:
    if stream not in bench.streams:
        raise ClbenchError(f"stream.name: unknown O-LoRA stream '{stream}'; choose from {list(bench.streams)}")
    return [(bench.datasets[t], f) for t in bench.streams[stream] for f in ("labels.json", "train.json", "test.json")]


def check(root: Path, stream: str, folder: Path | None = None) -> str | None:
    """The preflight: None when every file the stream reads is there, else one line naming the first missing file
    and where to get the data. Reads no data."""
    bench = benchmark(folder)
    base = locate(root)
    for dataset, name in _files(bench, stream):
        path = base / dataset.folder / name
        if not path.is_file():
            return (f"stream.root: O-LoRA's {FOLDER} is not under {root} ({path} is missing; stream {stream} reads "
                    f"{len(bench.streams[stream])} tasks); " + how_to(root))
    return None


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's content: sha1 of ``b"blob <size>\\0"`` + the bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _read(path: Path, expected_blob: str, source: str) -> bytes:
    data = path.read_bytes()
    found = git_blob_id(data)
    if found != expected_blob:
        raise ClbenchError(f"{path}: not the official file (git blob {found[:12]}, {source} has "
                           f"{expected_blob[:12]}); copy {FOLDER}/ again from {REPOSITORY} (as checked out by git, "
                           "without line-ending conversion)")
    return data


def _rows(path: Path, data: bytes) -> list[dict]:
    try:
        rows = json.loads(data)
    except ValueError as exc:
        raise ClbenchError(f"{path}: not valid JSON ({exc}); copy it again from {REPOSITORY}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("sentence"), str)
                                             and isinstance(r.get("label"), str) for r in rows):
        raise ClbenchError(f"{path}: expected a JSON list of {{\"sentence\": ..., \"label\": ...}} rows; copy it "
                           f"again from {REPOSITORY}")
    return rows


def build_text_stream(stream: str, root: Path, folder: Path | None = None) -> TextStream:
    """Stream ``stream`` (``olora_order1`` .. ``olora_order3``, ``olora_long``) from the data under ``root``.

    Every file is checked against its pinned git blob id and row count before use; one line on any mismatch."""
    bench = benchmark(folder)
    problem = check(root, stream, folder)
    if problem:
        raise ClbenchError(problem)
    base = locate(root)
    digest = hashlib.sha256()
    tasks, unscorable = [], []
    for name in bench.streams[stream]:
        dataset = bench.datasets[name]
        where = base / dataset.folder
        labels_path = where / "labels.json"
        labels = json.loads(_read(labels_path, dataset.git_blob["labels.json"], bench.source))
        if labels != dataset.labels:
            raise ClbenchError(f"{labels_path}: label words {labels} are not the pinned {dataset.labels}")
        split_examples = {}
        for split in SPLITS:
            path = where / f"{split}.json"
            data = _read(path, dataset.git_blob[path.name], bench.source)
            digest.update(f"{dataset.folder}/{path.name}\0".encode() + data)
            rows = _rows(path, data)
            if len(rows) != dataset.counts[split]:
                raise ClbenchError(f"{path}: {len(rows)} rows, the official file has {dataset.counts[split]}; "
                                   f"copy it again from {REPOSITORY}")
            index = {word: i for i, word in enumerate(dataset.labels)}
            examples = [TextExample(model_input(bench, dataset, r["sentence"]), index[r["label"]])
                        for r in rows if r["label"] in index]
            dropped = len(rows) - len(examples)
            if dropped and split == "train":
                raise ClbenchError(f"{path}: {dropped} rows have a label that is not a label word of "
                                   f"{labels_path}; copy the folder again from {REPOSITORY}")
            if dropped:
                unscorable.append(f"{name}:{dropped}")
            split_examples[split] = examples
        tasks.append(TextTask(name, list(dataset.labels), split_examples["train"], split_examples["test"]))
    fmt = bench.format
    meta = {"source": bench.source, "order": ",".join(bench.streams[stream]), "script": bench.scripts[stream],
            "task_list_sha256": bench.sha256, "data_sha256": digest.hexdigest(),
            "max_source_length": str(fmt.get("max_source_length", "")),
            "max_target_length": str(fmt.get("max_target_length", "")),
            "generation_max_length": str(fmt.get("generation_max_length", ""))}
    if unscorable:
        meta["unscorable_test_rows"] = ",".join(unscorable)
    return TextStream(stream, tasks, meta)
