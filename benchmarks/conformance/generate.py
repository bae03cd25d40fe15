"""Record what the official repositories' code does, per reproduction suite (issue 31): tests/conformance/*.json.

Runs each official repository's own code on the CPU (no GPU, no dataset, no pretrained weights): its learning-rate
scheduler classes, its data manager's class-order code, its transform lists applied to a seeded synthetic image
(``clbench.run.protocol.synthetic_image``: 500 x 375 RGB uint8; its top-left 32 x 32 for CIFAR), and reads the
optimizer / batch / drop_last settings from the configs and source lines that set them. Every recorded item says
how it was obtained (``how``: ``run`` = the official code executed here; ``run+rule`` = an official object stepped
by the generator as the cited line does; ``read`` = taken from the cited config / source line; ``not run`` and
why). Official code is never copied into clbench: the repositories are extracted from git into a temporary folder.

    python benchmarks/conformance/generate.py --repo InfLoRA=PATH/TO/InfLoRA.git --repo CODA-Prompt=... \\
        --repo SD-LoRA=... --repo CL-LoRA=... [--timm067 DIR] [--out tests/conformance]

Each PATH is a git directory (a clone) holding the commit the suites cite (COMMITS below).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from clbench.run.protocol import synthetic_image, tensor_summary  # noqa: E402

COMMITS = {"InfLoRA": ("liangyanshuo/InfLoRA", "e08b00e"), "CODA-Prompt": ("GT-RIPL/CODA-Prompt", "6417d4f"),
           "SD-LoRA": ("WuYichen-97/SD-Lora-CL", "8bacded"), "CL-LoRA": ("JiangpengHe/CL-LoRA", "df4e74e")}

# suite file -> (repository, config, dataset kind, seeds-from-suite)
SUITES = {
    "inflora-cifar100-10.yaml": ("InfLoRA", "configs/cifar100_inflora.json", "cifar"),
    "inflora-imagenet-r-5.yaml": ("InfLoRA", "configs/mimg5_inflora.json", "imagenet_r"),
    "inflora-imagenet-r-10.yaml": ("InfLoRA", "configs/mimg10_inflora.json", "imagenet_r"),
    "inflora-imagenet-r-20.yaml": ("InfLoRA", "configs/mimg20_inflora.json", "imagenet_r"),
    "inflora-domainnet-5.yaml": ("InfLoRA", "configs/domainnet_inflora.json", "domainnet"),
    "prompts-cifar100-10.yaml": ("CODA-Prompt", "configs/cifar-100_prompt.yaml", "cifar"),
    "prompts-imagenet-r-10.yaml": ("CODA-Prompt", "configs/imnet-r_prompt.yaml", "imagenet_r"),
    "sdlora-cifar100.yaml": ("SD-LoRA", "exps/sdlora_c100.json", "cifar"),
    "sdlora-imagenet-r-5.yaml": ("SD-LoRA", "exps/sdlora_inr.json", "imagenet_r"),
    "sdlora-imagenet-r-10.yaml": ("SD-LoRA", "exps/sdlora_inr.json", "imagenet_r"),
    "sdlora-imagenet-r-20.yaml": ("SD-LoRA", "exps/sdlora_inr.json", "imagenet_r"),
    "cllora-cifar100.yaml": ("CL-LoRA", "exps/cifar.json", "cifar"),
    "cllora-imagenet-r.yaml": ("CL-LoRA", "exps/inr.json", "imagenet_r"),
}


def extract(gitdir: str, commit: str, dest: Path) -> str:
    """The commit's Python, JSON and YAML files (what the generator runs and reads) written under ``dest``;
    returns the full commit hash. Files whose blobs a shallow or partial clone lacks are skipped."""
    git = ["git", "--git-dir", gitdir]
    full = subprocess.run([*git, "rev-parse", commit], capture_output=True, text=True, check=True).stdout.strip()
    listing = subprocess.run([*git, "ls-tree", "-r", full], capture_output=True, text=True, check=True).stdout
    for row in listing.splitlines():
        meta, path = row.split("\t", 1)
        blob = meta.split()[2]
        if not path.endswith((".py", ".json", ".yaml")):
            continue
        got = subprocess.run([*git, "cat-file", "blob", blob], capture_output=True)
        if got.returncode == 0:
            (dest / path).parent.mkdir(parents=True, exist_ok=True)
            (dest / path).write_bytes(got.stdout)
    return full


def line_of(path: Path, needle: str) -> str:
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return f"{path.name if path.parent.name == '' else path.parent.name + '/' + path.name}:{n}"
    raise SystemExit(f"{path}: '{needle}' not found; the official code changed, update the generator")


def load_module(name: str, path: Path, stubs: dict[str, types.ModuleType] | None = None):
    for k, v in (stubs or {}).items():
        sys.modules.setdefault(k, v)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def stub(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


def official_image(kind: str):
    from PIL import Image

    img = synthetic_image()
    return Image.fromarray(img[:32, :32] if kind == "cifar" else img)


def apply(trsf_list: list, img, seed: int = 0) -> torch.Tensor:
    from torchvision import transforms

    torch.manual_seed(seed)
    random.seed(seed)
    return transforms.Compose(trsf_list)(img)


def describe(trsf_list: list) -> dict:
    """RandomResizedCrop's scale / ratio, flip p and Normalize's mean / std of an official transform list."""
    from torchvision import transforms

    out = {"scale": None, "ratio": None, "flip_p": None, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    for t in trsf_list:
        if isinstance(t, transforms.RandomResizedCrop):
            out["scale"], out["ratio"] = [float(v) for v in t.scale], [float(v) for v in t.ratio]
        elif isinstance(t, transforms.RandomHorizontalFlip):
            out["flip_p"] = float(t.p)
        elif isinstance(t, transforms.Normalize):
            out["mean"], out["std"] = [float(v) for v in t.mean], [float(v) for v in t.std]
    return out


def item(value, how: str, where: str) -> dict:
    return {"value": value, "how": how, "where": where}


# -- learning rates -----------------------------------------------------------------------------------------------

def lrs_stepped(optimizer, scheduler_step, epochs: int, step_at_start: bool) -> dict[str, list[float]]:
    """Each group's lr in each epoch: ``scheduler_step()`` before an epoch (``step_at_start``, CODA-Prompt's
    ``if epoch > 0``) or after it (InfLoRA, PILOT)."""
    out = {str(i): [] for i in range(len(optimizer.param_groups))}
    for epoch in range(epochs):
        if step_at_start and epoch > 0:
            scheduler_step()
        for i, g in enumerate(optimizer.param_groups):
            out[str(i)].append(float(g["lr"]))
        if not step_at_start:
            scheduler_step()
    return out


def params(n: int = 1) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(1)) for _ in range(n)]


# -- per repository -----------------------------------------------------------------------------------------------

def inflora(repo: Path, config: str, kind: str, seeds: list[int]) -> dict:
    cfg = json.loads((repo / config).read_text())
    items: dict = {}
    if cfg["optim"] == "adam":
        sched = load_module("inflora_schedulers", repo / "utils/schedulers.py")
        opt = torch.optim.Adam(params(), lr=cfg["lrate"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.999))
        s = sched.CosineSchedule(optimizer=opt, K=cfg["epochs"])
        lrs = lrs_stepped(opt, s.step, cfg["epochs"], step_at_start=False)
        items["lr_per_epoch"] = item({"all": lrs["0"]}, "run+rule: official CosineSchedule, step() after every "
                                     "epoch", line_of(repo / "methods/inflora.py", "scheduler.step()"))
        items["optimizer"] = item({"class": "Adam", "lr": cfg["lrate"], "betas": [0.9, 0.999],
                                   "weight_decay": cfg["weight_decay"]}, "read",
                                  line_of(repo / "methods/inflora.py", "optim.Adam(self._network.parameters()"))
    else:  # InfLoRA_domain: SGD, encoder at lrate, classifier at fc_lrate, MultiStepLR([4]) for 5 epochs
        opt = torch.optim.SGD([{"params": params(), "lr": cfg["lrate"]}, {"params": params(), "lr": cfg["fc_lrate"]}],
                              lr=cfg["lrate"], momentum=0.9, weight_decay=cfg["weight_decay"])
        s = torch.optim.lr_scheduler.MultiStepLR(optimizer=opt, milestones=[4], gamma=cfg["lrate_decay"])
        lrs = lrs_stepped(opt, s.step, cfg["epochs"], step_at_start=False)
        items["lr_per_epoch"] = item({"adapters": lrs["0"], "head": lrs["1"]}, "run+rule: torch MultiStepLR with "
                                     "the official milestones/gamma, step() after every epoch",
                                     line_of(repo / "methods/inflora_domain.py", "milestones=[4]"))
        items["optimizer"] = item({"class": "SGD", "lr": cfg["lrate"], "momentum": 0.9,
                                   "weight_decay": cfg["weight_decay"]}, "read",
                                  line_of(repo / "methods/inflora_domain.py", "optim.SGD(network_params"))
    items.update(pilot_data(repo, "InfLoRA", cfg, kind, seeds))
    items["batch_size"] = item(cfg["batch_size"], "read", config)
    items["drop_last"] = item(False, "read: DataLoader without drop_last",
                              line_of(repo / "methods/inflora.py", "DataLoader(train_dataset"))
    items["precision"] = item("fp32", "read: no autocast / half() in the repository's training code", "methods/")
    return items


def pilot_data(repo: Path, name: str, cfg: dict, kind: str, seeds: list[int]) -> dict:
    """Class order per seed through the official DataManager (its _setup_data, with the official iData class whose
    download_data is replaced by synthetic targets), and its transform lists on the synthetic image."""
    stubs = {"ipdb": stub("ipdb", set_trace=lambda: None),
             "utils.datautils": stub("utils.datautils"), "utils.datautils.core50data": stub("c50", CORE50=None)}
    sys.path.insert(0, str(repo))
    for mod in [m for m in list(sys.modules) if m == "utils" or m.startswith("utils.")]:
        if mod not in stubs:
            del sys.modules[mod]
    try:
        for k, v in stubs.items():
            sys.modules[k] = v
        importlib.import_module("utils.data")
        dm = importlib.import_module("utils.data_manager")
    finally:
        sys.path.remove(str(repo))
    ds = cfg["dataset"]
    n = {"cifar": 100, "imagenet_r": 200, "domainnet": 345}[kind]
    idata = dm._get_idata(ds, cfg) if "args" in dm._get_idata.__code__.co_varnames else dm._get_idata(ds)
    cls = type(idata)

    def fake_download(self):
        self.train_data = np.zeros((n, 2, 2, 3), np.uint8)
        self.train_targets = np.arange(n)
        self.test_data, self.test_targets = self.train_data, self.train_targets
    cls.download_data = fake_download
    dm._get_idata = lambda *a, **k: idata
    where = line_of(repo / "utils/data_manager.py", "np.random.seed(seed)")
    orders = {}
    for seed in seeds:
        m = dm.DataManager.__new__(dm.DataManager)
        m.args = cfg
        m._setup_data(ds, cfg["shuffle"], seed)
        orders[str(seed)] = [int(c) for c in m._class_order]
    how = ("run: the official DataManager._setup_data (download_data replaced by synthetic targets 0..C-1); "
           "class ids: torchvision's CIFAR-100 labels / ImageFolder's sorted folder names")
    img = official_image(kind)
    train_list = [*idata.train_trsf, *idata.common_trsf]
    test_list = [*idata.test_trsf, *idata.common_trsf]
    desc = describe(train_list)
    src = f"utils/data.py ({cls.__name__})"
    return {"class_order": item({"ids": "ids", "orders": orders}, how, where),
            "train_augment": item({k: desc[k] for k in ("scale", "ratio", "flip_p")}, "run: the official "
                                  "transform objects' attributes", src),
            "normalize": item({"mean": desc["mean"], "std": desc["std"]}, "run: the official transform list "
                              "(no Normalize = [0, 1] inputs)", src),
            "train_output": item(tensor_summary(apply(train_list, img)), "run: official train transform on the "
                                 "synthetic image, torch/random seeded 0 (a random crop: compare statistics only)",
                                 src),
            "test_output": item(tensor_summary(apply(test_list, img)), "run: official test transform on the "
                                "synthetic image", src)}


# The training module of each PILOT-based repository: where its optimizer, scheduler and DataLoader are built.
PILOT_MODULES = {"SD-LoRA": "models/sdlora.py", "CL-LoRA": "models/cllora.py"}


def sdlora_like(repo: Path, name: str, config: str, kind: str, seeds: list[int]) -> dict:
    cfg = json.loads((repo / config).read_text())
    module = PILOT_MODULES[name]
    if name == "SD-LoRA":
        decay, epochs, sgd_line = 0.0, cfg["init_epoch"], "optim.SGD("
        sgd_how = f"read: {module}'s optim.SGD (weight decay commented out; the config's optimizer key unread)"
        where = "scheduler = optim.lr_scheduler.MultiStepLR("
        how = "run+rule: torch MultiStepLR with the config's milestones/gamma, step() after every epoch"
    else:
        decay, epochs, sgd_line, sgd_how = cfg["weight_decay"], cfg["init_epochs"], "optimizer = optim.SGD(", "read"
        where = "CosineAnnealingLR(optimizer=optimizer, T_max=epoch"
        how = "run+rule: torch CosineAnnealingLR(T_max=epochs, eta_min=min_lr) as get_scheduler builds it, " \
              "step() after every epoch"
    opt = torch.optim.SGD(params(), lr=cfg["init_lr"], momentum=0.9, weight_decay=decay)
    s = (torch.optim.lr_scheduler.MultiStepLR(optimizer=opt, milestones=cfg["init_milestones"],
                                              gamma=cfg["init_lr_decay"]) if name == "SD-LoRA" else
         torch.optim.lr_scheduler.CosineAnnealingLR(optimizer=opt, T_max=epochs, eta_min=cfg["min_lr"]))
    items: dict = {"optimizer": item({"class": "SGD", "lr": cfg["init_lr"], "momentum": 0.9, "weight_decay": decay},
                                     sgd_how, line_of(repo / module, sgd_line))}
    lrs = lrs_stepped(opt, s.step, epochs, step_at_start=False)
    items["lr_per_epoch"] = item({"all": lrs["0"]}, how, line_of(repo / module, where))
    items.update(pilot_data(repo, name, cfg, kind, seeds))
    items["batch_size"] = item(cfg["batch_size"], "read", config)
    items["drop_last"] = item(False, "read: the training DataLoader has no drop_last",
                              line_of(repo / module, "DataLoader("))
    items["precision"] = item("fp32", "read: no autocast / half() in the training code", "models/")
    if name == "SD-LoRA":
        lin = load_module("sdlora_linears", repo / "backbone/linears.py")
        torch.manual_seed(0)
        head = lin.SimpleLinear(768, 10)
        bound = (3 / 768) ** 0.5
        items["head_init"] = item("kaiming_zero" if bool((head.bias == 0).all()) and
                                  float(head.weight.abs().max()) > 1.2 / 768 ** 0.5 and
                                  float(head.weight.abs().max()) <= bound else "other",
                                  "run: official SimpleLinear(768, 10): zero bias, weight within "
                                  "kaiming_uniform(nonlinearity='linear')'s bound", "backbone/linears.py")
    return items


def coda(repo: Path, config: str, kind: str, seeds: list[int]) -> dict:
    cfg = yaml.safe_load((repo / config).read_text())
    sched = load_module("coda_schedulers", repo / "utils/schedulers.py")
    opt = torch.optim.Adam(params(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(cfg["momentum"], 0.999))
    s = sched.CosineSchedule(opt, K=cfg["schedule"][-1])
    lrs = lrs_stepped(opt, s.step, cfg["schedule"][-1], step_at_start=True)
    items = {"lr_per_epoch": item({"all": lrs["0"]}, "run+rule: official CosineSchedule, `if epoch > 0: "
                                  "scheduler.step()` before every epoch", line_of(repo / "learners/default.py",
                                                                                   "if epoch > 0: self.scheduler"))}
    items["optimizer"] = item({"class": "Adam", "lr": cfg["lr"], "betas": [cfg["momentum"], 0.999],
                               "weight_decay": cfg["weight_decay"]}, "read: config; learners/prompt.py passes "
                              "betas (momentum, 0.999)", line_of(repo / "learners/prompt.py", "'betas'"))
    # class order: the official trainer.py lines, executed as written
    trainer = (repo / "trainer.py").read_text().splitlines()
    start = next(i for i, t in enumerate(trainer) if "class_order = np.arange(num_classes)" in t)
    end = next(i for i, t in enumerate(trainer) if "random.shuffle(class_order)" in t)
    body = "\n".join(t[8:] for t in trainer[start:end + 1] if "print(" not in t)
    n = 100 if kind == "cifar" else 200
    orders = {}
    for seed in seeds:
        ns = {"np": np, "random": random, "num_classes": n, "args": types.SimpleNamespace(rand_split=cfg["rand_split"]),
              "self": types.SimpleNamespace(seed=seed)}
        exec(compile(body, "trainer.py", "exec"), ns)  # noqa: S102 - the official lines, verbatim
        orders[str(seed)] = [int(c) for c in ns["class_order"]]
    how = f"run: trainer.py lines {start + 1}-{end + 1} executed as written (prints left out)"
    if kind == "imagenet_r":
        ydoc = yaml.safe_load((repo / "dataloaders/splits/imagenet-r_train.yaml").read_text())
        names = {t: p.split("/")[-2] for p, t in zip(ydoc["data"], ydoc["targets"], strict=True)}
        orders = {k: [names[c] for c in v] for k, v in orders.items()}
        how += "; ids mapped to wnids through dataloaders/splits/imagenet-r_train.yaml's targets"
    items["class_order"] = item({"ids": "names" if kind != "cifar" else "ids", "orders": orders}, how,
                                line_of(repo / "trainer.py", "random.shuffle(class_order)"))
    utils = load_module("coda_dl_utils", repo / "dataloaders/utils.py")
    ds = "CIFAR100" if kind == "cifar" else "ImageNet_R"
    train_t = utils.get_transform(dataset=ds, phase="train", aug=True, resize_imnet=True)
    test_t = utils.get_transform(dataset=ds, phase="test", aug=True, resize_imnet=True)
    desc = describe(train_t.transforms)
    img = official_image(kind)
    items.update({
        "train_augment": item({k: desc[k] for k in ("scale", "ratio", "flip_p")}, "run: get_transform's objects",
                              "dataloaders/utils.py"),
        "normalize": item({"mean": desc["mean"], "std": desc["std"]}, "run: get_transform's Normalize",
                          "dataloaders/utils.py"),
        "train_output": item(tensor_summary(apply(train_t.transforms, img)), "run: official train transform, "
                             "seeded 0 (random crop: statistics only)", "dataloaders/utils.py"),
        "test_output": item(tensor_summary(apply(test_t.transforms, img)), "run: official test transform",
                            "dataloaders/utils.py"),
        "batch_size": item(cfg["batch_size"], "read", config),
        "drop_last": item(True, "read", line_of(repo / "trainer.py", "shuffle=True, drop_last=True")),
        "precision": item("fp32", "read: no autocast / half() in learners/", "learners/")})
    return items


NOT_RUN = {"trainable_params": item(None, "not run: the official learner's model needs each repository's full "
                                          "training stack (CODA-Prompt's zoo with its own ViT and pretrained "
                                          "weights; SD-LoRA's and CL-LoRA's LoRA ViTs load weights from disk); "
                                          "only InfLoRA's SiNet is built here", "")}

# Run in a subprocess with timm 0.6.7 first on sys.path (the official code's timm; clbench uses a current one).
INFLORA_COUNT = r"""
import json, sys, types, textwrap
timm_dir, repo, method_file, args = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
sys.path[:0] = [timm_dir, repo]
sys.modules["ipdb"] = types.ModuleType("ipdb")
import torch
import models.sinet_inflora as sn
build = sn._create_vision_transformer  # random weights: the official builder with pretrained=False
sn._create_vision_transformer = lambda variant, pretrained=False, **kw: build(variant, pretrained=False, **kw)
torch.manual_seed(0)
net = sn.SiNet(args)
src = open(method_file).read().splitlines()
end = next(i for i, t in enumerate(src) if "enabled = set()" in t)
start = max(i for i, t in enumerate(src[:end]) if "for name, param in self._network.named_parameters():" in t)
block = textwrap.dedent("\n".join(src[start:end]))
counts = []
for task in range(2):
    net.update_fc(args["init_cls"] * (task + 1))  # incremental_train's call; SiNet counts the task
    exec(compile(block, method_file, "exec"), {"self": types.SimpleNamespace(_network=net), "base_params": [],
                                               "base_fc_params": []})
    counts.append(sum(p.numel() for p in net.parameters() if p.requires_grad))
print(json.dumps({"counts": counts, "lines": [start + 1, end]}))
"""


def inflora_trainable(repo: Path, config: str, timm_dir: str | None) -> dict:
    """Trainable parameters after tasks 0 and 1: the official SiNet built on the CPU (random weights), then the
    requires_grad block of ``_train`` executed as written."""
    if not timm_dir:
        return NOT_RUN["trainable_params"]
    cfg = json.loads((repo / config).read_text())
    method = repo / ("methods/inflora_domain.py" if cfg["model_name"] == "InfLoRA_domain" else "methods/inflora.py")
    args = {k: cfg[k] for k in ("total_sessions", "rank", "init_cls", "embd_dim")}
    done = subprocess.run([sys.executable, "-c", INFLORA_COUNT, timm_dir, str(repo), str(method), json.dumps(args)],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"building InfLoRA's SiNet failed:\n{done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return item(out["counts"], "run: models/sinet_inflora.py's SiNet (timm 0.6.7, random weights), then "
                f"{method.name} lines {out['lines'][0]}-{out['lines'][1]} (requires_grad) after update_fc of task 0 "
                "and task 1", f"{method.relative_to(repo)}:{out['lines'][0]}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", action="append", default=[], help="NAME=GITDIR (NAME: " + ", ".join(COMMITS) + ")")
    ap.add_argument("--out", default=str(ROOT / "tests" / "conformance"))
    ap.add_argument("--timm067", help="a folder holding timm 0.6.7 (pip install --no-deps --target DIR "
                                      "timm==0.6.7): builds InfLoRA's official SiNet for the trainable counts")
    args = ap.parse_args(argv)
    gitdirs = dict(r.split("=", 1) for r in args.repo)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from clbench.suite import load_suite

    with tempfile.TemporaryDirectory() as tmp:
        trees, fulls = {}, {}
        for name, gitdir in gitdirs.items():
            fulls[name] = extract(gitdir, COMMITS[name][1], Path(tmp) / name)
            trees[name] = Path(tmp) / name
        for suite_file, (name, config, kind) in SUITES.items():
            if name not in trees:
                print(f"skip {suite_file}: no --repo {name}=GITDIR")
                continue
            seeds = list(load_suite(ROOT / "suites" / "repro" / suite_file).seeds)
            repo = trees[name]
            if name == "InfLoRA":
                items = inflora(repo, config, kind, seeds)
            elif name == "CODA-Prompt":
                items = coda(repo, config, kind, seeds)
            else:
                items = sdlora_like(repo, name, config, kind, seeds)
            items.update(NOT_RUN)
            if name == "InfLoRA":
                items["trainable_params"] = inflora_trainable(repo, config, args.timm067)
            fixture = {"suite": f"suites/repro/{suite_file}", "repository": f"github.com/{COMMITS[name][0]}",
                       "commit": fulls[name], "config": config, "image": "clbench.run.protocol.synthetic_image(0) "
                       "(500 x 375 RGB uint8; its top-left 32 x 32 for CIFAR)",
                       "generator": "benchmarks/conformance/generate.py", "items": items}
            (out / suite_file.replace(".yaml", ".json")).write_text(json.dumps(fixture, indent=1) + "\n")
            print(f"wrote {out / suite_file.replace('.yaml', '.json')}")


if __name__ == "__main__":
    main()
