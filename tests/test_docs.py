"""The documentation the configs and the README point to exists, and the shipped Accelerate configs launch.

Every path under docs/ or configs/accelerate/ named in a comment of configs/*.yaml, in README.md or in
docs/*.md must exist; every configs/accelerate/*.yaml must carry the keys `accelerate launch` reads, with
values it accepts, and a distributed type massv training does not refuse (no DeepSpeed, no FSDP).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# docs/... or configs/accelerate/...; a path ends before whitespace, a quote, a backtick or a bracket
DOC_PATH = re.compile(r"(?<![\w/.-])((?:docs|configs/accelerate)/[\w./-]*[\w/])")
ACCELERATE_KEYS = ("compute_environment", "distributed_type", "num_processes", "mixed_precision", "num_machines")
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
# The paper-scale run configs (tiny.yaml and demo.yaml are for one CPU).
RUN_CONFIGS = ("qwen2_5_vl_7b", "qwen2_5_vl_3b", "gemma3_12b", "gemma3_4b")


def yaml_comments(path: Path) -> str:
    """The comment part of every line (after the first # that starts a comment)."""
    comments = []
    for line in path.read_text().splitlines():
        match = re.search(r"(?:^|\s)#(.*)$", line)
        if match:
            comments.append(match.group(1))
    return "\n".join(comments)


def named_paths() -> dict[str, set[str]]:
    """path named -> the files that name it."""
    sources = {path: yaml_comments(path) for path in sorted((ROOT / "configs").glob("*.yaml"))}
    sources[ROOT / "README.md"] = (ROOT / "README.md").read_text()
    sources.update({path: path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))})
    named: dict[str, set[str]] = {}
    for source, text in sources.items():
        for match in DOC_PATH.finditer(text):
            named.setdefault(match.group(1).rstrip("."), set()).add(str(source.relative_to(ROOT)))
    return named


def test_documented_paths_exist() -> None:
    named = named_paths()
    assert "docs/scaling.md" in named, "the configs name docs/scaling.md; the pattern no longer finds it"
    missing = {path: sorted(sources) for path, sources in named.items() if not (ROOT / path).exists()}
    assert not missing, f"named but missing: {missing}"


def test_repository_paths_in_docs_exist() -> None:
    """docs/*.md also name scripts, results and configs (eval/..., configs/..., massv/...): they exist too."""
    pattern = re.compile(r"(?<![\w/.<>-])((?:eval|configs|massv|tests|docs)/[\w./-]*\w)")
    missing = {}
    for doc in sorted((ROOT / "docs").glob("*.md")):
        for match in pattern.finditer(doc.read_text()):
            if not (ROOT / match.group(1)).exists():
                missing.setdefault(match.group(1), doc.name)
    assert not missing, f"named in docs but missing: {missing}"


def test_the_pattern_finds_paths_and_stops_at_punctuation() -> None:
    text = "see docs/scaling.md. Or `configs/accelerate/8gpu.yaml`, (docs/x/y.md) not mydocs/z.md"
    assert [match.group(1).rstrip(".") for match in DOC_PATH.finditer(text)] == [
        "docs/scaling.md", "configs/accelerate/8gpu.yaml", "docs/x/y.md"]
    assert yaml_comments_of("a: 1  # see docs/a.md\nb: docs/not_a_comment.md\n") == " see docs/a.md"


def yaml_comments_of(text: str) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(text)
        return yaml_comments(path)


def test_accelerate_configs_are_shipped() -> None:
    names = {path.name for path in ACCELERATE_CONFIGS}
    assert {"1gpu.yaml", "8gpu.yaml", "64gpu_8nodes.yaml"} <= names


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda path: path.name)
def test_accelerate_config_has_what_accelerate_needs(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict), f"{path.name} is not a YAML mapping"
    missing = [key for key in ACCELERATE_KEYS if key not in config]
    assert not missing, f"{path.name} lacks {missing}"
    assert config["compute_environment"] == "LOCAL_MACHINE"
    assert config["distributed_type"] in ("NO", "MULTI_GPU"), "massv training refuses DeepSpeed and FSDP"
    assert config["mixed_precision"] in ("no", "bf16", "fp16")
    processes, machines = config["num_processes"], config["num_machines"]
    assert isinstance(processes, int) and isinstance(machines, int) and processes >= machines >= 1
    assert processes % machines == 0, "num_processes is the total over all machines"
    if config["distributed_type"] == "NO":
        assert processes == machines == 1
    if machines > 1:
        assert config.get("main_process_ip") and config.get("main_process_port"), "multi-node needs node 0's address"
        assert 0 <= config.get("machine_rank", 0) < machines

    from accelerate.commands.config.config_args import ClusterConfig

    parsed = ClusterConfig.from_yaml_file(str(path))  # what `accelerate launch --config_file` does
    assert parsed.num_processes == processes and parsed.num_machines == machines


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda path: path.name)
def test_launch_divides_every_global_batch(path: Path) -> None:
    """For each shipped launch size the doc's per-device batch makes the configs' global batch whole."""
    from massv.config import load_config
    from massv.train.batching import resolve_accumulation

    processes = yaml.safe_load(path.read_text())["num_processes"]
    # docs/scaling.md: 64 GPUs need phase1.per_device_batch_size=4 and phase2.per_device_batch_size=2
    per_device = {"phase1": 4, "phase2": 2} if processes == 64 else {}
    for name in RUN_CONFIGS:
        overrides = [f"{phase}.per_device_batch_size={size}" for phase, size in per_device.items()]
        config = load_config(ROOT / "configs" / f"{name}.yaml", overrides)
        for phase in ("phase1", "phase2"):
            cfg = getattr(config, phase)
            if cfg.global_batch_size is None:
                continue
            steps = resolve_accumulation(cfg, processes).gradient_accumulation_steps
            assert steps * cfg.per_device_batch_size * processes == cfg.global_batch_size
