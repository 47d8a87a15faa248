"""What the ranks tell the SLURM batch script: the preemption lead from measured saves, and
whether they saved after a stop signal."""
import json

from gptscale.train.job import LEAD_FILE, STOPPED_FILE, JobDir, preemption_lead


def test_the_lead_covers_twice_the_save_a_step_and_the_shutdown():
    assert preemption_lead(save_s=100.0, step_s=4.2) == 200 + 5 + 30
    assert preemption_lead(save_s=0.0, step_s=0.0) == 30


def test_rank_0_writes_the_lead_and_the_stop(tmp_path):
    job = JobDir(writer=True, env={"GPTSCALE_JOB_DIR": str(tmp_path)})
    for seconds in (1.0, 3.5, 2.0):
        job.step_took(seconds)
    assert job.save_took(60.0) == 120 + 4 + 30  # the slowest recent step
    assert (tmp_path / LEAD_FILE).read_text() == "154\n"
    job.stopped(40, tmp_path / "ck")
    assert json.loads((tmp_path / STOPPED_FILE).read_text()) == {"step": 40, "checkpoint": str(tmp_path / "ck")}


def test_other_ranks_and_other_launchers_write_nothing(tmp_path):
    for job in (JobDir(writer=False, env={"GPTSCALE_JOB_DIR": str(tmp_path)}), JobDir(writer=True, env={})):
        job.step_took(1.0)
        job.save_took(5.0)
        job.stopped(1, tmp_path)
    assert not list(tmp_path.iterdir())
