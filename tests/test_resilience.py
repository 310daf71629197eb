"""Scale and resilience: parallel and cluster launchers, resume after a kill, failures that don't
sink a sweep, determinism, and bad input tried field by field."""

import os
import signal
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir

from helpers import REPO, SMOKE, job_config, run_py
from tokenprune import results
from tokenprune.errors import UserError
from tokenprune.checks import check_config
from tokenprune.runner import run_job


@pytest.mark.slow
def test_a_failing_job_does_not_sink_the_sweep(tmp_path):
    out = run_py(tmp_path, "-m", "method=topk", "task=sst2", "speedup=1.5,1000")
    assert out.returncode != 0, "a sweep with a failed job exits non-zero"
    assert "1 of 2 jobs failed" in out.stdout + out.stderr
    df = results.load(tmp_path / "sweep").set_index("speedup_target")
    assert df.loc[1.5, "status"] == "ok"
    assert df.loc[1000.0, "status"] == "failed" and "cannot reach speedup=1000" in df.loc[1000.0, "error"]


@pytest.mark.slow
def test_a_nan_loss_stops_the_job_with_a_clear_error(tmp_path):
    record = run_job(job_config(tmp_path, "train.lr=1e30", "task=rte"), tmp_path / "job")
    assert record["status"] == "failed"
    assert "loss became" in record["error"] and "learning rate" in record["error"]
    assert not list((tmp_path / "cache").glob("finetune/*/key.json")), "no cache entry from a diverged run"


@pytest.mark.slow
def test_sweep_killed_half_way_resumes_only_unfinished_jobs(tmp_path):
    args = ["-m", "method=bert", "task=wnli,mrpc,stsb"]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "run.py", "-m", *SMOKE, f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", *args[1:]]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "sweep").glob("*/result.json")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p: p.read_text() for p in (tmp_path / "sweep").glob("*/result.json")}
    assert 1 <= len(done_before) < 3, "killed half way"

    rerun = run_py(tmp_path, *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (rerun.stdout + rerun.stderr).count("already done") == len(done_before)
    for path, text in done_before.items():
        assert path.read_text() == text, "finished records are left as they were"
    df = results.load(tmp_path / "sweep")
    assert len(df) == 3 and (df.status == "ok").all()


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel(tmp_path):
    out = run_py(tmp_path, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=bert", "task=wnli,mrpc")
    assert out.returncode == 0, out.stderr[-3000:]
    df = results.load(tmp_path / "sweep")
    assert sorted(df.task) == ["mrpc", "wnli"] and (df.status == "ok").all()
    assert all(h["torch_threads"] == max(1, (os.cpu_count() or 1) // 2) for h in df.hardware)


@pytest.mark.slow
def test_submitit_local_runs_a_smoke_sweep(tmp_path):
    out = run_py(tmp_path, "-m", "hydra/launcher=submitit_local", "method=bert", "task=wnli,mrpc")
    assert out.returncode == 0, out.stderr[-3000:]
    df = results.load(tmp_path / "sweep")
    assert sorted(df.task) == ["mrpc", "wnli"] and (df.status == "ok").all()


def test_slurm_preset_composes_and_is_overridable():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                           "hydra.launcher.timeout_min=30"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min, launcher.gpus_per_node, launcher.array_parallelism) == ("gpu", 30, 1, 32)


@pytest.mark.slow
def test_same_config_and_seed_give_the_same_numbers(tmp_path):
    a = run_job(job_config(tmp_path / "a", "method=topk", "task=mrpc", "speedup=2", "resume=false"), tmp_path / "a" / "job")
    b = run_job(job_config(tmp_path / "b", "method=topk", "task=mrpc", "speedup=2", "resume=false"), tmp_path / "b" / "job")
    assert a["status"] == b["status"] == "ok"
    assert a["metric"] == b["metric"] and a["tokens_per_layer"] == b["tokens_per_layer"]
    assert a["flops_per_example"] == b["flops_per_example"]
    assert "gpu" in a["method_info"]["determinism"]


# Every field a user types, with a wrong value: one sentence, before any work.
BAD = [
    ("speedup=fast", "not a number"),
    ("speedup=0.5", "below 1"),
    ("seed=one", "seed="),
    ("data.source=ftp", "local or hub"),
    ("budget.max_train=0", "budget.max_train"),
    ("budget.max_dev=-5", "budget.max_dev"),
    ("budget.epochs=0", "budget.epochs"),
    ("train.lr=-1", "train.lr"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio"),
    ("measure.flops_mode=macs", "measure.flops_mode"),
    ("measure.timing=maybe", "measure.timing"),
    ("measure.n_latency=0", "measure.n_latency"),
    ("threads=0", "threads"),
    ("resume=perhaps", "resume"),
    ("logger=wandb logger.mode=sometimes", "logger.mode"),
]


@pytest.mark.parametrize("override, message", BAD, ids=[b[0] for b in BAD])
def test_bad_config_values_get_one_sentence(tmp_path, override, message):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=override.split())
    with pytest.raises(UserError, match=message) as e:
        check_config(cfg)
    assert "\n" not in str(e.value) and str(e.value).endswith(".")


@pytest.mark.parametrize("override, message", [
    ("device=tpu", "device=tpu"),
    ("method.layer=9", "method.layer=9"),
    ("budget.max_calib=1 budget.max_train=1 budget.max_dev=1", None),
])
def test_bad_values_found_at_run_time_leave_a_whole_failed_record(tmp_path, override, message):
    overrides = ["method=topk", "task=wnli", "speedup=2", *override.split()]
    record = run_job(job_config(tmp_path, *overrides), tmp_path / "job")
    assert results.read(tmp_path / "job" / "result.json")["status"] == record["status"]
    if message is None:  # tiny budgets are allowed: the job runs
        assert record["status"] in ("ok", "failed")
        return
    assert record["status"] == "failed" and message in record["error"] and record["traceback"] is None


def test_malformed_task_file_names_file_and_line(tmp_path):
    bad = tmp_path / "data" / "WNLI"
    bad.mkdir(parents=True)
    good = (REPO.parent / "shared" / "data" / "WNLI" / "train.tsv").read_text().splitlines()
    (bad / "train.tsv").write_text("\n".join(good[:5] + ["7\tonly two fields"] + good[5:20]) + "\n")
    (bad / "dev.tsv").write_text("\n".join(good[:10]) + "\n")
    record = run_job(job_config(tmp_path, "task=wnli", f"data.root={tmp_path / 'data'}"), tmp_path / "job")
    assert record["status"] == "failed" and "train.tsv" in record["error"] and "line 6" in record["error"]


def test_a_split_left_empty_gets_one_sentence(tmp_path):
    data = tmp_path / "data" / "WNLI"
    data.mkdir(parents=True)
    good = (REPO.parent / "shared" / "data" / "WNLI" / "train.tsv").read_text().splitlines()
    (data / "train.tsv").write_text("\n".join(good[:200]) + "\n")
    (data / "dev.tsv").write_text(good[0] + "\n")  # a header and no rows
    record = run_job(job_config(tmp_path, "task=wnli", f"data.root={tmp_path / 'data'}"), tmp_path / "job")
    assert record["status"] == "failed" and "dev split of task wnli is empty" in record["error"]
    assert record["traceback"] is None


def test_two_uncommitted_states_of_one_commit_have_different_code_versions(tmp_path):
    from tokenprune.provenance import git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "method.py").write_text("keep = 0.5\n")
    git("add", "method.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    clean = git_commit(tmp_path)
    (tmp_path / "method.py").write_text("keep = 0.4\n")
    first = git_commit(tmp_path)
    (tmp_path / "method.py").write_text("keep = 0.3\n")
    second = git_commit(tmp_path)
    assert len(clean) == 40 and first.startswith(clean + "-dirty-") and second.startswith(clean + "-dirty-")
    assert first != second  # the record index keys on this: one state's records never serve the other
    (tmp_path / "method.py").write_text("keep = 0.4\n")
    assert git_commit(tmp_path) == first
