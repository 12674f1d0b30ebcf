"""JanusFlow parameters on queued jobs: steps, and the parameters left unset, survive a queue's round trip."""

from __future__ import annotations


def test_generation_jobs_carry_steps_and_unset_parameters_through_a_queue():
    from server.jobs import GenerateParams, Job

    job = Job("generate", GenerateParams("a cat", n=2, seed=3, steps=12))
    back = Job.from_dict(job.to_dict())
    assert back.params == GenerateParams("a cat", n=2, seed=3, steps=12)
    assert (back.params.cfg_weight, back.params.temperature, back.params.top_p) == (None, None, None)
