"""One worker per GPU: which visible devices serve sees (torch's count or a scheduler's CUDA_VISIBLE_DEVICES),
what `--gpus` picks, how N workers are dealt over them, what each worker process is started with, and how
/ready counts them per GPU. No GPU and no subprocess: the device count is a stand-in function."""

from __future__ import annotations

import os

import pytest

from server import cli, gpus
from server import supervisor as sup
from server.queue.memory import MemoryQueue
from server.readiness import ReadyState, ready_state
from server.settings import Settings


def counting(n: int):
    return lambda: n


def no_count() -> int:
    raise AssertionError("the device count was asked for where CUDA_VISIBLE_DEVICES or --device cpu decides")


def plan(device: str = "cuda", workers: int | None = None, picks: str = "", env: dict | None = None, count=no_count):
    return gpus.plan_workers(device, workers, [p for p in picks.split(",") if p], env or {}, count)


def summary(assignments: list[gpus.Assignment]) -> list[tuple]:
    return [(a.index, a.label, a.device, a.visible, a.ordinal) for a in assignments]


@pytest.mark.parametrize("count", [1, 4, 8])
def test_one_pinned_worker_per_counted_gpu(count: int) -> None:
    assignments = plan("auto", count=counting(count))
    assert summary(assignments) == [(i, str(i), "cuda", str(i), i) for i in range(count)]
    assert plan("cuda", count=counting(count)) == assignments


def test_no_gpu_auto_is_cpu_and_cuda_is_refused() -> None:
    assert summary(plan("auto", count=counting(0))) == [(0, "cpu", "cpu", None, None)]
    assert summary(plan("auto", workers=3, count=counting(0))) == [(i, "cpu", "cpu", None, None) for i in range(3)]
    with pytest.raises(ValueError, match="no GPU is visible"):
        plan("cuda", count=counting(0))


def test_cpu_workers_are_unpinned_and_never_count_gpus() -> None:
    assert summary(plan("cpu", workers=2)) == [(0, "cpu", "cpu", None, None), (1, "cpu", "cpu", None, None)]
    assert [a.local_device for a in plan("cpu")] == ["cpu"]
    with pytest.raises(ValueError, match="--gpus picks CUDA devices, but the device is cpu"):
        plan("cpu", picks="0")


@pytest.mark.parametrize(("visible", "labels"), [
    ("2,5", ["2", "5"]),
    ("GPU-aaa,GPU-bbb", ["GPU-aaa", "GPU-bbb"]),
    ("MIG-5f7c1a3e-94b1-5fb5-a6d0-0b7f2f3c1e11,MIG-0c9e8d2b-1a2b-5c3d-8e4f-5a6b7c8d9e0f",
     ["MIG-5f7c1a3e-94b1-5fb5-a6d0-0b7f2f3c1e11", "MIG-0c9e8d2b-1a2b-5c3d-8e4f-5a6b7c8d9e0f"]),
    (" 3 , 1 ", ["3", "1"]),
    ("0,-1,2", ["0"]),  # as CUDA reads it: the list ends at the first invalid entry
])
def test_a_schedulers_visible_devices_are_used_as_given(visible: str, labels: list[str]) -> None:
    env = {"CUDA_VISIBLE_DEVICES": visible}
    assert summary(plan("cuda", env=env)) == [(i, label, "cuda", label, i) for i, label in enumerate(labels)]
    # --device auto still asks whether CUDA works at all
    assert [a.label for a in plan("auto", env=env, count=counting(len(labels)))] == labels


@pytest.mark.parametrize(("visible", "message"), [
    ("1,abc,2", "'abc' is neither a device index nor a GPU-/MIG- UUID"),
    ("0,0", "names '0' twice"),
    ("GPU-aaa,GPU-aaa", "names 'GPU-aaa' twice"),
])
def test_visible_lists_cuda_would_read_otherwise_are_refused(visible: str, message: str) -> None:
    """CUDA would see fewer devices than listed (the prefix before a bad entry; none for a repeated one)."""
    with pytest.raises(ValueError, match=message):
        plan("cuda", env={"CUDA_VISIBLE_DEVICES": visible})


def test_an_empty_visible_list_means_no_gpu() -> None:
    env = {"CUDA_VISIBLE_DEVICES": ""}
    assert gpus.visible_devices(env, no_count) == []
    with pytest.raises(ValueError, match="no GPU is visible \\(CUDA_VISIBLE_DEVICES=''\\)"):
        plan("cuda", env=env)
    assert summary(plan("auto", env=env, count=counting(0))) == [(0, "cpu", "cpu", None, None)]


def test_gpus_picks_positions_in_the_visible_list() -> None:
    assert summary(plan(picks="0,2,3", count=counting(8))) == [
        (0, "0", "cuda", "0", 0), (1, "2", "cuda", "2", 2), (2, "3", "cuda", "3", 3)]
    env = {"CUDA_VISIBLE_DEVICES": "GPU-aaa,GPU-bbb,GPU-ccc"}
    assert summary(plan(picks="2,0", env=env)) == [(0, "GPU-ccc", "cuda", "GPU-ccc", 2),
                                                   (1, "GPU-aaa", "cuda", "GPU-aaa", 0)]
    # a single pick runs in serve's own process on that position
    assert [a.local_device for a in plan(picks="1", env=env)] == ["cuda:1"]
    assert summary(plan("cuda:1", env=env)) == summary(plan(picks="1", env=env))


@pytest.mark.parametrize(("picks", "message"), [
    ("0,8", "--gpus: 8 is out of range; 8 visible \\(0-7\\)"),
    ("-1", "--gpus: -1 is out of range"),
    ("1,3,1", "--gpus: 1 is listed twice"),
    ("GPU-aaa", "--gpus: 'GPU-aaa' is not a position in the visible GPUs; 8 visible"),
])
def test_bad_picks_name_the_entry_and_the_visible_devices(picks: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan(picks=picks, count=counting(8))


def test_a_bad_pick_under_a_scheduler_lists_its_entries() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "2,5"}
    with pytest.raises(ValueError, match="--gpus: 2 is out of range; 2 visible \\(0: 2, 1: 5\\)"):
        plan(picks="2", env=env)
    with pytest.raises(ValueError, match="names one GPU"):
        plan("cuda:0", picks="1", env=env)


def test_n_workers_are_dealt_round_robin() -> None:
    sixteen = plan(workers=16, count=counting(8))
    assert [a.label for a in sixteen] == [str(i % 8) for i in range(16)]
    assert [a.index for a in sixteen] == list(range(16))
    assert gpus.expected_by_gpu(sixteen) == {str(i): 2 for i in range(8)}
    five = plan(workers=5, env={"CUDA_VISIBLE_DEVICES": "2,5"})
    assert [a.visible for a in five] == ["2", "5", "2", "5", "2"]
    assert gpus.expected_by_gpu(five) == {"2": 3, "5": 2}
    assert summary(plan(workers=1, count=counting(4))) == [(0, "0", "cuda", "0", 0)]
    assert [a.label for a in plan(workers=3, picks="3", count=counting(4))] == ["3", "3", "3"]


def test_a_worker_names_its_device_as_serve_labels_it() -> None:
    assert gpus.device_label("cpu", None, {}) == "cpu"
    assert gpus.device_label("cuda", None, {"CUDA_VISIBLE_DEVICES": "GPU-aaa"}) == "GPU-aaa"  # a pinned worker
    assert gpus.device_label("cuda", 1, {"CUDA_VISIBLE_DEVICES": "2,5"}) == "5"  # in serve's process: cuda:1
    assert gpus.device_label("cuda", 3, {}) == "3"


# --- what the supervisor starts -------------------------------------------------------------------


class FakeProcess:
    """What WorkerSupervisor needs of a Popen: no process behind it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.returncode = -sig

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode

    kill = send_signal


def test_the_supervisor_pins_each_worker_and_passes_serves_flags(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaa,GPU-bbb,GPU-ccc")
    monkeypatch.setenv("JANUS_QUEUE_PASSWORD", "s3cret")
    args = cli.build_parser().parse_args([
        "serve", "--model", "/m", "--device", "cuda", "--gpus", "0,2", "--workers", "3", "--metrics-port", "9200",
        "--kv-cache-memory", "6GiB", "--max-batch-size", "7", "--compile", "--quantization", "int8",
        "--chat-format", "janus", "--vae", "/vae", "--dtype", "bfloat16", "--gpu-memory-utilization", "0.8",
        "--no-log-json", "--queue", "redis://h:6379/0"])
    settings = cli.settings_from(args)
    assignments = gpus.plan_workers(settings.device, settings.workers, settings.gpus)
    started: list[tuple[list[str], dict[str, str]]] = []

    def record(command: list[str], env: dict[str, str]) -> FakeProcess:
        started.append((command, env))
        return FakeProcess(1000 + len(started))

    pool = sup.WorkerSupervisor(settings, spawn=record, assignments=assignments)
    pool.start()
    assert pool.expected == 3 and pool.expected_by_gpu() == {"GPU-aaa": 2, "GPU-ccc": 1}
    assert len(pool.worker_ids()) == 3
    for i, (command, env) in enumerate(started):
        assert command[-5:] == ["worker", "--model", "/m", "--device", "cuda"]
        assert "s3cret" not in " ".join(command) and "redis://" not in " ".join(command)
        assert env["CUDA_VISIBLE_DEVICES"] == ["GPU-aaa", "GPU-ccc", "GPU-aaa"][i]
        assert env["JANUS_METRICS_PORT"] == str(9200 + i)
        assert env["JANUS_DEVICE"] == "cuda"
        assert env["JANUS_QUEUE"] == "redis://h:6379/0" and env["JANUS_QUEUE_PASSWORD"] == "s3cret"
        assert {k: env[k] for k in ("JANUS_KV_CACHE_MEMORY", "JANUS_MAX_BATCH_SIZE", "JANUS_COMPILE",
                                    "JANUS_QUANTIZATION", "JANUS_CHAT_FORMAT", "JANUS_VAE", "JANUS_DTYPE",
                                    "JANUS_GPU_MEMORY_UTILIZATION", "JANUS_LOG_JSON")} == {
            "JANUS_KV_CACHE_MEMORY": "6GiB", "JANUS_MAX_BATCH_SIZE": "7", "JANUS_COMPILE": "true",
            "JANUS_QUANTIZATION": "int8", "JANUS_CHAT_FORMAT": "janus", "JANUS_VAE": "/vae",
            "JANUS_DTYPE": "bfloat16", "JANUS_GPU_MEMORY_UTILIZATION": "0.8", "JANUS_LOG_JSON": "false"}
        assert "JANUS_GPUS" not in env and "JANUS_WORKERS" not in env
        assert env["JANUS_SUPERVISOR_PID"] == str(os.getpid())  # the worker follows serve (follow_parent)
    # the frontend's keys and serve's own topology stay behind, even when they came from the environment
    inherited = {"JANUS_API_KEY": "client-key", "JANUS_GPUS": "0", "JANUS_WORKERS": "3", "JANUS_REDIS_SERVER": "/r"}
    assert not set(inherited) & set(sup.worker_env(settings, assignments[0], base=inherited))
    # a setting serve has no value for is unset in the worker, whatever serve's environment said
    assert "JANUS_MAX_CONTEXT" not in sup.worker_env(settings, assignments[0], base={"JANUS_MAX_CONTEXT": "99"})
    # a worker started with this environment reads back the settings serve had
    for key, value in started[0][1].items():
        if key.startswith("JANUS_"):
            monkeypatch.setenv(key, value)
    seen = Settings()
    assert (seen.kv_cache_memory, seen.max_batch_size, seen.compile, seen.quantization, seen.chat_format,
            seen.device, seen.metrics_port, seen.max_context) == ("6GiB", 7, True, "int8", "janus", "cuda", 9200, None)
    pool.stop(timeout=1)


def test_cpu_workers_get_no_device_pinning(monkeypatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    settings = Settings(model="/m", device="cpu", workers=2)
    envs = [sup.worker_env(settings, a, base={}) for a in gpus.plan_workers("cpu", 2, [], {}, no_count)]
    assert [(e.get("CUDA_VISIBLE_DEVICES"), e["JANUS_DEVICE"], e["JANUS_METRICS_PORT"]) for e in envs] == [
        (None, "cpu", "9100"), (None, "cpu", "9101")]


def test_workers_default_to_none_and_stay_positive() -> None:
    assert Settings().workers is None
    with pytest.raises(ValueError, match="at least 1"):
        Settings(workers=0)


# --- /ready per GPU -------------------------------------------------------------------------------


def test_ready_body_keeps_its_shape_and_adds_per_gpu_counts() -> None:
    assert ReadyState(True, "ready", 2, 2).body() == {"status": "ready", "workers": {"live": 2, "expected": 2}}
    body = ReadyState(True, "ready", 1, 2, {"0": 1, "1": 0}).body()
    assert body == {"status": "degraded", "workers": {"live": 1, "expected": 2, "by_gpu": {"0": 1, "1": 0}}}


async def test_ready_counts_live_workers_by_the_gpu_their_heartbeat_names() -> None:
    queue = MemoryQueue()
    expected = {"GPU-aaa": 2, "GPU-bbb": 1}
    state = await ready_state(queue, 15.0, 3, None, expected)
    assert not state.ready and state.by_gpu == {"GPU-aaa": 0, "GPU-bbb": 0}
    await queue.heartbeat("h-1", {"gpu": "GPU-aaa"})
    await queue.heartbeat("h-2", {"gpu": "GPU-aaa"})
    await queue.heartbeat("h-3", {"gpu": "GPU-bbb"})
    state = await ready_state(queue, 15.0, 3, lambda: {"h-1", "h-3"}, expected)  # h-2 was killed
    assert state.body() == {"status": "degraded",
                            "workers": {"live": 2, "expected": 3, "by_gpu": {"GPU-aaa": 1, "GPU-bbb": 1}}}
    state = await ready_state(queue, 15.0, 3, None, expected)
    assert state.body()["workers"]["by_gpu"] == {"GPU-aaa": 2, "GPU-bbb": 1}
    assert (await ready_state(queue, 15.0)).by_gpu is None  # `api`: workers elsewhere, no plan
