"""benchmarks.machine_limit: concurrent plain-Keras trainers, and a clear failure when one fails."""

import pytest

from benchmarks.machine_limit import samples_per_second


@pytest.mark.slow
def test_two_processes_train_concurrently_and_report_their_rate_cpu_and_fit_fixed_cost():
    limit = samples_per_second(batch_size=32, processes=2, threads=1, steps_per_execution=64, repeats=1)
    assert len(limit.rates) == 1 and limit.rates[0] > 0
    assert 0.2 < limit.cpu_per_second < 1.5  # one thread each, busy training
    # A fit call costs more than its one batch, and far less than the 20,000 images' fit.
    assert 0 < limit.fit_fixed_seconds < 20_000 / limit.rates[0]


@pytest.mark.slow
def test_a_failing_process_fails_the_measurement_instead_of_leaving_it_waiting():
    # A batch size of 0 makes each process' tf.data pipeline fail before training.
    with pytest.raises(RuntimeError, match="machine-limit process failed"):
        samples_per_second(batch_size=0, processes=2, threads=1, steps_per_execution=64, repeats=1)
