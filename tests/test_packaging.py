"""The deploy path: every imported package declared, the lock files exactly the declared trees, one work pool
name across prefect.yaml, the manifests and the docs, and scripts/install.sh (the Dockerfile's steps) building a
virtualenv from which the runbooks, Prefect and pg_dump run."""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OWN = {"blocks", "tasks", "flows", "deployments", "tests", "bench"}

# Prints the names of the packages that the requirements in argv need, with their dependencies, as installed
# in the Python that runs it (markers evaluated; extras followed).
CLOSURE = r"""
import json, re, sys
from importlib.metadata import distribution
from packaging.requirements import Requirement

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

seen, stack = set(), [Requirement(r) for r in json.loads(sys.argv[1])]
while stack:
    req = stack.pop()
    key = (norm(req.name), frozenset(req.extras))
    if key in seen:
        continue
    seen.add(key)
    for spec in distribution(req.name).requires or []:
        dep = Requirement(spec)
        if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
            stack.append(dep)
print(json.dumps(sorted({name for name, _ in seen})))
"""


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            out[norm(name)] = version
    return out


def declared(*extras: str) -> dict[str, str]:
    reqs = PYPROJECT["project"]["dependencies"] + [r for e in extras
                                                   for r in PYPROJECT["project"]["optional-dependencies"][e]]
    out = {}
    for req in reqs:
        name, version = req.split("==")
        out[norm(name.split("[")[0])] = version
    return out


def closure(python: str, requirements: list[str]) -> set[str]:
    import json

    done = subprocess.run([python, "-c", CLOSURE, json.dumps(requirements)], capture_output=True, text=True,
                          check=True, timeout=120)
    return set(json.loads(done.stdout))


def imported_distributions(*folders: str) -> dict[str, set[str]]:
    """distribution -> the files under ``folders`` that import it (standard library and own packages left out)."""
    from importlib.metadata import packages_distributions

    provides = packages_distributions()
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in OWN:
                        continue
                    assert top in provides, f"{path.relative_to(ROOT)} imports {top}, which nothing installed provides"
                    for dist in provides[top]:
                        found.setdefault(norm(dist), set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_package_the_product_imports_is_a_declared_dependency() -> None:
    undeclared = {d: sorted(f)[:3] for d, f in imported_distributions("blocks", "tasks", "flows", "deployments").items()
                  if d not in declared()}
    assert undeclared == {}, f"imported but not in pyproject's dependencies: {undeclared}"


def test_every_package_the_tests_and_benchmarks_import_is_declared_with_dev() -> None:
    undeclared = {d: sorted(f)[:3] for d, f in imported_distributions("tests", "bench").items()
                  if d not in declared("dev")}
    assert undeclared == {}, f"imported but not in pyproject's dependencies or [dev]: {undeclared}"


def test_the_lock_files_pin_exactly_the_declared_trees() -> None:
    """requirements.lock is the runtime tree, requirements-dev.lock what [dev] adds: no unused pin, none missing,
    and pyproject's pins are the locked versions."""
    runtime, dev = pins(ROOT / "requirements.lock"), pins(ROOT / "requirements-dev.lock")
    needed = closure(sys.executable, PYPROJECT["project"]["dependencies"])
    with_dev = closure(sys.executable, PYPROJECT["project"]["dependencies"]
                       + PYPROJECT["project"]["optional-dependencies"]["dev"])
    assert set(runtime) == needed
    assert set(dev) == with_dev - needed
    locked = runtime | dev | pins(ROOT / "requirements-kubernetes.lock")
    assert {n: v for n, v in declared("dev", "kubernetes").items() if locked.get(n) != v} == {}


def test_one_work_pool_name_across_prefect_yaml_the_manifests_and_the_docs() -> None:
    shipped = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    pool = shipped["definitions"]["work_pool"]["name"]
    assert {d["work_pool"]["name"] for d in shipped["deployments"]} == {pool}
    commands = [c["command"] for p in (ROOT / "deployments/k8s").glob("*.yaml")
                for doc in yaml.safe_load_all(p.read_text()) if doc and doc["kind"] == "Deployment"
                for c in doc["spec"]["template"]["spec"]["containers"]]
    [worker] = [c for c in commands if c[:3] == ["prefect", "worker", "start"]]
    assert worker[worker.index("--pool") + 1] == pool and worker[worker.index("--type") + 1] == "kubernetes"
    named = []  # every pool a shell line of the docs, the README or prefect.yaml's comments names
    for path in [ROOT / "README.md", ROOT / "prefect.yaml", *(ROOT / "docs").glob("*.md")]:
        for line in path.read_text().splitlines():
            named += re.findall(r"work-pool (?:create|update|inspect) ([\w-]+)|--pool ([\w-]+)", line)
    assert {a or b for a, b in named} == {pool}


def test_the_dockerfile_builds_with_the_install_script() -> None:
    """The image's steps are scripts/install.sh (what the test below runs), into the virtualenv on its PATH."""
    lines = (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    assert lines[[i for i, line in enumerate(lines) if not line.startswith("#")][0]].startswith("FROM debian:12")
    runs = [shlex.split(line.removeprefix("RUN "))[:5] for line in lines if line.startswith("RUN ")]
    assert runs == [["scripts/install.sh", "--system-deps", "--extras", "kubernetes", "/opt/runbooks"]]
    assert "PATH=/opt/runbooks/bin:$PATH" in " ".join(lines)
    manifests = [c for p in (ROOT / "deployments/k8s").glob("*.yaml") for doc in yaml.safe_load_all(p.read_text())
                 if doc and doc["kind"] == "Deployment" for c in doc["spec"]["template"]["spec"]["containers"]]
    runbooks_images = {c["image"] for c in manifests if c["image"].split("/")[-1].startswith("runbooks:")}
    assert runbooks_images and {i.rsplit(":", 1)[1] for i in runbooks_images} == {PYPROJECT["project"]["version"]}


@pytest.mark.timeout(1200)  # a fresh virtualenv of ~135 packages: minutes on a busy 2-core machine
def test_install_script_builds_a_virtualenv_that_runs_the_runbooks(tmp_path: Path) -> None:
    """scripts/install.sh --extras kubernetes into a fresh virtualenv (no apt: `make system-deps` has run):
    the package installed (not editable), Prefect, the Kubernetes worker and PostgreSQL's tools from its bin/."""
    venv = tmp_path / "venv"
    env = {**os.environ, "PIP_NO_COMPILE": "1"}  # bytecode is written on first import instead
    env.pop("VIRTUAL_ENV", None)
    done = subprocess.run(["bash", str(ROOT / "scripts/install.sh"), "--extras", "kubernetes", str(venv)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    bin_ = venv / "bin"

    def run(*argv: str) -> str:
        out = subprocess.run([str(bin_ / argv[0]), *argv[1:]], capture_output=True, text=True, cwd=tmp_path,
                             env={"PATH": f"{bin_}:/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=120)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return out.stdout

    assert "usage: runbooks" in run("runbooks", "--help")
    assert re.search(r"Version:\s+3\.8\.8", run("prefect", "version"))
    assert re.match(r"pg_dump \(PostgreSQL\) 15\.", run("pg_dump", "--version"))
    where = run("python", "-c", "import prefect_kubernetes.worker, tasks._dumpscan, flows.backup; "
                                "print(tasks._dumpscan.__file__, flows.backup.__file__)").split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # built into the venv, not the source tree
    # The venv holds exactly the locked runtime tree plus the [kubernetes] extra's: nothing unpinned came in.
    installed = closure(str(bin_ / "python"), PYPROJECT["project"]["dependencies"]
                        + PYPROJECT["project"]["optional-dependencies"]["kubernetes"])
    assert installed == set(pins(ROOT / "requirements.lock")) | set(pins(ROOT / "requirements-kubernetes.lock"))
