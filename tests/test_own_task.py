"""A user's own task with only the README's steps: its YAML (taken from the README) in a config folder
outside the project, its CSV in a data folder outside the project, the README's commands."""

from __future__ import annotations

import csv
import re
import shlex

import pytest

from helpers import REPO, run_py
from tokenprune import results

README = (REPO / "README.md").read_text()


def readme_task_yaml() -> str:
    return re.search(r"```yaml\n(# myconf/task/reviews\.yaml\n.*?)```", README, re.S).group(1)


def readme_commands() -> list[list[str]]:
    """The README's single-job commands for the task, as arguments after `python run.py`."""
    lines = re.findall(r"^python run\.py (\"hydra\.searchpath=.*task=reviews.*)$", README, re.M)
    return [shlex.split(line) for line in lines if " -m " not in f" {line} "]


@pytest.mark.slow
def test_a_csv_task_declared_outside_the_project_runs_bert_and_topk(tmp_path):
    data, conf = tmp_path / "data" / "reviews", tmp_path / "myconf"
    data.mkdir(parents=True)
    (conf / "task").mkdir(parents=True)
    (conf / "task" / "reviews.yaml").write_text(readme_task_yaml().replace("dir: /data/reviews", f"dir: {data}"))
    with open(data / "reviews.csv", "w", newline="") as f:
        rows = [(f"A warm, clever film, take {i}.", "positive") if i % 2 else (f"Dull and\nlifeless, take {i}.", "negative")
                for i in range(300)]
        csv.writer(f).writerows([("review", "sentiment"), *rows])

    commands = readme_commands()
    assert [c[1:] for c in commands] == [["task=reviews", "method=bert"], ["task=reviews", "method=topk", "speedup=2"]]
    for command in commands:
        args = [a.replace("$HOME/myconf", str(conf)) for a in command]
        out = run_py(tmp_path, *args)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        record = results.read(tmp_path / "run" / "result.json")
        assert record["status"] == "ok" and record["task"] == "reviews", record["error"]
        assert record["n_eval"] == 30, "dev is 10% of the 300 rows, cut out of train"
        assert f"Result: reviews · {record['method']} · target" in out.stdout
    assert record["method"] == "topk" and record["flops_speedup"] == pytest.approx(2.0, rel=0.15)
