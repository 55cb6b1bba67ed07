"""Every benchmark runs as `edgefleet bench <name> --quick --json FILE` and writes its goals. (What the
figures are is the benchmarks' business; here only that they run and say what they measured.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

COMPRESSED = ("FP32", "static INT8", "dynamic INT8", "pruned", "pruned + INT8", "distilled", "distilled + INT8")
PIPELINE_GOALS = {
    "path / tight loop, FP32, same core", "path / tight loop, INT8, same core",
    "p50 latency added by the path at half load (FP32), from the frame on the wire",
    "scene cache: frames per model run, static cameras on scenes the model recognises",
    "scene cache: cached answers agreeing with the model, top-1, the lower of the static streams",
    "changing frames: throughput cache on / cache off",
}
COMPRESSION_GOALS = {
    "static INT8 latency at batch 1 / FP32", "static INT8 top-1 agreement with FP32", "static INT8 file size / FP32",
    "pruned model on the Pareto front (alone or + INT8)", "distilled model on the Pareto front (alone or + INT8)",
}


@pytest.mark.parametrize("name", ["pipeline", "compression", "ep", "swap", "telemetry", "overload", "wasm"])
def test_bench_quick_writes_its_goals(name, model_dir, tmp_path):
    out = tmp_path / f"{name}.json"
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet", "bench", name, "--quick", "--json", str(out),
         # The containerised scale-out needs the built images: tests/test_bench.py's last test runs it.
         *(["--model-dir", str(model_dir)] if name != "telemetry" else ["--no-containers"])],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    document = json.loads(out.read_text())
    assert document["bench"] == name and document["quick"] is True and document["rows"]
    assert document["goals"]
    for goal in document["goals"]:
        assert set(goal) >= {"name", "value", "target", "unit", "met"}
        assert isinstance(goal["met"], bool) and isinstance(goal["value"], (int, float))
    assert "goals" in result.stdout
    # One closing line on standard error (the tables keep standard output): the goals met, the file written.
    (summary,) = [line for line in result.stderr.splitlines() if line.startswith(f"bench {name} (quick): ")]
    met = sum(goal["met"] for goal in document["goals"])
    assert f": {met} of {len(document['goals'])} goals met" in summary and f"; wrote {out} in " in summary
    if name == "ep":  # this machine has no GPU: CUDA and TensorRT must be reported as fallbacks
        rows = {r["requested"]: r for r in document["rows"]}
        assert rows["CUDAExecutionProvider"]["fell back"] and rows["CPUExecutionProvider"]["fell back"] is False
        assert "FALLBACK: CUDAExecutionProvider" in result.stdout and document["goals"][0]["met"]
    if name == "compression":  # --quick builds and measures every model and writes every goal, on less
        assert [r["model"] for r in document["rows"]] == list(COMPRESSED)
        assert {g["name"] for g in document["goals"]} == COMPRESSION_GOALS
        assert all(r["p50 ms"] > 0 and 0 <= r["top-1 agree"] <= 1 for r in document["rows"])
        assert document["rows"][0]["top-1 agree"] == 1.0  # the baseline every ratio is taken against
    if name == "pipeline":  # where each part ran is said; both static-camera streams are answered in full
        assert {g["name"] for g in document["goals"]} == PIPELINE_GOALS and "cores:" in result.stdout
        runs = [r["run"] for r in document["rows"]]
        assert all(any(run.startswith(f"{m} path, saturated") for run in runs) for m in ("FP32", "INT8", "cascade"))
        statics = [r for r in document["rows"] if "static cameras" in r["run"]]
        assert [("recognised scenes" in r["run"], "all 11 photos" in r["run"]) for r in statics] == [
            (True, False), (False, True)]
        for static in statics:
            assert static["answered"] == static["frames"] == static["model runs"] + static["cached"]
        # The agreement goal is the lower of the two streams' cached answers.
        agreement = next(g["value"] for g in document["goals"] if "cached answers agreeing" in g["name"])
        assert agreement == pytest.approx(min(s["cached agree"] for s in statics if s["cached"]), abs=5e-5)
    if name == "wasm":  # every goal measured; the device measured with the plugin really ran it
        assert len(document["goals"]) == 4
        service = next(r for r in document["rows"] if r["run"].startswith("the service with"))
        assert service["plugin calls"] > 0 and "0 faults" in service["note"]
    if name == "telemetry":  # what was not measured says so, in the table and in the goals
        assert any("not measured: --no-containers" in str(r["records/s"]) for r in document["rows"])
        assert [g["met"] for g in document["goals"] if "containers" in g["name"]] == [False, False]



def test_bench_cascade_quick_chooses_builds_and_times_the_cascade(model_dir, tmp_path):
    out, work = tmp_path / "cascade.json", tmp_path / "work"
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet", "bench", "cascade", "--quick", "--json", str(out),
         "--model-dir", str(model_dir), "--work", str(work)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    document = json.loads(out.read_text())
    assert document["bench"] == "cascade" and document["quick"] is True
    rows = {r["model"]: r for r in document["rows"]}
    shipped, checked = (f"cascade, batch 8, {how}" for how in ("shipped threshold",
                                                                "each half by the threshold chosen on the other"))
    assert {"FP32, batch 8", shipped, checked, "FP32, batch 1", "cascade, batch 1, shipped threshold"} <= set(rows)
    assert all(r["ms/img"] > 0 for r in rows.values())
    assert rows[shipped]["x FP32"] == pytest.approx(rows[shipped]["ms/img"] / rows["FP32, batch 8"]["ms/img"], abs=1e-3)
    assert {g["name"] for g in document["goals"]} == {
        "cascade top-1 agreement with FP32 on held-out (2-fold cross-checked)",
        "cascade mean model time / FP32 (batch 8, same run, 2-fold cross-checked thresholds)"}
    # Both goals judge each image by the threshold chosen on the other half.
    assert document["goals"][1]["value"] == pytest.approx(rows[checked]["x FP32"], abs=5e-4)
    # The cascade it timed is the folder it wrote, and its gate is the one the agreement goal reports.
    from shared.cascade import verify_folder

    manifest = verify_folder(work / "cascade")
    assert manifest.quality.value == document["goals"][0]["value"]
    assert rows[checked]["agree % cross-checked"] == pytest.approx(manifest.quality.value * 100, abs=0.01)
    assert "cross-check: chosen on the even half" in result.stdout


@pytest.mark.images
@pytest.mark.timeout(1800)  # the first run on a machine waits for the images' build (tests/image_build.py)
def test_bench_images_measures_every_image(model_dir, tmp_path):
    """`edgefleet bench images` on the built images (tests/test_containers.py builds the same set): a size
    for every image, the one on the real slim base beside the stand-in's, and the inference container's
    start-up to healthy and its idle memory (the other services' start-ups are left to the full bench)."""
    from tests.image_build import engine_available, wait_built

    if not engine_available():
        if os.environ.get("CI") == "true":
            pytest.fail("no Docker engine: scripts/engine.sh should have started one", pytrace=False)
        pytest.skip("no Docker engine here (scripts/engine.sh starts one)")
    wait_built()  # the session's one build, not a second scripts/images.sh beside it
    out = tmp_path / "images.json"
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet", "bench", "images", "--quick", "--no-build", "--services", "inference",
         "--json", str(out), "--model-dir", str(model_dir)],
        capture_output=True, text=True, timeout=1700, env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document = json.loads(out.read_text())
    rows = {r["image"]: r for r in document["rows"]}
    services = ("inference", "sync", "telemetry", "cloud-ingest", "camera", "s3-standin")
    images = {f"edgefleet/{t}:latest" for t in services} | {"python:3.11-slim", "eclipse-mosquitto:2.0"}
    assert set(rows) == images
    assert all(isinstance(rows[i]["MB"], float) and rows[i]["MB"] > 1 for i in images)
    inference = rows["edgefleet/inference:latest"]
    # On a stand-in base the real-base figure replaces the stand-in's base (130 MB) with its own layers kept.
    base = rows["python:3.11-slim"]["MB"]
    if "stand-in" in inference["base"]:
        assert inference["MB on real base"] == pytest.approx(inference["MB"] - base + 130, abs=0.2)
    assert inference["online s"] > 0 and inference["healthy s"] > 0
    assert inference["resident MiB after 3 s idle"] > 10
    assert "healthy s" not in rows["edgefleet/sync:latest"]
    goals = {g["name"] for g in document["goals"]}
    assert goals == {"inference image on the real slim base", "inference healthy after docker run"}
    leftover = subprocess.run(["docker", "ps", "-aq", "--filter", "name=efh-bench-inference-"],
                              capture_output=True, text=True).stdout
    assert leftover.strip() == "", "the bench left containers behind"
