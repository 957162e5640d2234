"""A fresh machine gets what the lock files say, and the checkout shadows no installed package.

Run from the checkout root on purpose: `python -c` and `python -m` put it first on `sys.path`,
where the top-level `kernels/` folder once stood in for the PyPI package `kernels` that
transformers imports at start-up.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LOCKS = ROOT / "locks"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", re.MULTILINE)


def pins(*locks: str) -> dict[str, str]:
    """{normalized name: version} of every requirement of the lock files."""
    found = {}
    for lock in locks:
        found.update((normalized(n), v) for n, v in PIN.findall((LOCKS / lock).read_text()))
    return found


def modules(package: Path) -> set[Path]:
    """The Python files of `package`, but those of its links (kernels, bench): relative paths."""
    return {path.relative_to(package) for path in package.rglob("*.py")
            if path.relative_to(package).parts[0] not in ("kernels", "bench")}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def run(*args: str, cwd: Path = ROOT, timeout: float = 300, **kwargs):
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            **kwargs)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result


def test_every_python_requirement_of_a_lock_is_pinned_and_hashed():
    for lock in ("venv.lock", "venv-model.lock", "vllm.lock", "lock-tool.lock"):
        text = (LOCKS / lock).read_text()
        requirements = [r for r in re.split(r"\n(?=\S)", text) if not r.startswith("#")]
        assert requirements, lock
        for requirement in requirements:
            assert PIN.match(requirement), f"{lock}: not pinned: {requirement.splitlines()[0]}"
            assert "--hash=sha256:" in requirement, f"{lock}: no hash: {requirement}"


def test_the_project_venv_holds_exactly_the_lock():
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip(f"runs in {sys.prefix}, not in the project's .venv that the locks build")
    freeze = run(sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable").stdout
    installed = {normalized(n): v for n, v in PIN.findall(freeze)}
    assert installed == pins("venv.lock", "venv-model.lock")


def test_the_top_level_kernels_is_the_pypi_package_from_the_checkout_root():
    pypi_kernels = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    shown = run(sys.executable, "-c", "import transformers.modeling_utils, kernels; "
                                      "print(kernels.__file__)").stdout
    assert Path(shown.strip()) == Path(pypi_kernels)
    assert not (ROOT / "kernels" / "__init__.py").exists()
    # cotune's modules are reachable as cotune.kernels only
    run(sys.executable, "-c", "import cotune.kernels.sgmv_torch")
    missing = subprocess.run([sys.executable, "-c", "import kernels.sgmv_torch"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert "No module named 'kernels.sgmv_torch'" in missing.stderr


def test_a_command_started_from_the_checkout_root_imports_transformers():
    # the way the tests start servers: `python -m cotune.cli` with the checkout root first
    assert "serve" in run(sys.executable, "-m", "cotune.cli", "--help").stdout
    run(sys.executable, "-m", "cotune.cli", "generate", "--help")
    run(sys.executable, "-c", "import transformers.integrations.hub_kernels")


@pytest.mark.slow
def test_the_readme_in_python_snippet_runs_from_the_checkout_root(smollm2, tmp_path):
    import random

    from peft_reference import save_random_adapters

    snippet = (ROOT / "README.md").read_text().split("## In Python\n", 1)[1]
    snippet = snippet.split("```python\n", 1)[1].split("```", 1)[0]
    hf_model, _checkpoint = smollm2
    adapters = tmp_path / "adapters"
    (made,) = save_random_adapters(hf_model, tmp_path, 1, random.Random(0), std=0.02)
    adapters.mkdir()
    made.rename(adapters / "support-bot")
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"prompt": f"Q: What is fact {i}?\nA:",
                                         "completion": f" Fact {i} is {i * 7}."}) + "\n"
                             for i in range(12)))
    # its relative paths point into tmp_path; the interpreter still starts in the checkout root
    for literal, where in (('"./adapters/support-bot"', adapters / "support-bot"),
                           ('data="facts.jsonl"', facts), ('output_dir="adapters"', adapters)):
        assert literal in snippet, f"the README's snippet no longer has {literal}"
        snippet = snippet.replace(literal, literal.replace(literal.split('"')[1], str(where)))
    shown = run(sys.executable, "-c", snippet, timeout=900).stdout
    assert "loss" in shown, shown
    assert (adapters / "facts" / "v1" / "adapter_model.safetensors").exists()


def test_the_one_line_example_prints_text_from_the_checkout_root():
    code = ("from cotune import Runtime, Request; print(Runtime.load('default').generate("
            "[Request(prompt='Hi', max_tokens=4)])[0].text)")
    assert run(sys.executable, "-c", code).stdout.strip()


@pytest.mark.slow
def test_the_client_extra_installs_without_torch_in_a_clean_venv(tmp_path):
    # the files the image copies (deploy/docker/Dockerfile), links kept as links
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("cotune", "kernels", "benchmarks"):
        shutil.copytree(ROOT / name, source / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "results"))
    # versions from the lock (the build's setuptools too), hashes aside: constraints have none
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in pins("venv.lock").items()))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PIP_CONSTRAINT"] = str(constraints)
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path)
    python = str(venv / "bin" / "python")
    run(python, "-m", "pip", "install", "--quiet", f"{source}[client]", cwd=tmp_path, env=env)

    listed = run(python, "-m", "pip", "list", "--format=json", cwd=tmp_path).stdout
    installed = {normalized(p["name"]) for p in json.loads(listed)}
    assert "cotune" in installed
    assert not installed & {"torch", "numpy", "transformers", "safetensors"}, installed
    # every module of the source ships (pyproject's package list names each package)
    site = Path(run(python, "-c", "import cotune; print(cotune.__file__)",
                    cwd=tmp_path).stdout.strip()).parent
    assert modules(ROOT / "cotune") <= modules(site), modules(ROOT / "cotune") - modules(site)
    run(python, "-c", "import sys; from cotune.client import Client, AsyncClient; "
                      "assert 'torch' not in sys.modules", cwd=tmp_path)
    assert "adapters" in run(str(venv / "bin" / "cotune"), "--help", cwd=tmp_path).stdout
    refused = subprocess.run([str(venv / "bin" / "cotune"), "serve"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "cotune[runtime]" in refused.stderr, refused.stderr
