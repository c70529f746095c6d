"""The study of `kft tune`: its storage, the workers that share it, the
retry of a cut trial, the count that ends it.

A study in its own directory (SQLite, `study.db`) has one process: on
`--resume`, the trials that the killed process left RUNNING are marked
FAIL and queued again. A study on a database URL (PostgreSQL) has
workers that come and go: each beats a heartbeat while its trial runs,
and the first worker that finds a trial whose heartbeat stopped for
`GRACE_BEATS` beats fails it and queues it again (Optuna fails a stale
trial in one transaction, so exactly one worker queues it). A trial
that Ctrl-C cuts is queued again by its own process. A queued retry has
the cut trial's values and `retry_of` its number.

A worker ends when COMPLETE + PRUNED trials reach the requested number;
while trials running elsewhere would make up the count, it waits for
them (a stale one is failed, and its retry run, by the waiting worker)
rather than start a trial too many.
"""

import hashlib
import json
import os
import socket
import time
import warnings
import zlib

from kft.recipes.errors import RecipeError
from kft.recipes.loader import resolved

__all__ = ["STUDY_DB", "configure", "finished", "open_study", "queue_retry",
           "should_stop", "worker_name"]

STUDY_DB = "study.db"
# A worker on a shared database beats every `heartbeat` seconds (default
# HEARTBEAT_SECONDS); its running trial counts as cut after GRACE_BEATS
# beats missed.
HEARTBEAT_SECONDS, GRACE_BEATS = 60, 3
# How often a worker waiting for other workers' trials looks again.
POLL_SECONDS = 2


def worker_name():
    """`host:pid`: which worker ran a trial (its `worker` attribute)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _study_hash(config):
    """The resolved recipe's hash without the study's budget (`trials`,
    `timeout_minutes` may change on a resume)."""
    data = resolved(config)
    for key in ("trials", "timeout_minutes"):
        data["search"].pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# === Storage ===

def queue_retry(study, trial):
    """Queues `trial`'s values again as a new trial (`retry_of`)."""
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def _retry_stale(study, trial):
    # Called by the one worker that failed the stale trial.
    if "error" not in trial.user_attrs:
        queue_retry(study, trial)


def _storage(url, local, heartbeat):
    """Optuna's relational storage; a shared one beats a heartbeat."""
    import optuna
    import sqlalchemy

    if local:
        return optuna.storages.RDBStorage(
            url, engine_kwargs={"connect_args": {"timeout": 60}})
    if heartbeat < 1:
        raise RecipeError(f"--heartbeat must be >= 1 second. Received: {heartbeat}")
    # Workers that start together may race to create Optuna's tables on a
    # new database: the loser tries again.
    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                # Optuna marks its heartbeat experimental.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=heartbeat,
                    grace_period=GRACE_BEATS * heartbeat,
                    heartbeat_stale_trial_callback=_retry_stale)
        except ImportError as error:
            reason = error.__cause__ or error
            raise RecipeError(
                f"--storage {url!r}: no database driver for it ({reason}); "
                "for PostgreSQL: pip install 'psycopg[binary]'") from None
        except sqlalchemy.exc.ArgumentError as error:
            raise RecipeError(f"--storage {url!r} is not a database URL "
                              f"({error}); e.g. postgresql://user@host/db") from None
        except sqlalchemy.exc.SQLAlchemyError as error:
            if attempt == 2:
                raise RecipeError(f"--storage {url!r}: cannot open the database: "
                                  f"{str(error).splitlines()[0]}") from None
            time.sleep(1 + attempt)


def open_study(config, study_dir, storage_url, resume, direction,
               heartbeat=HEARTBEAT_SECONDS):
    """Creates, resumes or joins the study; checks it is this recipe's."""
    import optuna

    local = storage_url is None
    db_path = os.path.join(study_dir, STUDY_DB)
    if local:
        if os.path.exists(db_path) and not resume:
            raise RecipeError(
                f"{study_dir!r} holds a study already ({STUDY_DB}). Pass "
                "--resume to continue it, or another --output-dir.")
        if resume and not os.path.exists(db_path):
            raise RecipeError(f"--resume: {study_dir!r} holds no study "
                              f"({STUDY_DB}) to continue.")
        os.makedirs(study_dir, exist_ok=True)
        storage_url = f"sqlite:///{os.path.abspath(db_path)}"
    storage = _storage(storage_url, local, heartbeat)
    name = config.name
    try:
        existing = storage.get_study_id_from_name(name)
    except KeyError:
        existing = None
    if resume and existing is None:
        raise RecipeError(f"--resume: no study {name!r} in {storage_url!r}.")
    study = optuna.create_study(storage=storage, study_name=name,
                                direction=direction, load_if_exists=True)
    recipe_hash = _study_hash(config)
    saved = study.user_attrs.get("recipe_hash")
    if saved is None:
        study.set_user_attr("recipe_hash", recipe_hash)
    elif saved != recipe_hash:
        raise RecipeError(
            f"the study {name!r} in {storage_url!r} was started with another "
            "recipe (or search space). Continue it with the same recipe and "
            "overrides, or start another study (--output-dir, or a new name).")
    if local and resume:
        _fail_running(study, storage)
    elif not local:
        _fail_stale(study)
    return study


def _fail_running(study, storage):
    """Marks the trials a killed process left RUNNING as FAIL and queues
    them again (a study in its own directory has one process)."""
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            study_id, trial.number)
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        queue_retry(study, trial)


def _fail_stale(study):
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


# === Budget, sampler, pruner ===

def configure(study, config, n_trials, shared):
    """The study's budget (kept for a resume without `--trials`), its
    seeded TPE sampler and its pruner; returns the budget."""
    import optuna

    if n_trials is None:
        n_trials = study.user_attrs.get("n_trials", config.search.trials)
    if n_trials < 1:
        raise RecipeError(f"--trials must be >= 1. Received: {n_trials}")
    study.set_user_attr("n_trials", n_trials)
    seed = config.search.seed if config.search.seed is not None else config.seed
    # A resumed study's sampler draws on from where the trials are; workers
    # sharing a study each draw their own values.
    seed += len(study.trials)
    if shared:
        seed += zlib.crc32(worker_name().encode())
    study.sampler = optuna.samplers.TPESampler(
        seed=seed % 2**32, n_startup_trials=max(2, min(10, n_trials // 3)))
    study.pruner = _pruner(config)
    return n_trials


def _pruner(config):
    import optuna

    search = config.search
    if search.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=search.startup_trials,
            n_warmup_steps=search.min_epochs)
    if search.pruner == "hyperband":
        epochs = sum(stage.epochs for stage in config.stages)
        return optuna.pruners.HyperbandPruner(
            min_resource=min(search.min_epochs, epochs), max_resource=epochs)
    return optuna.pruners.NopPruner()


# === The count that ends a worker ===

def _count(study, *states):
    return len(study.get_trials(deepcopy=False, states=states))


def finished(study):
    """COMPLETE + PRUNED trials: what the budget counts."""
    from optuna.trial import TrialState

    return _count(study, TrialState.COMPLETE, TrialState.PRUNED)


def should_stop(study, n_trials, heartbeat=None):
    """Whether a worker stops: `n_trials` finished. While the trials that
    run elsewhere would make up the count, waits for them (looking every
    `POLL_SECONDS`; a stale one is failed and queued again, and this
    worker runs it)."""
    from optuna.trial import TrialState

    while True:
        done = finished(study)
        if done >= n_trials:
            return True
        if heartbeat is None or done + _count(study, TrialState.RUNNING) < n_trials:
            return False
        time.sleep(min(heartbeat, POLL_SECONDS))
        _fail_stale(study)
