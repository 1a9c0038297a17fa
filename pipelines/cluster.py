"""Ray: joining a cluster or starting a local instance, and checking that the workers fit.

:func:`connect` joins ``RAY_ADDRESS`` / ``train.ray_address`` or starts a fresh local
Ray; :func:`resolve_cpus` turns ``train.cpus_per_worker: auto`` into the CPUs each worker
gets there; :func:`check_resources` fails before training when the requested workers cannot
be placed; :func:`storage_root` turns ``train.storage_path`` into the root Ray Train
and Tune write to (a URI as it is, a local folder absolute).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from components.config import Params
from pipelines.common import StageError

log = logging.getLogger("lrreid")


def storage_root(storage_path: str) -> str:
    """Where Ray keeps runs: a URI (s3://, gs://, ...) as it is, a local folder made absolute."""
    return storage_path if is_uri(storage_path) else str(Path(storage_path).resolve())


def is_uri(path: str) -> bool:
    """A remote storage URI rather than a local path."""
    return "://" in path


def connect(params: Params) -> None:
    """Join RAY_ADDRESS / train.ray_address, or start a local Ray.

    The state API address (which Train V2's placement-group cleaner uses) is pinned
    to this instance: with two Ray instances on one machine (two pipelines, a test
    run beside a `dvc repro`) its auto-detection fails, and a stopped run's workers
    would then keep their CPUs.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or params.train.ray_address
    if address:
        check_reachable(address)
        log.info("joining the Ray cluster at %s", address)
        env = {} if address.startswith("ray://") else {"env_vars": {"RAY_ADDRESS": address}}
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)  # a local Ray's pin from earlier in this process
        os.environ.setdefault("RAY_ADDRESS", address)  # our state API calls and Train's cleaner: this cluster
        try:
            ray.init(address=address, log_to_driver=True, runtime_env=env or None)
        except (ConnectionError, RuntimeError) as exc:
            if "InvalidAuthToken" in _chain_text(exc):  # the cluster wants a token (Ray passes it on as text)
                raise StageError(
                    f"Ray cluster at {address} refused this driver: it uses token authentication. Export "
                    f"RAY_AUTH_MODE=token (as on its nodes), with the cluster's token in ~/.ray/auth_token, "
                    f"RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN") from None
            raise StageError(f"Ray cluster at {address} (RAY_ADDRESS / train.ray_address) does not answer: {exc}") from None
    else:  # "local": always a fresh local instance, never some other Ray running on this machine
        start_local_ray()


def _chain_text(exc: BaseException | None) -> str:
    """The messages of an exception and of those it was raised from."""
    text = ""
    while exc is not None:
        text, exc = text + str(exc) + "\n", exc.__cause__ or exc.__context__
    return text


def start_local_ray(num_cpus: int | None = None, runtime_env: dict | None = None) -> None:
    """A new local Ray with the dashboard (Train V2 polls the state API) on a free port, and the
    state API address pinned to it for this process and every Ray process it starts."""
    import ray

    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=num_cpus, log_to_driver=True, dashboard_port=port, runtime_env=runtime_env)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail within seconds, naming the address, when a cluster's GCS does not accept connections."""
    import socket

    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise StageError(f"Ray cluster at {address} (RAY_ADDRESS / train.ray_address) does not answer within "
                         f"{timeout:g} s ({exc}); start it with `ray start --head` or fix the address") from None


def _alive(nodes: list[dict] | None) -> list[dict]:
    if nodes is None:
        import ray

        nodes = ray.nodes()
    return [n for n in nodes if n.get("Alive")]


def resolve_cpus(params: Params, nodes: list[dict] | None = None, *, groups: int = 1) -> Params:
    """``params`` with train.cpus_per_worker "auto" made a number: the connected cluster's CPUs
    shared evenly among the workers of ``groups`` runs at once (a search's concurrent trials), at
    most one node's, and only as many as still let every worker be placed (on one machine with
    one worker: all its cores). A number is kept as it is. ``nodes``: ``ray.nodes()``-style dicts."""
    t = params.train
    if t.cpus_per_worker != "auto":
        return params
    cpus = [n["Resources"].get("CPU", 0) for n in _alive(nodes)] or [0]
    workers = t.num_workers * groups
    per = max(1, int(min(sum(cpus) // workers, max(cpus))))
    while per > 1 and sum(int(c // per) for c in cpus) < workers:
        per -= 1
    return params.model_copy(update={"train": t.model_copy(update={"cpus_per_worker": float(per)})})


def check_resources(params: Params, nodes: list[dict] | None = None) -> int:
    """Fail before training when the workers cannot be placed (instead of waiting forever);
    returns how many such workers the cluster holds at once.
    ``nodes``: ``ray.nodes()``-style dicts (default: the connected cluster's)."""
    t = params.train
    if t.precision == "fp16" and not t.use_gpu:  # the workers would start, then fail in autocast
        raise StageError("train.precision = 'fp16' needs GPUs (train.use_gpu: true); on CPUs use 'auto', "
                         "'bf16' or 'fp32'")
    nodes = _alive(nodes)
    t = resolve_cpus(params, nodes).train
    total = {k: sum(n["Resources"].get(k, 0) for n in nodes) for k in ("CPU", "GPU")}
    if t.use_gpu and total["GPU"] < 1:
        raise StageError("train.use_gpu = true, but the Ray cluster has no GPU; set train.use_gpu: false "
                         "(or start Ray on GPU nodes)")
    per_worker = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}
    slots = sum(min(int(n["Resources"].get(k, 0) // v) for k, v in per_worker.items() if v > 0) for n in nodes)
    if slots < t.num_workers:
        most = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
        hint = (f"no node has {t.gpus_per_worker:g} GPUs (the most is {most:g}): lower train.gpus_per_worker"
                if t.use_gpu and t.gpus_per_worker > most else
                "lower train.num_workers or train.cpus_per_worker, or add nodes")
        raise StageError(
            f"train.num_workers = {t.num_workers} workers of {per_worker} cannot be placed: the cluster "
            f"({len(nodes)} node(s), {total['CPU']:g} CPUs, {total['GPU']:g} GPUs) fits {slots}; {hint}"
        )
    return slots
