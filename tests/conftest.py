"""Shared fixtures: a tiny random Llama with a real BPE tokenizer and ChatML template (no downloads), and an isolated
Prefect + MLflow setup per test session."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

# Set before Prefect is imported anywhere: every test session gets its own Prefect home, API database and result
# storage, the ephemeral API server, quiet logs, no hub access, and MLflow stores under each test's artifacts.
_HOME = Path(tempfile.mkdtemp(prefix="desctune-prefect-"))
# Registered before Prefect is imported, so it runs after Prefect's own exit handlers have stopped its server.
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ.update(
    {
        "PREFECT_HOME": str(_HOME),
        "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{_HOME}/prefect.db",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(_HOME / "storage"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        # The ephemeral API server gets 20 s to start by default: not always enough on 2 busy cores.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # One torch thread in this process and every process it starts: two cores are shared by the tests and the
        # work begun ahead of them (AHEAD), and torch's OpenMP threads spin while they wait, so two processes with
        # two threads each take several times the CPU of one thread each; the tests' models are too small to gain
        # from a second thread on a quiet machine either (figures in docs/LOG.md).
        "OMP_NUM_THREADS": "1",
    }
)
for _var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
    os.environ.pop(_var, None)
# The environment as the session starts, before any test changes it: processes started in a thread while a test
# runs (see AHEAD) start from this, not from whatever that test set meanwhile.
SESSION_ENV = dict(os.environ)

# Prefect sets up logging once, when prefect.main is first imported, and its dictConfig closes the handlers already
# there. rouge-score's absl handler holds the sys.stderr of the moment it was imported: inside a test, pytest's
# capture of that test, which it would close and so break every later test. Set Prefect's logging up first. Where
# Prefect is not installed (the GPU machine runs tests/test_cuda.py on the core library alone) there is none to set.
try:
    import prefect.main  # noqa: E402,F401
except ModuleNotFoundError:
    pass

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "amazon_titles_sample.jsonl"
EVAL_DATA = ROOT / "data" / "amazon_titles_eval.jsonl"
ABT_DATA = ROOT / "data" / "abt_electronics.jsonl"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_model(out: Path, vocab_size: int = 600, seed: int = 0) -> Path:
    """Train a small byte-level BPE on the shipped sample and save it with a random 2-layer Llama."""
    import json

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = []
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        texts += [rec["title"], rec["content"]]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from desctune.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def embedded_base() -> dict:
    """The embedded SmolLM2 checkpoint, converted once into the project's own artifacts/models cache."""
    from desctune.models import provision

    return provision("smollm2-135m-instruct", ROOT / "artifacts")


# The test tiers (pyproject.toml registers the markers; `make check` deselects all three). A test is marked by the
# fixtures it uses, or here by name where what it starts is inside the test itself.
MARKED_BY_FIXTURE = {
    "embedded_base": "slow",  # the embedded SmolLM2 model
    "browser": "browser",  # headless Chromium
    "sqlite_stack": "integration",  # `desctune serve` (test_servers, test_ui_browser)
    "served": "integration",  # `desctune serve` (test_servers, test_serve_auth)
    "prefect_server": "integration",  # a Prefect server process (test_pools, test_deploy_schedules)
    "demo_server": "integration",  # `desctune demo` (test_demo_browser)
    "s3_server": "integration",  # moto's S3 server (test_object_store)
    "secret_runs_started": "integration",  # a PostgreSQL role and database, three runs (test_secrets)
    "two_runs": "integration",  # the whole finetune flow, three times (test_flow)
    "registered": "integration",  # the whole finetune flow (test_demo)
    "registry": "slow",  # four versions registered, each logged with its code (test_register)
    "runs": "integration",  # one training in one process and in two under torchrun (test_distributed)
    "local_run": "integration",  # `desctune run` in a process of its own (test_cli, test_local_ui)
}
MARKED_BY_NAME = {
    "test_distributed.py::test_kill_9_of_a_rank_fails_the_task": "integration",  # torchrun under a flow
    # whole commands in processes of their own, each with a Prefect server or a flow
    "test_prepare.py::test_early_server_is_the_one_prefect_uses_and_is_stopped": "integration",
    "test_prepare.py::test_cli_process_prepares_a_file": "integration",
    "test_prepare.py::test_a_temporary_server_that_does_not_come_up": "integration",
    "test_bench_ingest.py::test_data_stage_benchmark_reports_each_way_of_running": "integration",
    "test_bench_gpu.py::test_gpu_check_script_runs_in_one_go": "integration",
    "test_bench_gpu.py::test_the_cuda_tests_collect_where_prefect_and_mlflow_are_not_installed": "integration",
    "test_standalone.py::test_the_data_tests_pass_in_a_copy_with_nothing_beside_it": "integration",
    "test_resume.py::test_kill_9_after_a_checkpoint_then_rerun_resumes": "integration",
    "test_export.py::test_mlflow_models_serve_answers": "integration",  # `mlflow models serve`
    "test_registration_lock.py::": "integration",  # a Prefect server and two processes racing on it
    "test_server_lifetime.py::": "integration",  # `desctune run` killed with its temporary Prefect server
    # the whole finetune flow, or a flow of evaluations
    "test_cli.py::test_run_prints_the_summary": "integration",
    "test_register.py::test_guarded_flow_run_registers_nothing": "integration",
    "test_register.py::test_evaluate_champion_flow_logs_its_own_run": "integration",
    # tens of seconds each on 2 cores: trainings of many steps, several versions registered, exports and their checks
    "test_train.py::test_overfits_a_handful_of_records": "slow",
    "test_train.py::test_the_same_training_twice_writes_the_same_adapter_bytes": "slow",
    "test_train.py::test_streams_loss_lr_speed_and_memory_to_mlflow": "slow",
    "test_cuda.py::test_a_resumed_run_equals_an_uninterrupted_one[cpu]": "slow",
    "test_cuda.py::test_compiled_layers_keep_their_names": "slow",
    "test_bench_gpu.py::test_smoke_run_on_cpu_trains": "slow",
    "test_resume.py::test_a_tampered_checkpoint_is_refused": "slow",
    "test_register.py::test_a_challenger_better_on_average": "slow",
    "test_register.py::test_the_same_adapter_and_evaluation_name_the_existing_version": "slow",
    "test_register.py::test_min_improvement_raises_the_bar": "slow",
    "test_register.py::test_two_different_runs_racing_to_register": "slow",
    "test_register.py::test_a_first_version_not_significantly_better": "slow",
    "test_export.py::test_export_errors_are_one_line": "slow",
    "test_export.py::test_hf_export_loads_without_peft": "slow",
    "test_export.py::test_gguf_exports_load_back": "slow",
    "test_export.py::test_register_attaches_the_export": "slow",
    "test_export.py::test_registered_model_carries_its_code": "slow",
    "test_export.py::test_files_written_into_the_output_folder": "slow",
    "test_export.py::test_an_output_folder_that_cannot_be_created": "slow",
    "test_layers.py::test_the_core_and_the_registered_model_load_without_prefect": "slow",
    "test_layers.py::test_registered_model_decodes_with_the_runs_eval_settings": "slow",
    "test_modelref.py::test_a_cached_version_from_a_deleted_store": "slow",
}


# Stops the session's `sqlite_stack`, so it runs after every other test.
STOPS_SERVE_STACK = "test_servers.py::test_ctrl_c_stops_every_process_it_started[sqlite]"


def pytest_itemcollected(item):
    """Mark each test as it is collected, before -m selects by the marks."""
    marks = {MARKED_BY_FIXTURE[f] for f in item.fixturenames if f in MARKED_BY_FIXTURE}
    name = f"{item.path.name}::{item.name}"
    marks |= {mark for prefix, mark in MARKED_BY_NAME.items() if name.startswith(prefix)}
    for mark in sorted(marks):
        item.add_marker(mark)


@pytest.hookimpl(trylast=True)  # after pytest's own ordering by fixture
def pytest_collection_modifyitems(config, items):
    last = [item for item in items if f"{item.path.name}::{item.name}" == STOPS_SERVE_STACK]
    items[:] = [item for item in items if item not in last] + last


# Work that tests wait on for half a minute or more (a served stack starting, a whole `desctune run`) is begun ahead
# of the tests that need it, in one background lane: the session's first test begins every `*_started` fixture the
# selected tests need, in the order of their first users, and AHEAD runs them one at a time while the tests run.
# Most tests keep one core busy and the lane the other: one job at a time, so that the tests are not crowded out. Each
# `*_started` session fixture submits its work to AHEAD and yields the future (`begun`); the fixture the tests use
# waits for its result.
AHEAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ahead")
ORDER = pytest.StashKey[list]()


def started_ahead(item) -> set[str]:
    """The `*_started` fixtures a test needs: those in its closure, and the stack its `served` parameter names
    (tests/test_servers.py requests that by name)."""
    names = {name for name in item.fixturenames if name.endswith("_started")}
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("served") in ("sqlite", "postgresql"):
        names.add(f"{callspec.params['served']}_stack_started")
    return names


def pytest_collection_finish(session):
    order: list[str] = []
    for item in session.items:
        order += sorted(started_ahead(item) - set(order))
    session.config.stash[ORDER] = order


@pytest.fixture(autouse=True)
def start_ahead(request):
    order = request.config.stash.get(ORDER, [])
    while order:
        try:
            request.getfixturevalue(order.pop(0))
        except (Exception, pytest.fail.Exception, pytest.skip.Exception):
            pass  # the fixture keeps its error and raises it again at its first user, where it belongs


def begun(work, *args, stop: bool = False):
    """The body of a `*_started` fixture: `work(*args)` submitted to AHEAD, its future yielded; at the session's end,
    its processes waited for and, with `stop`, what it started stopped (a failed start has nothing to stop: its user
    reports the error)."""
    future = AHEAD.submit(work, *args)
    yield future
    try:
        result = future.result()
    except BaseException:
        return
    if stop:
        result.stop()


@pytest.fixture(scope="session")
def sqlite_stack_started(tmp_path_factory):
    from test_servers import start_serve

    yield from begun(start_serve, tmp_path_factory.mktemp("serve-sqlite"), "sqlite", [], stop=True)


@pytest.fixture(scope="session")
def sqlite_stack(sqlite_stack_started):
    """`desctune serve` on its SQLite defaults, shared by tests/test_servers.py and tests/test_ui_browser.py; the
    former's Ctrl-C test stops it (last in the session), or the session's end does."""
    return sqlite_stack_started.result()


@pytest.fixture(scope="session")
def postgresql_stack_started(tmp_path_factory):
    from test_servers import postgres_databases, start_serve

    with postgres_databases(2) as dbs:
        yield from begun(start_serve, tmp_path_factory.mktemp("serve-postgresql"), "postgresql", dbs, stop=True)


@pytest.fixture(scope="session")
def postgresql_stack(postgresql_stack_started):
    """`desctune serve` on fresh PostgreSQL databases (dropped after), for tests/test_servers.py."""
    return postgresql_stack_started.result()


@pytest.fixture(scope="session")
def auth_stack_started(tmp_path_factory):
    from test_serve_auth import start_with_credentials
    from test_servers import postgres_databases

    with postgres_databases(1) as [db]:
        yield from begun(start_with_credentials, tmp_path_factory.mktemp("serve-auth"), db, stop=True)


@pytest.fixture(scope="session")
def prefect_server_started(tmp_path_factory):
    from test_pools import start_prefect_server

    yield from begun(start_prefect_server, tmp_path_factory.mktemp("prefect-server"), stop=True)


@pytest.fixture(scope="session")
def prefect_server(prefect_server_started) -> dict:
    """A Prefect server process on SQLite (tests/test_pools.py, tests/test_deploy_schedules.py): the environment
    that reaches it."""
    return prefect_server_started.result().env


@pytest.fixture(scope="session")
def registration_race_started(tmp_path_factory):
    from test_registration_lock import race

    yield from begun(race, tmp_path_factory.mktemp("registration-race"))


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server (tests/test_object_store.py): the AWS variables that reach it."""
    from test_object_store import start_s3

    server, env = start_s3()
    yield env
    server.stop()


@pytest.fixture(scope="session")
def store_runs_started(s3_server, tmp_path_factory, tiny_model_dir):
    from test_object_store import two_workers

    yield from begun(two_workers, tmp_path_factory.mktemp("shared-store"), s3_server, tiny_model_dir)


@pytest.fixture(scope="session")
def secret_runs_started(tmp_path_factory, tiny_model_dir):
    from test_secrets import postgres_role, run_each_way

    with postgres_role() as (uri, password):
        yield from begun(run_each_way, tmp_path_factory.mktemp("secrets"), tiny_model_dir, uri, password)


@pytest.fixture(scope="session")
def gpu_check_started(tmp_path_factory):
    from test_bench_gpu import run_gpu_check

    yield from begun(run_gpu_check, tmp_path_factory.mktemp("gpu-check"))


@pytest.fixture(scope="session")
def standalone_started(tmp_path_factory):
    from test_standalone import data_tests_alone

    yield from begun(data_tests_alone, tmp_path_factory.mktemp("standalone"))


@dataclass
class LocalRun:
    """A finished `desctune run` and where `desctune ui` is to show it."""

    profile: Path
    artifacts: Path
    args: list[str]  # the flags after `desctune run` (and `desctune ui`)
    env: dict  # the environment of both commands
    stdout: str
    prefect_port: int
    mlflow_port: int


@pytest.fixture(scope="session")
def local_run_started(tmp_path_factory, tiny_model_dir):
    yield from begun(run_locally, tmp_path_factory.mktemp("local-run"), tiny_model_dir)


@pytest.fixture(scope="session")
def local_run(local_run_started) -> LocalRun:
    """One tiny `desctune run` in a process of its own, as a user runs it: no Prefect API or database configured
    (so its temporary server records into the artifacts folder) and `desctune ui`'s ports set to free ones, which its
    links name. Shared by tests/test_cli.py (the summary) and tests/test_local_ui.py (the UIs and their links)."""
    return local_run_started.result()


def run_locally(tmp: Path, tiny_model_dir: Path) -> LocalRun:
    import subprocess
    import sys

    import yaml

    records = head_records(SAMPLE, tmp / "records.jsonl", 40)
    cfg = tiny_config(tmp, tiny_model_dir, records, data={"val_fraction": 0.15, "test_fraction": 0.15})
    profile = tmp / "tiny.yaml"
    profile.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {k: v for k, v in SESSION_ENV.items()
           if k not in ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_API_URL", "PREFECT_UI_URL",
                        "MLFLOW_TRACKING_URI")}
    ports = free_port(), free_port()
    env.update(PREFECT_HOME=str(tmp / "prefect-home"), PYTHONPATH=str(ROOT),
               DESCTUNE_UI_PREFECT_PORT=str(ports[0]), DESCTUNE_UI_MLFLOW_PORT=str(ports[1]))
    args = ["--config", str(profile), "--set", "registry.model_name=cli-tiny"]
    done = subprocess.run([sys.executable, "-m", "app.cli", "run", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=LOCAL_RUN_TIMEOUT)
    assert done.returncode == 0, f"desctune run exited {done.returncode}: {done.stderr[-3000:]}"
    return LocalRun(profile, Path(cfg.artifacts_dir), args, env, done.stdout, *ports)


LOCAL_RUN_TIMEOUT = 900  # a tiny run takes a minute on two quiet cores; a loaded machine has needed over 4


def tiny_config(tmp_path: Path, model_dir: Path, records: Path = SAMPLE, **sections):
    """A Config for the tiny model that runs the whole flow in seconds."""
    from desctune.config import Config

    data = {"path": str(records), **sections.pop("data", {})}
    cfg = {
        "artifacts_dir": str(tmp_path / "artifacts"),
        "data": data,
        "model": {"name": str(model_dir), "max_seq_len": 128, **sections.pop("model", {})},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, **sections.pop("lora", {})},
        "train": {"epochs": 1, "max_steps": 12, "batch_size": 4, "learning_rate": 5e-3, "save_steps": 5,
                  "logging_steps": 2, "num_workers": 0, **sections.pop("train", {})},
        "eval": {"limit": 6, "batch_size": 4, "max_new_tokens": 12, **sections.pop("eval", {})},
        "registry": {"model_name": "tiny-desctune", **sections.pop("registry", {})},
    }
    return Config.model_validate(cfg)


def process_family(pid: int) -> list:
    """The process `pid` and all its descendants (psutil.Process), or [] once it is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_records(src: Path, dest: Path, n: int) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]
    dest.write_text("".join(lines), encoding="utf-8")
    return dest
