"""Ray Train + DeepSpeed on CPU with two workers and a tiny model: ZeRO-2 and ZeRO-3 train, a
rerun resumes from the checkpoint (local or S3), a killed worker is replaced, a resumed run may have
another number of workers, bad samples are counted, and the exported model loads and stops at its
end marker."""

import os
import signal
import threading

import pytest
import torch
from conftest import ANSWER, registered_checkpoints, write_tiny_data

from agentflan_ray.config import load_config
from agentflan_ray.jobs.train import TrainConfig
from agentflan_ray.jobs.train import run as run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("train"))


def config(root, *overrides):
    return load_config(TrainConfig, None, [
        f"data={root / 'data'}", f"model={root / 'model'}", "max_seq_len=128", "global_batch=4", "micro_batch=1",
        "num_workers=2", "cpus_per_worker=0.5", "lr=0.003", "warmup_ratio=0.0", f"storage_path={root / 'ckpt'}",
        "overlong=drop", *overrides,
    ])


def answer_labels(tokenizer):
    """The prompt's ids, and the prompt + trained answer + end marker with labels on the answer only."""
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": "You answer briefly."},
                                            {"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    target = tokenizer(prompt + ANSWER + "</s>", return_tensors="pt").input_ids
    labels = target.clone()
    labels[0, : ids.shape[1]] = -100  # the answer's loss only
    return ids, target, labels


def test_zero2_trains_resumes_and_exports(ray_session, tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lines = []
    first = run_train(config(tiny_run, "zero_stage=2", "max_steps=12", "checkpoint_every=6", "run_name=z2"),
                      log=lines.append)
    assert first["data"]["skipped"] == {"no_trained_assistant_turn": 2, "longer_than_max_seq_len": 1}
    assert first["data"]["samples"] == 51 and first["data"]["rows"] == 24
    assert "skipped: {'no_trained_assistant_turn': 2, 'longer_than_max_seq_len': 1}" in lines[0]
    metrics = first["metrics"]
    assert metrics["step"] == 12 and metrics["resumed_from"] == 0 and metrics["rows_out_of_order"] == 0
    assert (metrics["epoch"], metrics["data_position"]) == (1, 24)  # 12 steps x 4 rows: two epochs of 24 rows
    assert 0 < metrics["padding_share"] < 0.2 and metrics["tokens_per_s"] > 0 and "mfu" not in metrics
    events = list((tiny_run / "ckpt" / "z2" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

    export = tiny_run / "export"
    second = run_train(config(tiny_run, "zero_stage=2", "max_steps=24", "checkpoint_every=6", "run_name=z2",
                              f"export_dir={export}"), log=lambda *_: None)
    assert second["metrics"]["resumed_from"] == 12 and second["metrics"]["step"] == 24
    assert second["metrics"]["rows_out_of_order"] == 0

    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_run / "model").eval()
    ids, target, labels = answer_labels(tokenizer)
    with torch.no_grad():
        assert model(target, labels=labels).loss < base(target, labels=labels).loss * 0.6
        out = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:])
    assert text.startswith(ANSWER) and out[0, -1].item() == tokenizer.eos_token_id, text


def test_zero3_trains_and_exports(ray_session, tiny_run):
    """The export consolidates the parameters ZeRO-3 partitioned over two ranks: every tensor of the
    model is the trained one (a tensor missing from the consolidated state would keep the base
    model's values), and the answer's loss fell."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_train(config(tiny_run, "zero_stage=3", "max_steps=4", "checkpoint_every=4", "run_name=z3",
                              f"export_dir={tiny_run / 'export3'}"), log=lambda *_: None)
    assert result["metrics"]["step"] == 4
    model = AutoModelForCausalLM.from_pretrained(tiny_run / "export3").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_run / "model").eval()
    trained, initial = model.state_dict(), base.state_dict()
    assert trained.keys() == initial.keys()
    unchanged = [name for name, tensor in trained.items() if torch.equal(tensor, initial[name])]
    assert not unchanged, unchanged
    _, target, labels = answer_labels(AutoTokenizer.from_pretrained(tiny_run / "export3"))
    with torch.no_grad():
        assert model(target, labels=labels).loss < base(target, labels=labels).loss


def live_train_workers() -> dict[str, int]:
    """{actor id: process id} of the live Ray Train workers of this test process's job, read from
    the actor table of this test's own Ray: never a process of another run on the same machine.
    (Earlier runs of this module are in the same job; their workers are no longer ALIVE.)"""
    import ray
    import ray._private.state

    job = ray.get_runtime_context().get_job_id()
    return {actor["ActorID"]: actor["Pid"] for actor in ray._private.state.actors().values()
            if actor["State"] == "ALIVE" and actor["JobID"] == job and actor["Pid"]
            and actor["ActorClassName"].rsplit(".", 1)[-1] == "RayTrainWorker"}


def kill_a_train_worker_after(storage, step: int, stop: threading.Event) -> dict:
    """Once Ray Train has registered the checkpoint of ``step``, SIGKILL one Ray Train worker
    process of this run, as the OOM killer or a lost node would."""
    killed = {}

    def watch():
        snapshot = storage / "checkpoint_manager_snapshot.json"
        while not stop.is_set():
            try:
                registered = registered_checkpoints(snapshot.read_text())
            except (OSError, ValueError):  # not written yet, or being rewritten
                registered = []
            workers = live_train_workers() if any(c["step"] >= step for c in registered) else {}
            if workers:
                actor, pid = sorted(workers.items())[0]
                os.kill(pid, signal.SIGKILL)
                killed.update(actor=actor, pid=pid)
                return
            stop.wait(0.2)

    threading.Thread(target=watch, daemon=True).start()
    return killed


def test_a_killed_worker_is_replaced_and_training_continues(ray_session, tiny_run):
    stop = threading.Event()
    killed = kill_a_train_worker_after(tiny_run / "ckpt" / "kill", 8, stop)
    try:
        result = run_train(config(tiny_run, "max_steps=30", "checkpoint_every=4", "run_name=kill", "max_failures=2"),
                           log=lambda *_: None)
    finally:
        stop.set()
    assert killed, ("no worker was killed: the run ended before its step-8 checkpoint was registered, "
                    "or this job had no live RayTrainWorker actor then")
    metrics = result["metrics"]
    assert metrics["step"] == 30 and metrics["resumed_from"] >= 8  # restarted from a registered checkpoint
    assert metrics["rows_out_of_order"] == 0


@pytest.mark.parametrize("stage, rerun", [
    (2, ["num_workers=[1, 2]", "cpus_per_worker=1.5", "elastic_resize_interval_s=5"]),  # room for one only
    (3, ["num_workers=1"]),
])
def test_resume_on_another_number_of_workers(ray_session, tiny_run, tmp_path, stage, rerun):
    """Two workers write a ZeRO checkpoint; a rerun on one worker (elastic with room for one, or
    fixed) converts it to a universal checkpoint under scratch_dir and continues with the same
    global batch."""
    name, scratch = f"run_name=resize{stage}", f"scratch_dir={tmp_path}"
    first = run_train(config(tiny_run, f"zero_stage={stage}", "max_steps=6", "checkpoint_every=6", name, scratch),
                      log=lambda *_: None)
    assert first["metrics"]["world_size"] == 2
    second = run_train(config(tiny_run, f"zero_stage={stage}", "max_steps=12", "checkpoint_every=6", name, scratch,
                              *rerun), log=lambda *_: None)
    metrics = second["metrics"]
    assert metrics["world_size"] == 1 and metrics["resumed_from"] == 6 and metrics["step"] == 12
    assert metrics["rows_out_of_order"] == 0 and metrics["data_position"] == 24
    # Six more steps from the converted weights, not six steps of a cold start (which would land at
    # about the first run's loss: same seed, same rows).
    assert metrics["loss"] < first["metrics"]["loss"] * 0.9, (first["metrics"]["loss"], metrics["loss"])
    converted = tmp_path / "agentflan-universal"
    assert converted.is_dir() and not any(converted.iterdir())  # converted here, removed once loaded


def test_checkpoints_on_s3_resume(ray_session, tiny_run, s3_bucket):
    storage = f"s3://{s3_bucket}/ckpt"
    first = run_train(config(tiny_run, "max_steps=4", "checkpoint_every=2", "run_name=s3", f"storage_path={storage}"),
                      log=lambda *_: None)
    assert first["checkpoint"].startswith(f"{s3_bucket}/ckpt/s3/checkpoint_")
    second = run_train(config(tiny_run, "max_steps=6", "checkpoint_every=2", "run_name=s3",
                              f"storage_path={storage}"), log=lambda *_: None)
    assert second["metrics"]["resumed_from"] == 4 and second["metrics"]["step"] == 6

    import boto3

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert any(k.startswith("ckpt/s3/tensorboard/events.out.tfevents.") for k in keys)
    checkpoints = {k.split("/")[2] for k in keys if k.startswith("ckpt/s3/checkpoint_2")}
    assert len(checkpoints) == 2  # keep_checkpoints
