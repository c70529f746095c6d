"""`kft tune --storage` on a real PostgreSQL server: workers in separate
processes share one study, a worker SIGKILLed mid-trial is made up for.

The server's URL comes from `KFT_TEST_POSTGRES_URL` (e.g.
`postgresql+psycopg://kft@/kft?host=/tmp/pg`); `.ci/run` starts a
throw-away server and sets it. The trials are the toy regression task's
(about a second each), so each test takes well under a minute, most of it
the workers' start-up."""

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from test_tune import toy_task  # noqa: F401 (a fixture)

pytestmark = pytest.mark.large

SPACE = ("space: {stages.0.learning_rate: {loguniform: [1.0e-3, 0.2]}}\n"
         "  pruner: none")


@pytest.fixture
def postgres(toy_task):  # noqa: F811
    """`(url, recipe)`: the server's URL and a toy recipe whose study name
    is this test's own; the study is deleted afterwards."""
    url = os.environ.get("KFT_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("no PostgreSQL server: set KFT_TEST_POSTGRES_URL (.ci/run "
                    "starts one)")
    import optuna
    import sqlalchemy

    try:
        with sqlalchemy.create_engine(url).connect():
            pass
    except (ImportError, sqlalchemy.exc.SQLAlchemyError) as error:
        pytest.skip(f"the PostgreSQL server at KFT_TEST_POSTGRES_URL is not "
                    f"reachable: {str(error).splitlines()[0]}")
    name = f"toy_{uuid.uuid4().hex[:12]}"

    def recipe(epochs):
        path = toy_task(SPACE, epochs=epochs)
        with open(path) as f:
            text = f.read().replace("name: toy\n", f"name: {name}\n")
        with open(path, "w") as f:
            f.write(text)
        return path

    yield url, recipe
    try:
        optuna.delete_study(study_name=name, storage=url)
    except KeyError:
        pass


def _worker(recipe, url, output_dir, n_trials, log, heartbeat=60):
    command = [sys.executable, "-m", "kft.cli", "tune", recipe, "--storage", url,
               "--trials", str(n_trials), "--output-dir", str(output_dir),
               "--heartbeat", str(heartbeat), "--quiet"]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def _trials(url, recipe):
    import optuna
    import yaml

    with open(recipe) as f:
        name = yaml.safe_load(f)["name"]
    return optuna.load_study(study_name=name, storage=url).get_trials()


def _wait_for(path, processes, seconds=120):
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        assert all(p.poll() is None for p in processes), "a worker ended early"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _assert_each_trial_ran_once(trials, worker_dirs):
    """Every trial number once, every trial's run in exactly one worker's
    directory, and no two trials with the same values (unless a retry)."""
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    for trial in trials:
        runs = [d for d in worker_dirs
                if os.path.exists(d / f"trial_{trial.number:03d}")]
        assert len(runs) == 1, (trial.number, runs)
    fresh = [t.params["stages.0.learning_rate"] for t in trials
             if "retry_of" not in t.user_attrs]
    assert len(fresh) == len(set(fresh))


def test_two_workers_finish_n_trials_between_them(postgres, tmp_path):
    from optuna.trial import TrialState

    url, make_recipe = postgres
    recipe = make_recipe(epochs=4)
    dirs = [tmp_path / "worker_a", tmp_path / "worker_b"]
    with open(tmp_path / "log.txt", "w") as log:
        workers = [_worker(recipe, url, d, 4, log) for d in dirs]
        for worker in workers:
            worker.wait(timeout=240)
    log_text = (tmp_path / "log.txt").read_text()
    assert [w.returncode for w in workers] == [0, 0], log_text
    trials = _trials(url, recipe)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    _assert_each_trial_ran_once(trials, dirs)
    # Both worked, at the same time: each ran trials, and each trial names
    # the worker that ran it.
    names = {t.user_attrs["worker"] for t in trials}
    assert len(names) == 2, names
    for directory in dirs:
        with open(directory / "trials.csv") as f:
            assert len(f.read().strip().splitlines()) == 1 + 4


def test_a_postgresql_study_killed_mid_trial_resumes_to_the_count(
        postgres, tmp_path):
    from optuna.trial import TrialState

    from kft.cli import main

    url, make_recipe = postgres
    recipe = make_recipe(epochs=6)
    study_dir = tmp_path / "study"
    with open(tmp_path / "log.txt", "w") as log:
        worker = _worker(recipe, url, study_dir, 4, log, heartbeat=1)
        _wait_for(study_dir / "trial_001" / "config.yaml", [worker])
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    first_written = os.path.getmtime(study_dir / "trial_000" / "metrics.json")
    cut = _trials(url, recipe)[1]
    assert cut.state == TrialState.RUNNING  # what a kill leaves
    # Three beats missed make the trial stale; the resumed worker fails it
    # and runs it again.
    time.sleep(4)
    assert main(["tune", recipe, "--storage", url, "--resume", "--heartbeat", "1",
                 "--output-dir", str(study_dir), "--quiet"]) == 0
    trials = _trials(url, recipe)
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 4
    assert trials[1].state == TrialState.FAIL
    assert "error" not in trials[1].user_attrs
    retries = [t for t in trials if t.user_attrs.get("retry_of") == 1]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == cut.params
    assert trials[0].state == TrialState.COMPLETE
    assert os.path.getmtime(study_dir / "trial_000" / "metrics.json") == first_written
    _assert_each_trial_ran_once(trials, [study_dir])


def test_a_worker_killed_mid_trial_is_made_up_for_by_the_other(postgres, tmp_path):
    from optuna.trial import TrialState

    url, make_recipe = postgres
    recipe = make_recipe(epochs=4)
    dirs = [tmp_path / "worker_a", tmp_path / "worker_b"]
    with open(tmp_path / "log.txt", "w") as log:
        killed, survivor = [_worker(recipe, url, d, 4, log, heartbeat=2)
                            for d in dirs]
        deadline = time.monotonic() + 120
        while not list(dirs[0].glob("trial_*/config.yaml")):
            assert survivor.poll() is None and killed.poll() is None
            assert time.monotonic() < deadline, "worker a never started a trial"
            time.sleep(0.02)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        survivor.wait(timeout=240)
    assert survivor.returncode == 0, (tmp_path / "log.txt").read_text()
    trials = _trials(url, recipe)
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 4
    cut = [t for t in trials if t.state != TrialState.COMPLETE]
    assert len(cut) == 1 and cut[0].state == TrialState.FAIL
    retries = [t for t in trials if t.user_attrs.get("retry_of") == cut[0].number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == cut[0].params
    assert retries[0].user_attrs["worker"] != cut[0].user_attrs["worker"]
    _assert_each_trial_ran_once(trials, dirs)
