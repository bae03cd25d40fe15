"""Produce (or check) the pinned O-LoRA task lists, ``olora_cl_benchmark.json``, from a checkout of the official
repository (github.com/cmnfriend/O-LoRA) with its ``CL_Benchmark/`` data.

    python -m clbench.splits.make_olora CHECKOUT --commit SHA           # compare with the shipped file
    python -m clbench.splits.make_olora CHECKOUT --commit SHA --write   # rewrite it and its SHA256SUMS line

What is read, and from where: the task orders from the ``--task_config_dir configs/<dir>/<dataset>`` lines of
``scripts/order_{1,2,3}.sh`` and ``scripts/long.sh``; each dataset's category (``SC``, ``TC``, ...) from its
``configs/*/<dataset>/train_tasks.json`` (whose sampling strategy must be ``full``: every row is read); the
instructions (the first zero-shot one per category) from ``configs/instruction_config.json``; the input settings
(``--add_task_name``, ``--add_dataset_name``, ``--max_source_length``, ``--max_target_length``,
``--generation_max_length``) from the first command of ``scripts/order_1.sh``; per dataset the label words
(``labels.json``), the row counts of ``train.json`` and ``test.json`` and every file's git blob id from
``CL_Benchmark/<category>/<dataset>/``. COPA's loader (``load_COPA_dataset`` in ``src/uie_dataset_lora.py``)
uses no instruction and no options: that is pinned as ``no_instruction``. clbench.data.text_olora reads the file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

from clbench.data.datasets.splitfiles import splits_dir
from clbench.data.text_olora import FOLDER, PINNED, git_blob_id
from clbench.errors import ClbenchError

SCRIPTS = {"olora_order1": "scripts/order_1.sh", "olora_order2": "scripts/order_2.sh",
           "olora_order3": "scripts/order_3.sh", "olora_long": "scripts/long.sh"}
SETTINGS = {"add_task_name": bool, "add_dataset_name": bool, "max_source_length": int, "max_target_length": int,
            "generation_max_length": int}
NO_INSTRUCTION = ["COPA"]
ABOUT = ("O-LoRA's continual benchmarks as its official repository defines them, at the commit in 'source': "
         "the task orders of scripts/order_{1,2,3}.sh and scripts/long.sh, each dataset's folder under CL_Benchmark/, "
         "its label words (labels.json), its train and test row counts (the configs read every row: sampling "
         "strategy full; the same counts as train_samples and the growth of predict_samples in "
         "logs_and_outputs/long_olora/outputs/*/all_results.json), the instructions (configs/instruction_config.json), "
         "the input settings of the scripts (--add_task_name, --add_dataset_name, --max_source_length, "
         "--max_target_length, --generation_max_length; COPA's loader uses no instruction) and, per file, its git "
         "blob id in the official tree. Read by clbench/data/text_olora.py.")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ClbenchError(f"{path}: cannot be read as JSON ({exc}); is CHECKOUT the O-LoRA repository?") from None


def _script(checkout: Path, rel: str) -> str:
    path = checkout / rel
    if not path.is_file():
        raise ClbenchError(f"{path} is missing; CHECKOUT must be a checkout of {SCRIPTS_REPO}")
    return path.read_text(encoding="utf-8")


SCRIPTS_REPO = "github.com/cmnfriend/O-LoRA"


def task_order(text: str) -> list[tuple[str, str]]:
    """(config folder, dataset) of every ``--task_config_dir configs/<folder>/<dataset>`` line, in order."""
    return re.findall(r"--task_config_dir\s+configs/([\w-]+)/([\w-]+)", text)


def first_command_settings(text: str, where: str) -> dict:
    first = text.split("sleep", 1)[0]
    out = {}
    for key, kind in SETTINGS.items():
        found = re.search(rf"--{key}\s+(\S+)", first)
        if found is None:
            raise ClbenchError(f"{where}: no --{key} in the first command")
        out[key] = found.group(1) == "True" if kind is bool else int(found.group(1))
    return out


def derive(checkout: Path, commit: str) -> dict:
    """The task-list file's content as read from ``checkout`` (module docstring)."""
    orders = {name: task_order(_script(checkout, rel)) for name, rel in SCRIPTS.items()}
    categories: dict[str, str] = {}
    for name, pairs in orders.items():
        if not pairs:
            raise ClbenchError(f"{checkout / SCRIPTS[name]}: no --task_config_dir line")
        for folder, dataset in pairs:
            config = _read_json(checkout / "configs" / folder / dataset / "train_tasks.json")
            entries = [(cat, e) for cat, items in config.items() for e in items]
            if len(entries) != 1 or entries[0][1].get("dataset name") != dataset:
                raise ClbenchError(f"configs/{folder}/{dataset}/train_tasks.json: expected one training dataset, "
                                   f"{dataset}")
            cat, entry = entries[0]
            if entry.get("sampling strategy", "random") != "full":
                raise ClbenchError(f"configs/{folder}/{dataset}/train_tasks.json: sampling strategy is not full; "
                                   "the pinned counts assume every row")
            if categories.setdefault(dataset, cat) != cat:
                raise ClbenchError(f"{dataset} has two categories in configs/ ({categories[dataset]}, {cat})")
    raw = _read_json(checkout / "configs" / "instruction_config.json")
    instructions = {cat: next(i["instruction"] for i in items if i["instruction_type"] == "zero-shot")
                    for cat, items in raw.items()}
    datasets = {}
    for dataset in sorted(categories, key=str.lower):
        cat = categories[dataset]
        base = checkout / FOLDER / cat / dataset
        blobs, counts = {}, {}
        for name in ("labels.json", "train.json", "test.json"):
            path = base / name
            if not path.is_file():
                raise ClbenchError(f"{path} is missing; the checkout needs its {FOLDER}/ data")
            data = path.read_bytes()
            blobs[name] = git_blob_id(data)
            if name != "labels.json":
                counts[name[:-5]] = len(json.loads(data))
        datasets[dataset] = {"category": cat, "folder": f"{cat}/{dataset}",
                             "labels": _read_json(base / "labels.json"), **counts, "git_blob": blobs}
    return {"about": ABOUT, "source": f"{SCRIPTS_REPO}@{commit}",
            "format": first_command_settings(_script(checkout, SCRIPTS["olora_order1"]), SCRIPTS["olora_order1"]),
            "instructions": instructions, "no_instruction": NO_INSTRUCTION, "datasets": datasets,
            "streams": {name: {"script": SCRIPTS[name], "tasks": [d for _, d in pairs]}
                        for name, pairs in orders.items()}}


def render(content: dict) -> bytes:
    return (json.dumps(content, indent=1, ensure_ascii=False) + "\n").encode()


def differences(new: dict, old: dict, prefix: str = "") -> list[str]:
    """Every key path whose value differs between two task-list dicts."""
    if isinstance(new, dict) and isinstance(old, dict):
        out = []
        for key in sorted(set(new) | set(old), key=str):
            out += differences(new.get(key), old.get(key), f"{prefix}{key}.")
        return out
    return [] if new == old else [prefix.rstrip(".")]


def write(content: dict, folder: Path) -> str:
    """Write the file and its SHA256SUMS line in ``folder``; return its sha256."""
    blob = render(content)
    (folder / PINNED).write_bytes(blob)
    digest = hashlib.sha256(blob).hexdigest()
    sums = folder / "SHA256SUMS"
    lines = [ln for ln in (sums.read_text().splitlines() if sums.is_file() else []) if not ln.endswith(f"  {PINNED}")]
    sums.write_text("".join(f"{ln}\n" for ln in lines) + f"{digest}  {PINNED}\n")
    return digest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkout", type=Path, help="a checkout of the O-LoRA repository, CL_Benchmark/ data included")
    ap.add_argument("--commit", required=True, help="the checkout's commit (recorded as the source)")
    ap.add_argument("--out", type=Path, default=None, help="splits folder (default: clbench/splits)")
    ap.add_argument("--write", action="store_true", help="rewrite the file and its SHA256SUMS line")
    args = ap.parse_args(argv)
    folder = args.out or splits_dir()
    try:
        content = derive(args.checkout, args.commit)
        if args.write:
            print(f"wrote {folder / PINNED} (sha256 {write(content, folder)[:16]}...)")
            return
        shipped = folder / PINNED
        old = json.loads(shipped.read_text()) if shipped.is_file() else {}
        diff = differences(content, old)
        print(f"{shipped}: " + ("the checkout gives the same task lists" if not diff else
                                f"differs from the checkout at {', '.join(diff[:10])}"))
        if diff:
            raise SystemExit(1)
    except ClbenchError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
