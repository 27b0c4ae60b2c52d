"""The recipes in infra/ agree with the code and with each other (fast; nothing is started or built).

The images, the compose file and the Kubernetes template cannot run here (no Docker daemon, cluster or GPU):
these checks catch what drifts (a renamed flow, a moved pin, a placeholder without a variable)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
INFRA = REPO / "infra"
DOCKERFILES = [INFRA / "docker" / "Dockerfile.cpu", INFRA / "docker" / "Dockerfile.cuda"]


def _pyproject_pin(name: str) -> str:
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in deps if re.match(rf"{name}\s*==", d)).replace(" ", "")


def test_prefect_yaml_entrypoints_are_flows_of_the_named_flows():
    recipe = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    found = {}
    for dep in recipe["deployments"]:
        path, func = dep["entrypoint"].split(":")
        tree = ast.parse((REPO / path).read_text())
        [fn] = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func]
        [deco] = [d for d in fn.decorator_list if isinstance(d, ast.Call) and getattr(d.func, "id", "") == "flow"]
        flow_name = next(k.value.value for k in deco.keywords if k.arg == "name")
        found[f"{flow_name}/{dep['name']}"] = dep["work_pool"]["name"]
    assert found == {"deletion-request/on-demand": "cpu", "governance/daily": "cpu", "synthesize-prototypes/gpu": "gpu"}
    # one policy for both lineage deployments; the pull step reads CLIPFORGET_HOME on the worker
    from clipforget.governance.request import ModelPolicy

    by_name = {d["name"]: d for d in recipe["deployments"]}
    assert by_name["on-demand"]["parameters"]["policy"] == by_name["daily"]["parameters"]["policy"]
    ModelPolicy.model_validate(by_name["daily"]["parameters"]["policy"])  # extra="forbid": a renamed field fails
    assert [s["cron"] for s in by_name["daily"]["schedules"]] == ["0 3 * * *"]
    assert recipe["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $CLIPFORGET_HOME }}"}}]


def test_gpu_job_template_requests_gpus_and_mounts_the_shared_cache():
    from prefect.utilities.templating import apply_values, find_placeholders

    template = json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text())
    variables = template["variables"]["properties"]
    names = {p.name for p in find_placeholders(template["job_configuration"])}
    assert names <= set(variables), names - set(variables)
    defaults = {k: v["default"] for k, v in variables.items() if v.get("default") is not None}
    config = apply_values(template["job_configuration"], {**defaults, "command": "python -m prefect.engine"})
    pod = config["job_manifest"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 == container["resources"]["requests"]["nvidia.com/gpu"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    [mount] = container["volumeMounts"]
    [volume] = pod["volumes"]
    assert mount["name"] == volume["name"] and volume["persistentVolumeClaim"]["claimName"] == "clipforget-cache"
    assert mount["mountPath"] == config["env"]["CLIPFORGET_CACHE"] == "/cache"
    assert container["image"] == "clipforget-cuda:latest"


def test_compose_shares_one_cache_between_the_workers_and_reserves_a_gpu():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "minio", "minio-buckets", "mlflow", "setup", "worker-cpu",
            "worker-gpu"} <= set(services)
    cpu, gpu = services["worker-cpu"], services["worker-gpu"]
    assert cpu["volumes"] == gpu["volumes"] == ["cache:/cache"]
    assert cpu["environment"]["CLIPFORGET_CACHE"] == gpu["environment"]["CLIPFORGET_CACHE"] == "/cache"
    assert gpu["profiles"] == ["gpu"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    for name in ("worker-cpu", "worker-gpu", "setup"):
        env = services[name]["environment"]
        assert {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_ENDPOINT_URL", "CLIPFORGET_CACHE", "CLIPFORGET_LEDGER"} <= set(env), name
    assert "--artifacts-destination" in services["mlflow"]["command"]
    for svc in services.values():
        if "build" in svc:
            assert (INFRA / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve().is_file()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_pin_the_projects_torch(dockerfile):
    text = dockerfile.read_text()
    for name in ("torch", "torchvision"):
        assert _pyproject_pin(name) in text, (dockerfile.name, _pyproject_pin(name))
    assert "not built in ci" in text.lower()
    for src in re.findall(r"^COPY (\S+) ", text, flags=re.M):
        assert (REPO / src).exists(), src
