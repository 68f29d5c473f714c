import math

from tests.launch import run_train


def test_debug_training_runs_through_run_train_sh(tmp_path) -> None:
    run = run_train(tmp_path, "--training.steps", "3")
    assert run.returncode == 0, run.output[-3000:]
    assert "Training completed" in run.output
    assert sorted(run.losses) == [1, 2, 3]
    assert all(math.isfinite(v) and v > 0 for v in run.losses.values())


def test_fsdp_over_two_processes_trains(tmp_path) -> None:
    run = run_train(
        tmp_path, "--training.steps", "3", "--parallelism.data_parallel_shard_degree", "2", nproc=2
    )
    assert run.returncode == 0, run.output[-3000:]
    assert "dp_shard=2" in run.output
    assert sorted(run.losses) == [1, 2, 3]
