"""O-LoRA's benchmarks (clbench.data.text_olora): the pinned task lists are the official ones, the reader builds the
official input text and targets from a CL_Benchmark folder, and refuses tampered lists, foreign data and missing
data with one line. The data is a tiny fake CL_Benchmark written here (a few rows per task, three of them real rows
of the official files); the pinned list it is checked against is the shipped one with this data's counts and ids."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from clbench.data import text_olora
from clbench.data.datasets.splitfiles import splits_dir
from clbench.errors import ClbenchError

# The first test row of three official files and the model input the official code builds for it: the output of
# src/uie_dataset_lora.py (load_NLI_dataset / load_COPA_dataset / load_SC_dataset) and src/uie_collator.py
# (get_instruction, add_task_name and add_dataset_name True) of github.com/cmnfriend/O-LoRA@07117e1, run on
# CL_Benchmark/{NLI/CB,COPA/COPA,SC/SST-2}/test.json.
OFFICIAL = {
    "CB": ("sentence 1: Valence the void-brain, Valence the virtuous valet. Why couldn't the figger choose his own "
           "portion of titanic anatomy to shaft? Did he think he was helping?\nsentence 2: Valence was helping",
           "contradiction",
           "Task:NLI\nDataset:CB\nWhat is the logical relationship between the \"sentence 1\" and the \"sentence 2\"? "
           "Choose one from the option.\nOption: entailment, contradiction, neutral \nsentence 1: Valence the "
           "void-brain, Valence the virtuous valet. Why couldn't the figger choose his own portion of titanic anatomy "
           "to shaft? Did he think he was helping?\nsentence 2: Valence was helping\nAnswer:"),
    "COPA": ("Which sentence is the effect of \"The man turned on the faucet.\"? Choose one between A and B.\nA: The "
             "toilet filled with water.\nB: Water flowed from the spout.",
             "B",
             "Task:COPA\nDataset:COPA\nWhich sentence is the effect of \"The man turned on the faucet.\"? Choose one "
             "between A and B.\nA: The toilet filled with water.\nB: Water flowed from the spout.\nAnswer:"),
    "SST-2": ("Text: stealing harvard aspires to comedic grand larceny but stands convicted of nothing more than "
              "petty theft of your time . ",
              "Bad",
              "Task:SC\nDataset:SST-2\nWhat is the sentiment of the following paragraph? Choose one from the "
              "option.\nOption: Good, Bad \nText: stealing harvard aspires to comedic grand larceny but stands "
              "convicted of nothing more than petty theft of your time . \nAnswer:"),
}


def _shipped() -> dict:
    return json.loads((splits_dir() / text_olora.PINNED).read_text())


def fake_benchmark(tmp: Path, rows: int = 3) -> tuple[Path, Path]:
    """A CL_Benchmark folder under tmp/data with ``rows`` train and ``rows + 1`` test rows per dataset (the test
    set's first row the official one above where there is one, MNLI's last test row labelled '-' as in the
    official file), and a splits folder whose pinned list is the shipped one with this data's counts and ids."""
    spec = _shipped()
    base = tmp / "data" / text_olora.FOLDER
    for name, d in spec["datasets"].items():
        folder = base / d["folder"]
        folder.mkdir(parents=True)
        words = d["labels"]
        train = [{"sentence": f"{name} train {i}", "label": words[i % len(words)]} for i in range(rows)]
        test = [{"sentence": f"{name} test {i}", "label": words[(i + 1) % len(words)]} for i in range(rows + 1)]
        if name in OFFICIAL:
            test[0] = {"sentence": OFFICIAL[name][0], "label": OFFICIAL[name][1]}
        if name == "MNLI":
            test[-1]["label"] = "-"
        blobs = {}
        for file, content in (("labels.json", words), ("train.json", train), ("test.json", test)):
            data = json.dumps(content, ensure_ascii=False, indent=2).encode()
            (folder / file).write_bytes(data)
            blobs[file] = text_olora.git_blob_id(data)
        d.update(train=len(train), test=len(test), git_blob=blobs)
    splits = tmp / "splits"
    splits.mkdir()
    blob = json.dumps(spec, indent=1).encode()
    (splits / text_olora.PINNED).write_bytes(blob)
    (splits / "SHA256SUMS").write_text(f"{hashlib.sha256(blob).hexdigest()}  {text_olora.PINNED}\n")
    return tmp / "data", splits


def test_shipped_task_lists_are_the_official_orders_counts_and_label_words():
    bench = text_olora.benchmark()
    assert bench.source == "github.com/cmnfriend/O-LoRA@07117e1fc4a5f5ad9308a815a42cee8f46502dc8"
    # scripts/order_{1,2,3}.sh and scripts/long.sh
    assert bench.streams == {
        "olora_order1": ["dbpedia", "amazon", "yahoo", "agnews"],
        "olora_order2": ["dbpedia", "amazon", "agnews", "yahoo"],
        "olora_order3": ["yahoo", "amazon", "agnews", "dbpedia"],
        "olora_long": ["yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews",
                       "yahoo", "MultiRC", "BoolQA", "WiC"]}
    # the released logs (logs_and_outputs/{order1,long}_olora/outputs/*/all_results.json): train_samples, and
    # the growth of predict_samples from one task to the next (the new task's test set)
    counts = {n: (d.counts["train"], d.counts["test"]) for n, d in bench.datasets.items()}
    assert counts == {"dbpedia": (14000, 7600), "amazon": (5000, 7600), "yahoo": (10000, 7600),
                      "agnews": (4000, 7600), "yelp": (5000, 7600), "MNLI": (3000, 7600), "CB": (250, 56),
                      "COPA": (400, 100), "QQP": (2000, 7600), "RTE": (2000, 277), "IMDB": (2000, 7600),
                      "SST-2": (2000, 872), "MultiRC": (2000, 4848), "BoolQA": (2000, 3270), "WiC": (2000, 638)}
    assert bench.datasets["agnews"].labels == ["World", "Sports", "Business", "Science or Technology"]
    assert bench.datasets["amazon"].labels == ["very negative", "negative", "neutral", "positive", "very positive"]
    assert len(bench.datasets["dbpedia"].labels) == 14 and len(bench.datasets["yahoo"].labels) == 10
    assert bench.format["max_source_length"] == 512 and bench.format["max_target_length"] == 50


def test_reader_builds_the_order_counts_label_words_and_the_official_input(tmp_path):
    root, splits = fake_benchmark(tmp_path)
    stream = text_olora.build_text_stream("olora_long", root, splits)
    bench = text_olora.benchmark(splits)
    assert [t.name for t in stream.tasks] == bench.streams["olora_long"]
    by_name = {t.name: t for t in stream.tasks}
    for task in stream.tasks:
        assert task.labels == bench.datasets[task.name].labels
        assert len(task.train) == 3 and len(task.test) == (3 if task.name == "MNLI" else 4)
    for name, (_, label, official_input) in OFFICIAL.items():
        first = by_name[name].test[0]
        assert first.text == official_input  # byte for byte the official collator's input
        assert by_name[name].target(first) == label
    # training rows keep the file order; the target is the row's label word
    agnews = by_name["agnews"]
    assert [agnews.target(e) for e in agnews.train] == ["World", "Sports", "Business"]
    assert agnews.train[1].text.endswith("Option: World, Sports, Business, Science or Technology \nagnews train 1"
                                         "\nAnswer:")
    assert stream.meta["unscorable_test_rows"] == "MNLI:1"  # the '-' row: no label word to generate
    assert stream.meta["task_list_sha256"] == bench.sha256 and len(stream.meta["data_sha256"]) == 64
    assert stream.meta["max_source_length"] == "512"
    order1 = text_olora.build_text_stream("olora_order1", root / text_olora.FOLDER, splits)  # root = the folder
    assert [t.name for t in order1.tasks] == ["dbpedia", "amazon", "yahoo", "agnews"]


def test_a_tampered_task_list_is_refused(tmp_path):
    splits = tmp_path / "splits"
    splits.mkdir()
    blob = (splits_dir() / text_olora.PINNED).read_bytes()
    (splits / "SHA256SUMS").write_bytes((splits_dir() / "SHA256SUMS").read_bytes())
    (splits / text_olora.PINNED).write_bytes(blob.replace(b'"train": 4000', b'"train": 4001'))
    with pytest.raises(ClbenchError, match="does not match SHA256SUMS"):
        text_olora.benchmark(splits)
    (splits / text_olora.PINNED).write_bytes(blob)  # the untouched copy passes
    assert text_olora.benchmark(splits).sha256 == hashlib.sha256(blob).hexdigest()


def test_missing_data_fails_fast_naming_the_folder_and_where_to_get_it(tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    message = text_olora.check(empty, "olora_order1")
    assert message is not None and "\n" not in message
    assert str(empty) in message and "TC/dbpedia/labels.json" in message
    assert "github.com/cmnfriend/O-LoRA" in message and "CL_Benchmark/" in message and "CLBENCH_DATA" in message
    with pytest.raises(ClbenchError) as err:
        text_olora.build_text_stream("olora_order1", empty)
    assert str(err.value) == message
    with pytest.raises(ClbenchError, match="unknown O-LoRA stream 'olora_order9'"):
        text_olora.check(empty, "olora_order9")


def test_foreign_data_and_wrong_counts_are_refused(tmp_path):
    root, splits = fake_benchmark(tmp_path)
    path = root / text_olora.FOLDER / "TC" / "yahoo" / "train.json"
    path.write_bytes(path.read_bytes().replace(b"yahoo train 0", b"yahoo train X"))
    with pytest.raises(ClbenchError, match="yahoo/train.json: not the official file"):
        text_olora.build_text_stream("olora_order1", root, splits)
    root, splits = fake_benchmark(tmp_path / "b")
    spec = json.loads((splits / text_olora.PINNED).read_text())
    spec["datasets"]["agnews"]["test"] = 5
    blob = json.dumps(spec).encode()
    (splits / text_olora.PINNED).write_bytes(blob)
    (splits / "SHA256SUMS").write_text(f"{hashlib.sha256(blob).hexdigest()}  {text_olora.PINNED}\n")
    with pytest.raises(ClbenchError, match="agnews/test.json: 4 rows, the official file has 5"):
        text_olora.build_text_stream("olora_order1", root, splits)


def test_the_streams_are_registered_and_build_through_the_registry(tmp_path, monkeypatch):
    from clbench.data import registry
    from clbench.data.datasets import splitfiles
    from clbench.data.streams import build_stream
    from clbench.suite import StreamConfig, shipped_split_sums

    assert {"olora_order1", "olora_order2", "olora_order3", "olora_long"} <= set(registry.stream_names())
    root, splits = fake_benchmark(tmp_path)
    monkeypatch.setattr(splitfiles, "splits_dir", lambda: splits)  # the fake data's pinned list
    cfg = StreamConfig(name="olora_order2", num_tasks=4, root=str(root))
    spec = registry.stream_spec("olora_order2")
    assert spec.check(cfg) is None
    stream = build_stream(cfg, seed=3)
    assert [t.name for t in stream.tasks] == ["dbpedia", "amazon", "agnews", "yahoo"]
    assert stream.meta["order"] == "dbpedia,amazon,agnews,yahoo"
    wrong = StreamConfig(name="olora_long", num_tasks=5, root=str(root))
    assert registry.stream_spec("olora_long").check(wrong) == ("stream.num_tasks: olora_long is O-LoRA's fixed "
                                                               "order of 15 tasks; set num_tasks: 15")
    missing = StreamConfig(name="olora_order1", num_tasks=4, root=str(tmp_path / "elsewhere"))
    assert "github.com/cmnfriend/O-LoRA" in registry.stream_spec("olora_order1").check(missing)
    # the task list is part of every O-LoRA stream's protocol identity (clbench.suite.Suite.protocol_hash)
    monkeypatch.undo()
    pinned = splitfiles.pinned_sums()[text_olora.PINNED]
    assert shipped_split_sums("olora_long") == shipped_split_sums("olora_order1") == {text_olora.PINNED: pinned}
    assert text_olora.PINNED not in shipped_split_sums("imagenet_r")


@pytest.mark.slow
def test_an_olora_stream_trains_through_the_loop_on_a_tiny_t5(tmp_path, mlflow_uri, monkeypatch):
    """The whole path: the fake CL_Benchmark read by the registered stream, tokenized by the tiny T5, trained by
    olora and evaluated after every task, its identity (task list, data) tagged on the run. About 15 s of CPU
    (slow); the default run covers the stream's build through the registry above."""
    pytest.importorskip("transformers", reason="the language-model extra: pip install 'clbench[lm]'")
    import yaml
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from clbench.cli import app
    from clbench.data.datasets import splitfiles

    root, splits = fake_benchmark(tmp_path)
    monkeypatch.setattr(splitfiles, "splits_dir", lambda: splits)
    monkeypatch.chdir(tmp_path)
    suite = {"name": "olora-tiny", "seeds": [0],
             "stream": {"name": "olora_order1", "num_tasks": 4, "root": str(root)},
             "backbone": {"name": "t5_tiny_clbench", "pretrained": False, "max_source_length": 24},
             "train": {"epochs": 1, "batch_size": 4, "lr": 1e-2},
             "runtime": {"device": "cpu", "cpu_threads": 1},
             "methods": [{"name": "olora", "params": {"rank": 2, "alpha": 2, "targets": ["q", "v"]}}],
             "tracking": {"experiment": "olora-tiny"}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(suite))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "s.yaml")])
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=mlflow_uri)
    [child] = [r for r in client.search_runs([client.get_experiment_by_name("olora-tiny").experiment_id])
               if r.data.tags.get("clbench.role") == "child"]
    tags, metrics = child.data.tags, child.data.metrics
    assert tags["clbench.stream.order"] == "dbpedia,amazon,yahoo,agnews"
    assert tags["clbench.stream.task_list_sha256"] == text_olora.benchmark(splits).sha256
    assert len(tags["clbench.stream.data_sha256"]) == 64
    assert {"final/acc", "final/bwt", "eval/acc/task_03"} <= set(metrics)
    assert sorted(h.step for h in client.get_metric_history(child.info.run_id, "eval/acc")) == [0, 1, 2, 3]


def fake_checkout(tmp: Path) -> tuple[Path, dict]:
    """An O-LoRA checkout in miniature: the scripts' --task_config_dir lines and input settings, the task configs,
    the instruction file and the fake CL_Benchmark data; and the task list it should give."""
    root, splits = fake_benchmark(tmp)
    expected = json.loads((splits / text_olora.PINNED).read_text())
    checkout = tmp / "O-LoRA"
    checkout.mkdir()
    (root / text_olora.FOLDER).rename(checkout / text_olora.FOLDER)
    fmt = expected["format"]
    settings = "".join(f"   --{k} {v} \\\n" for k, v in fmt.items())
    for name, stream in expected["streams"].items():
        folder = {"olora_long": "long_configs"}.get(name, name.replace("olora_", "") + "_configs")
        text = "".join(f"deepspeed src/run_uie_lora.py \\\n   --task_config_dir configs/{folder}/{task} \\\n"
                       + settings + "\nsleep 5\n\n" for task in stream["tasks"])
        (checkout / stream["script"]).parent.mkdir(exist_ok=True)
        (checkout / stream["script"]).write_text(text)
        for task in stream["tasks"]:
            config = checkout / "configs" / folder / task
            config.mkdir(parents=True, exist_ok=True)
            category = expected["datasets"][task]["category"]
            (config / "train_tasks.json").write_text(json.dumps(
                {"SC": [], "TC": [], category: [{"sampling strategy": "full", "dataset name": task}]}))
    instructions = {cat: [{"instruction_type": "zero-shot", "instruction": text}]
                    for cat, text in expected["instructions"].items()}
    (checkout / "configs" / "instruction_config.json").write_text(json.dumps(instructions))
    return checkout, expected


def test_the_task_list_is_derived_from_a_checkout_and_checked_against_it(tmp_path, capsys):
    from clbench.splits import make_olora

    checkout, expected = fake_checkout(tmp_path)
    commit = "07117e1fc4a5f5ad9308a815a42cee8f46502dc8"
    derived = make_olora.derive(checkout, commit)
    assert make_olora.differences(derived, expected) == []  # orders, categories, labels, counts, ids, settings
    out = tmp_path / "out"
    out.mkdir()
    make_olora.main([str(checkout), "--commit", commit, "--out", str(out), "--write"])
    bench = text_olora.benchmark(out)  # the written file passes its own SHA256SUMS line and reads back
    assert bench.streams["olora_order3"] == ["yahoo", "amazon", "agnews", "dbpedia"]
    make_olora.main([str(checkout), "--commit", commit, "--out", str(out)])
    assert "the same task lists" in capsys.readouterr().out
    labels = checkout / text_olora.FOLDER / "TC" / "agnews" / "labels.json"
    labels.write_text(json.dumps(["World", "Sports", "Business", "Sci/Tech"]))
    with pytest.raises(SystemExit) as stop:
        make_olora.main([str(checkout), "--commit", commit, "--out", str(out)])
    assert stop.value.code == 1
    assert "datasets.agnews.git_blob.labels.json, datasets.agnews.labels" in capsys.readouterr().out
