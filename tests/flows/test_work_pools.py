"""The Docker and Kubernetes work pools (deployments/pools/*.json, deployments/cluster.yaml) and
the cluster pipeline that runs CPU and GPU stages on different pools.

A real Prefect server on 127.0.0.1 gets the pools from the JSON files with `prefect work-pool
create --base-job-template` and the deployments with `prefect deploy`, as the README says (the
server validates both). The job each deployment's flow run would get is rendered by the workers'
own code (`resolve_for_flow_run`, the Docker worker's container settings, docker-py's host
config); no cluster or Docker daemon is contacted. Last, the split itself runs for real: stage
deployments on two process pools, one worker each, and `cluster-pipeline` chaining them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import duckdb
import pytest
import yaml
from prefect.client.schemas.filters import FlowFilter, FlowFilterName

from builders.processes import free_port, stop_group
from flows.cluster_pipeline import STAGE_POOLS, PoolRun, plan_pool_runs, pool_of
from flows.run_plan import stages_to_run
from tasks.presets import load_config
from tasks.registry import STAGE_ORDER

REPO = Path(__file__).resolve().parents[2]
POOLS = REPO / "deployments" / "pools"
CLUSTER_YAML = REPO / "deployments" / "cluster.yaml"
BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
# pool name -> (worker type, template file); the names cluster.yaml and the README use.
CLUSTER_POOLS = {
    f"tok1d-{kind}-{role}": (kind, POOLS / f"{kind}-{role}.json")
    for kind in ("kubernetes", "docker")
    for role in ("cpu", "gpu")
}


def prefect(*args: str, env: dict, cwd: Path = REPO, timeout: float = 300) -> str:
    done = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A Prefect server with the four cluster pools (from the JSON files) and cluster.yaml deployed."""
    home = tmp_path_factory.mktemp("prefect-cluster")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home / "home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"}
    log = open(home / "server.log", "w")
    process = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2)
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, (home / "server.log").read_text()[-3000:]
                time.sleep(1)
        for name, (kind, template) in CLUSTER_POOLS.items():
            prefect("work-pool", "create", name, "--type", kind, "--base-job-template", str(template), env=env)
        deployed = prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(CLUSTER_YAML), env=env)
        yield {"api": api, "env": env, "home": home, "deploy_output": deployed}
    finally:
        stop_group(process)
        log.close()


def run_async(api: str, coroutine_fn):
    """Run `coroutine_fn(client)` against the test's server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def main():
        async with get_client() as client:
            return await coroutine_fn(client)

    with temporary_settings({PREFECT_API_URL: api}):
        return asyncio.run(main())


def cluster_spec() -> list[dict]:
    return yaml.safe_load(CLUSTER_YAML.read_text())["deployments"]


# ---- the templates and the deploy file, checked by Prefect's own models (no server) ----


@pytest.mark.parametrize("name", sorted(CLUSTER_POOLS))
def test_each_template_passes_the_servers_work_pool_schema(name):
    from prefect.server.schemas.actions import WorkPoolCreate

    kind, path = CLUSTER_POOLS[name]
    template = json.loads(path.read_text())
    # The validator the API runs on `work-pool create`: every placeholder is a declared variable.
    WorkPoolCreate(name=name, type=kind, base_job_template=template)
    broken = json.loads(path.read_text())
    broken["job_configuration"]["image"] = "{{ no_such_variable }}"
    with pytest.raises(ValueError, match="no_such_variable"):
        WorkPoolCreate(name=name, type=kind, base_job_template=broken)


def test_cluster_yaml_parses_with_prefects_deploy_file_model_and_names_real_flows():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    model = PrefectYamlModel.model_validate(yaml.safe_load(CLUSTER_YAML.read_text()))
    assert model.pull == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/tok1d"}}]
    entrypoints = {d.entrypoint for d in model.deployments}
    flows = {entrypoint: load_flow_from_entrypoint(str(REPO / entrypoint)).name for entrypoint in entrypoints}
    for deployment in model.deployments:
        assert deployment.work_pool.name in CLUSTER_POOLS, deployment
        kind, role = deployment.work_pool.name.removeprefix("tok1d-").split("-")
        assert deployment.name == kind
        flow_name = flows[deployment.entrypoint]
        if flow_name == "cluster-pipeline":
            assert role == "cpu" and deployment.parameters["deployment"] == kind
        else:
            assert role == STAGE_POOLS[flow_name.removeprefix("stage-")], deployment
    # Every stage of the registry, on both kinds, plus the pipeline on both.
    expected = {f"stage-{stage}/{kind}" for stage in STAGE_ORDER for kind in ("kubernetes", "docker")}
    expected |= {"cluster-pipeline/kubernetes", "cluster-pipeline/docker"}
    assert {f"{flows[d.entrypoint]}/{d.name}" for d in model.deployments} == expected


def test_dockerfile_copies_what_exists_and_installs_the_cluster_and_ray_extras():
    dockerfile = (REPO / "deployments" / "Dockerfile").read_text()
    copies = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    sources = [source for sources in copies for source in sources]
    assert {"pyproject.toml", "constraints.txt", "models", "tasks", "flows", "configs"} <= set(sources)
    missing = [source for source in sources if not (REPO / source).exists()]
    assert missing == []
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert not ignored & set(sources)
    assert re.search(r"^FROM python:3\.11", dockerfile, re.M)
    assert '-c constraints.txt -e ".[cluster,ray,s3]"' in dockerfile
    # The working directory the deployments' pull step sets is where the image installs tok1d.
    assert "WORKDIR /opt/tok1d" in dockerfile
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^cluster = \[.*"prefect-kubernetes.*"prefect-docker', pyproject, re.M)
    assert re.search(r'^ray = \[.*"prefect-ray.*"ray', pyproject, re.M)


# ---- pool runs: which stage deployment runs where ----


def test_every_registry_stage_has_a_pool():
    assert set(STAGE_POOLS) == set(STAGE_ORDER)
    assert set(STAGE_POOLS.values()) == {"cpu", "gpu"}
    with pytest.raises(KeyError, match="'tokenise' has no pool"):
        pool_of("tokenise")


@pytest.mark.parametrize(
    "preset,overrides",
    [("smoke-textok", []), ("smoke", []), ("smoke", ["stages=[caption,embed-text,train-tokenizer]"])],
)
def test_pool_runs_cover_each_stage_once_on_its_pool_in_order(preset, overrides):
    config = load_config(preset, overrides)
    runs = plan_pool_runs(config)
    covered = [stage for run in runs for stage in run.stages]
    assert covered == stages_to_run(config)
    for run in runs:
        assert {STAGE_POOLS[stage] for stage in run.stages} == {run.pool}
        # The run's stage flow computes exactly these (the rest of what it reads is cached by then).
        assert set(run.stages) <= set(stages_to_run(config, until=run.stage)) and run.stages[-1] == run.stage


def test_a_branching_group_gets_one_run_per_branch():
    # The smoke tokenizer reads no text embeddings: embed-text and train-tokenizer are two branches.
    runs = plan_pool_runs(load_config("smoke", ["stages=[caption,embed-text,train-tokenizer]"]))
    assert runs == [PoolRun("caption", "cpu", ("ingest", "caption")), PoolRun("embed-text", "gpu", ("embed-text",)),
                    PoolRun("train-tokenizer", "gpu", ("train-tokenizer",))]


# ---- against the server: the pools and deployments it accepted, and the jobs they render ----


def test_server_holds_the_pools_and_deployments(server):
    async def read(client):
        pools = {name: await client.read_work_pool(name) for name in CLUSTER_POOLS}
        deployments = await client.read_deployments()
        flows = {f.id: f.name for f in await client.read_flows()}
        return pools, [(flows[d.flow_id], d.name, d.work_pool_name) for d in deployments]

    pools, deployments = run_async(server["api"], read)
    for name, (kind, path) in CLUSTER_POOLS.items():
        assert pools[name].type == kind
        assert pools[name].base_job_template == json.loads(path.read_text())
    assert len(deployments) == len(cluster_spec())
    for flow_name, name, pool in deployments:
        role = "cpu" if flow_name == "cluster-pipeline" else STAGE_POOLS[flow_name.removeprefix("stage-")]
        assert pool == f"tok1d-{name}-{role}"


async def _rendered_jobs(client, kind: str, job_variables: dict):
    """Each stage deployment of `kind`: its pool's role and the job configuration its worker builds."""
    from prefect_docker.worker import DockerWorkerJobConfiguration
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    configuration_class = {"kubernetes": KubernetesWorkerJobConfiguration, "docker": DockerWorkerJobConfiguration}[kind]
    rendered = {}
    for stage in STAGE_ORDER:
        deployment = await client.read_deployment_by_name(f"stage-{stage}/{kind}")
        # The server validates the run's job variables against the pool's variables schema here.
        flow_run = await client.create_flow_run_from_deployment(deployment.id, job_variables=job_variables)
        pool = await client.read_work_pool(deployment.work_pool_name)
        configuration = await configuration_class.resolve_for_flow_run(
            flow_run, client=client, work_pool=pool, worker_name="test-worker", deployment=deployment
        )
        rendered[stage] = (pool.name.rsplit("-", 1)[1], flow_run, configuration)
    return rendered


def test_kubernetes_jobs_ask_for_gpus_only_on_the_gpu_pool(server):
    rendered = run_async(server["api"], lambda client: _rendered_jobs(client, "kubernetes", {}))
    for stage, (role, flow_run, configuration) in rendered.items():
        assert role == STAGE_POOLS[stage]
        manifest = configuration.job_manifest
        assert manifest["kind"] == "Job"
        pod = manifest["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        limits = container["resources"]["limits"]
        assert container["image"] == "tok1d:latest"
        assert container["args"] == ["prefect", "flow-run", "execute"]
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id) and env["HF_HUB_OFFLINE"] == "1"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["store"]["persistentVolumeClaim"] == {"claimName": "tok1d-store"}
        assert {"name": "store", "mountPath": "/store"} in container["volumeMounts"]
        if role == "gpu":
            assert limits == {"nvidia.com/gpu": 1}, stage
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
        else:
            assert "nvidia.com/gpu" not in json.dumps(manifest), stage
    # A run can ask for more GPUs (torchrun on 4) through its job variables.
    more = run_async(server["api"], lambda client: _rendered_jobs(client, "kubernetes", {"gpu_count": 4}))
    container = more["train-tokenizer"][2].job_manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4


def test_kubernetes_pool_rejects_a_bad_gpu_count(server):
    from prefect.exceptions import PrefectHTTPStatusError

    async def bad(client):
        deployment = await client.read_deployment_by_name("stage-evaluate/kubernetes")
        await client.create_flow_run_from_deployment(deployment.id, job_variables={"gpu_count": 0})

    with pytest.raises(PrefectHTTPStatusError, match="422"):
        run_async(server["api"], bad)


def test_docker_containers_request_gpus_only_on_the_gpu_pool(server):
    import docker
    from docker.models.containers import _create_container_args
    from prefect_docker.worker import DockerWorker

    # The API URL a container on another host would use (a local one makes the worker ask the
    # daemon for its version, and there is no daemon here).
    variables = {"env": {"PREFECT_API_URL": "http://prefect.example.internal:4200/api"}}
    rendered = run_async(server["api"], lambda client: _rendered_jobs(client, "docker", variables))
    # A client with a fixed API version never contacts the daemon until a request is made.
    client = docker.DockerClient(base_url="unix:///nonexistent/docker.sock", version="1.44")
    for stage, (role, flow_run, configuration) in rendered.items():
        assert role == STAGE_POOLS[stage]
        worker = DockerWorker(work_pool_name=f"tok1d-docker-{role}")
        settings = worker._build_container_settings(client, configuration)
        assert settings["image"] == "tok1d:latest"
        assert settings["environment"]["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
        # What docker-py sends to the daemon on `containers.create`.
        create = _create_container_args({**settings, "version": "1.44"})
        host_config = create["host_config"]
        assert host_config["Binds"] == ["tok1d-store:/store"]
        if role == "gpu":
            (request,) = host_config["DeviceRequests"]
            assert (request["Driver"], request["Count"], request["Capabilities"]) == ("nvidia", -1, [["gpu"]])
            assert host_config["ShmSize"] == 8 * 1024**3
        else:
            assert "DeviceRequests" not in host_config, stage
    client.close()


# ---- the split, for real: CPU and GPU stages on two process pools of one pipeline ----


def test_cluster_pipeline_runs_cpu_and_gpu_stages_on_their_pools(server, tmp_path):
    # Workers poll every second (default 10 s): the test waits on each pickup.
    env = {**server["env"], "OMP_NUM_THREADS": "1", "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_WORKER_QUERY_SECONDS": "1"}
    pools = {"cpu": "split-cpu", "gpu": "split-gpu"}
    for pool in pools.values():
        prefect("work-pool", "create", pool, "--type", "process", env=env)
    # The stage deployments of cluster.yaml, on process pools running from this checkout.
    spec = {
        "name": "tok1d-split-test",
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}],
        "deployments": [
            {"name": "split", "entrypoint": f"flows/full_pipeline.py:{stage.replace('-', '_')}_flow",
             "work_pool": {"name": pools[STAGE_POOLS[stage]]}}
            for stage in STAGE_ORDER
        ],
    }
    prefect_file = tmp_path / "split.yaml"
    prefect_file.write_text(yaml.safe_dump(spec))
    prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file), env=env)

    workers = []
    try:
        for role, pool in pools.items():
            log = open(tmp_path / f"worker-{role}.log", "w")
            workers.append(subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
                                            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        store = tmp_path / "store"
        from flows.cluster_pipeline import cluster_pipeline
        from prefect.settings import PREFECT_API_URL, temporary_settings

        overrides = ["stages=[ingest,caption,embed-text]", "ingest.source.max_images=48"]
        with temporary_settings({PREFECT_API_URL: server["api"]}):
            ran = cluster_pipeline(preset="smoke", store=str(store), deployment="split", overrides=overrides)

            async def child_runs(client):
                cluster = FlowFilter(name=FlowFilterName(any_=["cluster-pipeline"]))
                parents = await client.read_flow_runs(flow_filter=cluster)
                return parents, {stage: await client.read_flow_run(info["flow_run_id"]) for stage, info in ran.items()}

            parents, children = run_async(server["api"], child_runs)
    finally:
        for worker in workers:  # the workers before the server (the module fixture stops it)
            stop_group(worker)
    logs = "\n".join((tmp_path / f"worker-{role}.log").read_text()[-2000:] for role in pools)

    assert set(ran) == {"ingest", "caption", "embed-text"}, logs
    assert ran["ingest"] == ran["caption"] and ran["caption"]["deployment"] == "stage-caption/split"
    assert ran["embed-text"]["deployment"] == "stage-embed-text/split"
    for stage, flow_run in children.items():
        assert flow_run.work_pool_name == pools[STAGE_POOLS[stage]], (stage, flow_run.work_pool_name)
        assert flow_run.state.is_completed(), (stage, flow_run.state, logs)
    # The parent run and every pool's run are named after what was overridden.
    name = "smoke +stages=[ingest,caption,embed-text] +ingest.source.max_images=48"
    assert [parent.name for parent in parents] == [name]
    assert {flow_run.name for flow_run in children.values()} == {name}

    connection = duckdb.connect(str(store / "experiments.duckdb"), read_only=True)
    events = connection.execute(
        "select flow_run_id, stage, cache_hit from stage_events where status = 'completed' order by event_time"
    ).fetchall()
    connection.close()
    on = {role: [(stage, hit) for run_id, stage, hit in events if run_id == ran[first]["flow_run_id"]]
          for role, first in (("cpu", "ingest"), ("gpu", "embed-text"))}
    # The CPU pool computed ingest and caption; the GPU pool's run found them in the shared store.
    assert on["cpu"] == [("ingest", False), ("caption", False)], events
    assert on["gpu"] == [("ingest", True), ("caption", True), ("embed-text", False)], events
