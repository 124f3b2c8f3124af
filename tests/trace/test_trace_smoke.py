"""The digits trace fixture opens and holds what the methods need."""

import numpy as np

from lightning_tda import Trace


def test_digits_trace_has_segments_steps_and_checkpoints(digits_run):
    trace = Trace.open(digits_run["path"])
    steps = trace.steps()
    assert len(steps) == trace.num_steps == 8 * 23
    np.testing.assert_array_equal(steps.step, np.arange(1, len(steps) + 1))
    assert [s.index for s in trace.segments] == [0, 1, 2]
    assert trace.segments[0].start_step == 0 and trace.segments[-1].end_step == len(steps)
    for left, right in zip(trace.segments[:-1], trace.segments[1:]):
        assert left.end_step == right.start_step
    assert all(len(s.checkpoints) == 2 for s in trace.segments)
    model = digits_run["model_factory"]()
    trace.load_checkpoint(model, trace.final_checkpoint.index)
    for (name, p), q in zip(model.state_dict().items(), digits_run["final_model"].state_dict().values()):
        assert (p == q).all(), name
