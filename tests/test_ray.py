"""read --ray: parts on Ray actors (a local Ray here) give the files a serial run gives, failed parts retried."""
import os

import numpy as np
import pytest
import soundfile

ray = pytest.importorskip("ray")

from tortoise_ggml import read as rd  # noqa: E402

TEXT = "The tortoise woke up. | It walked to the river. | There it drank. | Then it slept."
TINY = ["--preset", "ultra_fast", "--num-autoregressive-samples", "1", "--diffusion-iterations", "2",
        "--max-mel-tokens", "10", "--threads", "1", "--seed", "11", "-q"]


def _files(folder):
    return {f: soundfile.read(str(folder / f), dtype="float32")[0] for f in sorted(os.listdir(folder))
            if f.endswith(".wav")}


def test_ray_read_matches_serial_and_retries(small_gguf, tmp_path, monkeypatch, caplog):
    args = ["--model", str(small_gguf), "--text", TEXT, *TINY]
    assert rd.main(args + ["--output_path", str(tmp_path / "serial")]) == 0
    serial = _files(tmp_path / "serial" / "random")
    assert len(serial) == 5

    # kill the worker that got part 1, the first time: the part must be retried on a new worker
    killed = []
    real_run_ray = rd.run_ray

    def on_dispatch(job, actor):
        if job.index == 1 and not killed:
            killed.append(job.index)
            ray.kill(actor, no_restart=True)

    def run_ray(*a, **kw):
        kw["on_dispatch"] = on_dispatch
        return real_run_ray(*a, **kw)

    monkeypatch.setattr(rd, "run_ray", run_ray)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "ray"
        # 2 workers: ray.init above is reused (with --ray local and no Ray running, read starts one itself)
        assert rd.main(args + ["--output_path", str(out), "--ray", "local", "--ray-workers", "2"]) == 0
        assert killed == [1]
        assert any("part 1 of voice 'random' failed" in r.getMessage() and "retrying" in r.getMessage()
                   for r in caplog.records)
        got = _files(out / "random")
        assert sorted(got) == sorted(serial)
        for name in serial:
            np.testing.assert_array_equal(got[name], serial[name], err_msg=name)
        # finished parts are never redone: a second run has nothing to send
        stamps = {f: os.stat(out / "random" / f).st_mtime_ns for f in got if f != "combined.wav"}
        assert rd.main(args + ["--output_path", str(out), "--ray", "local"]) == 0
        assert {f: os.stat(out / "random" / f).st_mtime_ns for f in stamps} == stamps
        # a worker that cannot load the model (not on that node): one clear error once the retries are spent
        job = rd.Job("random", 0, "Hi.", 1, str(tmp_path / "x.wav"))
        with pytest.raises(rd.ReadError, match=r"part 0 of voice 'random' failed once; .*no model file"):
            real_run_ray([job], {"random": rd.VoiceData("random")}, rd.Settings(), lambda *a: None, "local",
                         str(tmp_path / "missing.gguf"), threads=1, workers=1, retries=0)
    finally:
        ray.shutdown()
