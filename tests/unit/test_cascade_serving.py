"""A cascade served by the inference service in process: stage 1 is the static INT8 model, stage 2
the FP32 one, both real, on real photos, through the service's real threads over the in-memory link
(tests/unit/test_inference_pipeline.py). What each stage would answer is known first by running both
models with plain ONNX Runtime outside the service; the service must escalate exactly the frames under
the threshold, answer them as stage 2 does and the others as stage 1 does. The loader refuses a cascade
whose members are not what it pins."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
import pytest

from edgefleet.models import dataset
from edgefleet.models.cascade import assemble
from edgefleet.models.install import install, resave
from edgefleet.models.quantize import Mode, quantize
from edgefleet.photos import EVALUATION
from services.inference.decode import decode_bgr
from services.inference.preprocess import Preprocessor
from services.inference.swap import ServedModel, warm
from shared import topics
from shared.cascade import CASCADE_FILE, MAX_CASCADE_BYTES, CascadeSpec
from shared.manifest import MANIFEST_FILE, ModelError, ModelManifest, load_verified, sha256_of
from shared.schemas import ModelSwitch, ModelSwitched, Prediction
from tests.unit.test_inference_pipeline import (
    DEVICE,
    LOADER,
    MemoryLink,
    _envelope,
    _errors,
    _predictions,
    _soon,
    serving,
)

BATCH = 16
TOLERANCE = 2e-4  # scores are published to 5 decimals; a batch's kernels may differ from ours in the 7th


@pytest.fixture(scope="module")
def small_dir(model_dir, data, tmp_path_factory) -> Path:
    """Stage 1: the FP32 model quantized to static INT8 on 8 calibration frames (2 s to make). Its
    scores differ from FP32's in the third decimal, so whose answer a prediction carries can be told.
    Not dynamic INT8: its ConvInteger kernels ran a batch of 16 in 1.9 s against FP32's 0.17 s here,
    and it quantizes activations over the whole batch, so a frame's answer would depend on its batch."""
    out = tmp_path_factory.mktemp("small") / "int8"
    quantize(model_dir, out, Mode.STATIC, data / "eval", data / "calibration", calibration_limit=8, eval_limit=4,
             gate=0.0)
    return out


@pytest.fixture(scope="module")
def frames() -> list[bytes]:
    """BATCH real JPEGs: augmented crops of the evaluation photos, some easy, some hard to call."""
    crops = [jpeg for i, name in enumerate(EVALUATION) for jpeg in dataset.crops_of(name, 2, seed=100 + i)]
    return crops[:BATCH]


@dataclass(frozen=True)
class Answers:
    """One model's top-5 for each frame, from float64 softmax."""

    classes: np.ndarray  # (frames, 5)
    scores: np.ndarray  # (frames, 5)

    @property
    def margin(self) -> np.ndarray:
        return self.scores[:, 0] - self.scores[:, 1]

    @property
    def confidence(self) -> np.ndarray:
        return self.scores[:, 0]


@dataclass(frozen=True)
class Offline:
    small: Answers
    large: Answers


@pytest.fixture(scope="module")
def offline(frames, small_dir, model_dir) -> Offline:
    """Both models on every frame with plain ONNX Runtime, outside the service."""
    manifest, _ = load_verified(model_dir)
    pre, crop = Preprocessor(manifest.preprocessing), manifest.preprocessing.crop
    batch = np.empty((len(frames), 3, crop, crop), dtype=np.float32)
    for row, jpeg in zip(batch, frames, strict=True):
        pre(decode_bgr(jpeg, manifest.preprocessing.resize_shorter), row)  # as the service (scaled_decode)
    return Offline(small=_answers(small_dir, batch), large=_answers(model_dir, batch))


def _answers(folder: Path, batch: np.ndarray) -> Answers:
    manifest, path = load_verified(folder)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {manifest.input.name: batch})[0].astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    classes = np.argsort(-probs, axis=1)[:, :5]
    return Answers(classes=classes, scores=np.take_along_axis(probs, classes, axis=1))


def _threshold_between(values: np.ndarray, at_least: int = 3) -> float:
    """A threshold in the widest gap between the values, with at least `at_least` on each side: no
    frame sits near it, so the float32 rounding of a batch's kernels cannot move a frame across."""
    ordered = np.sort(values)
    split = max(range(at_least, len(ordered) - at_least + 1), key=lambda i: ordered[i] - ordered[i - 1])
    assert ordered[split] - ordered[split - 1] > 1e-3, f"no clear gap in {ordered}"
    return float(ordered[split - 1] + ordered[split]) / 2


def _cascade(small_dir: Path, large_dir: Path, out: Path, metric: Literal["margin", "confidence"] = "margin",
             threshold: float = 0.5, name: str = "lite0-cascade") -> ModelManifest:
    return assemble(small_dir, large_dir, out, name=name, version=1, metric=metric, threshold=threshold)


def _serve_batch(model: ServedModel, frames: list[bytes]) -> tuple[dict[int, Prediction], int]:
    """The frames as one batch through the service; their predictions by index, and the escalated count."""
    with serving(model, max_batch=len(frames), max_wait_ms=1000) as (service, link):
        for i, jpeg in enumerate(frames):
            link.deliver(topics.frames(DEVICE, "cam"), _envelope(f"f{i}", jpeg))
        stats = _soon(lambda: (s := service.stats()).predictions_published == len(frames) and s, "every prediction")
    predictions = {int(p.frame_id[1:]): p for _, p in _predictions(link)}
    assert {p.timings.batch_size for p in predictions.values()} == {len(frames)}, "the frames ran as one batch"
    return predictions, stats.predictions_escalated


def _agrees(prediction: Prediction, answers: Answers, i: int) -> bool:
    return (prediction.top[0].index == answers.classes[i, 0]
            and np.allclose([c.score for c in prediction.top], answers.scores[i], atol=TOLERANCE))


@pytest.mark.parametrize("metric", ["margin", "confidence"])
def test_a_cascade_escalates_exactly_the_frames_under_its_threshold_and_they_get_stage_2s_answer(
        metric: Literal["margin", "confidence"], frames, offline, small_dir, model_dir, tmp_path):
    values = getattr(offline.small, metric)
    threshold = _threshold_between(values)
    under = {int(i) for i in np.flatnonzero(values < threshold)}
    manifest = _cascade(small_dir, model_dir, tmp_path / "cascade", metric, threshold)
    model = LOADER(tmp_path / "cascade")
    warm(model)

    predictions, escalated_count = _serve_batch(model, frames)

    escalated = {i for i, p in predictions.items() if p.cascade is not None and p.cascade.stage == 2}
    assert escalated == under and 0 < len(under) < BATCH
    assert escalated_count == len(under)
    small, large = load_verified(small_dir)[0].ref(), load_verified(model_dir)[0].ref()
    for i, p in predictions.items():
        assert p.model == manifest.ref() and p.cascade is not None
        assert (p.cascade.small, p.cascade.large) == (small, large)
        assert p.cascade.score == pytest.approx(values[i], abs=TOLERANCE)
        assert _agrees(p, offline.large if i in under else offline.small, i), (i, p.top)
    # The comparison tells the stages apart: INT8's scores differ from FP32's on these frames.
    assert all(not _agrees(predictions[i], offline.small, i) for i in under)
    assert any(not _agrees(predictions[i], offline.large, i) for i in set(predictions) - under)


def test_escalated_frames_run_as_one_sub_batch_and_their_model_time_counts_both_stages(
        frames, offline, small_dir, model_dir, tmp_path):
    threshold = _threshold_between(offline.small.margin)
    _cascade(small_dir, model_dir, tmp_path / "cascade", "margin", threshold)
    model = LOADER(tmp_path / "cascade")
    warm(model)

    stage2_batches: list[int] = []
    run = model.escalation.session.run
    model.escalation.session.run = lambda batch: (stage2_batches.append(len(batch)), run(batch))[1]

    predictions, _ = _serve_batch(model, frames)

    escalated = [p for p in predictions.values() if p.cascade and p.cascade.stage == 2]
    assert stage2_batches == [len(escalated)] and len(escalated) >= 2  # one run, all of them in it
    by_stage = {stage: {p.timings.inference_ms for p in predictions.values() if p.cascade and p.cascade.stage == stage}
                for stage in (1, 2)}
    # One stage-2 run for all of them: every escalated frame names the same model time (frame by
    # frame, each would name its own run), and it adds to stage 1's.
    assert len(by_stage[1]) == 1 and len(by_stage[2]) == 1, by_stage
    assert by_stage[2].pop() > by_stage[1].pop()


@pytest.mark.parametrize("threshold, stage", [(0.0, 1), (1.0, 2)])
def test_threshold_0_escalates_no_frame_and_threshold_1_every_frame(
        threshold, stage, frames, offline, small_dir, model_dir, tmp_path):
    assert offline.small.margin.max() < 1 - 1e-6  # no frame is certain: margin 1 would stand even at 1
    _cascade(small_dir, model_dir, tmp_path / "cascade", "margin", threshold)
    model = LOADER(tmp_path / "cascade")

    predictions, escalated_count = _serve_batch(model, frames)

    assert {p.cascade.stage for p in predictions.values() if p.cascade} == {stage} and len(predictions) == BATCH
    assert escalated_count == (BATCH if stage == 2 else 0)
    answers = offline.large if stage == 2 else offline.small
    assert all(_agrees(p, answers, i) for i, p in predictions.items())


def test_a_switch_to_a_tampered_cascade_is_refused_and_the_served_cascade_keeps_answering(
        frames, small_dir, model_dir, tmp_path):
    good = _cascade(small_dir, model_dir, tmp_path / "good", "margin", 1.0)
    bad = _cascade(small_dir, model_dir, tmp_path / "bad", "margin", 1.0, name="lite0-tampered")
    _flip_a_byte(tmp_path / "bad" / "stage2" / "model.onnx")

    with serving(LOADER(tmp_path / "good")) as (service, link):
        link.deliver(topics.model_switch(DEVICE), _switch("to-bad", tmp_path / "bad", bad))
        refused = _soon(lambda: next(iter(_answers_to_switches(link)), None), "the switch's answer")
        link.deliver(topics.frames(DEVICE, "cam"), _envelope("after", frames[0]))
        after = _soon(lambda: next((p for _, p in _predictions(link) if p.frame_id == "after"), None), "a prediction")
        served = service.model

    assert not refused.ok and "stage2" in (refused.error or "") and "its manifest says" in (refused.error or "")
    assert refused.serving == good.ref() and served.ref == good.ref()
    assert after.model == good.ref() and after.cascade is not None and after.cascade.stage == 2


def _switch(request_id: str, folder: Path, manifest: ModelManifest) -> bytes:
    return ModelSwitch(request_id=request_id, model_dir=str(folder), sha256=manifest.sha256,
                       at=time.time()).model_dump_json().encode()


def _answers_to_switches(link: MemoryLink) -> list[ModelSwitched]:
    return [answer for _, answer in link.messages(topics.model_switched(DEVICE), ModelSwitched)]


# -- what the loader refuses -----------------------------------------------------------------------------


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _member_replaced(cascade: Path, small_dir: Path, model_dir: Path) -> None:
    """stage1 holds another model (valid on its own, same name and version) than the one pinned."""
    resave(small_dir, cascade / "stage1", "rebuilt: another artifact")


def _pin_rewritten(cascade: Path, small_dir: Path, model_dir: Path) -> None:
    """cascade.json pins another SHA-256 for stage2, and the cascade's manifest is remade to match it:
    the cascade document itself verifies, its member does not."""
    spec = CascadeSpec.model_validate_json((cascade / CASCADE_FILE).read_text())
    stages = [spec.stages[0], spec.stages[1].model_copy(update={"sha256": "0" * 64})]
    staged = cascade / "staged.json"
    staged.write_text(spec.model_copy(update={"stages": stages}).model_dump_json())
    manifest, _ = load_verified(cascade)
    install(staged, manifest.model_copy(update={"sha256": sha256_of(staged), "size_bytes": staged.stat().st_size}),
            cascade)


def _document_edited(cascade: Path, small_dir: Path, model_dir: Path) -> None:
    """cascade.json's threshold edited in place: its manifest no longer vouches for it."""
    document = json.loads((cascade / CASCADE_FILE).read_text())
    (cascade / CASCADE_FILE).write_text(json.dumps({**document, "threshold": 0.0}))


def _member_tampered(cascade: Path, small_dir: Path, model_dir: Path) -> None:
    _flip_a_byte(cascade / "stage2" / "model.onnx")


def _member_missing(cascade: Path, small_dir: Path, model_dir: Path) -> None:
    (cascade / "stage1" / MANIFEST_FILE).unlink()


def _labels_differ(cascade: Path, small_dir: Path, model_dir: Path) -> None:
    """The cascade's manifest names other labels than its members answer with."""
    manifest, _ = load_verified(cascade)
    relabelled = manifest.model_copy(update={"labels": ["not a class", *manifest.labels[1:]]})
    (cascade / MANIFEST_FILE).write_text(relabelled.model_dump_json())


def _document_oversized(cascade: Path, small_dir: Path, model_dir: Path) -> None:
    """cascade.json past the cap before it is parsed, its manifest remade to vouch for it."""
    staged = cascade / "staged.json"
    staged.write_text((cascade / CASCADE_FILE).read_text() + " " * MAX_CASCADE_BYTES)
    manifest, _ = load_verified(cascade)
    install(staged, manifest.model_copy(update={"sha256": sha256_of(staged), "size_bytes": staged.stat().st_size}),
            cascade)


@pytest.mark.parametrize("tamper, says", [
    (_member_replaced, "the cascade pins"),
    (_pin_rewritten, "the cascade pins"),
    (_document_edited, "its manifest says"),
    (_member_tampered, "its manifest says"),
    (_member_missing, "stage1"),
    (_labels_differ, "other labels or preprocessing"),
    (_document_oversized, "larger than"),
])
def test_a_cascade_whose_members_are_not_what_it_pins_is_refused_by_the_loader(
        tamper, says, small_dir, model_dir, tmp_path):
    _cascade(small_dir, model_dir, tmp_path / "cascade")
    tamper(tmp_path / "cascade", small_dir, model_dir)

    with pytest.raises(ModelError) as refused:
        LOADER(tmp_path / "cascade")

    assert says in str(refused.value).lower()


def test_a_cascade_whose_member_is_a_cascade_is_refused_by_the_loader(small_dir, model_dir, tmp_path):
    _cascade(small_dir, model_dir, tmp_path / "inner")
    _cascade(tmp_path / "inner", model_dir, tmp_path / "outer", name="outer")

    with pytest.raises(ModelError, match="cascade inside a cascade"):
        LOADER(tmp_path / "outer")


def test_a_failing_stage_2_costs_only_the_escalated_frames_their_answers(
        frames, offline, small_dir, model_dir, tmp_path):
    threshold = _threshold_between(offline.small.margin)
    under = {int(i) for i in np.flatnonzero(offline.small.margin < threshold)}
    _cascade(small_dir, model_dir, tmp_path / "cascade", "margin", threshold)
    model = LOADER(tmp_path / "cascade")
    warm(model)

    def broken(batch: np.ndarray) -> np.ndarray:  # as an execution provider that stopped working
        raise RuntimeError("stage 2's provider is gone")

    model.escalation.session.run = broken
    with serving(model, max_batch=len(frames), max_wait_ms=1000) as (service, link):
        for i, jpeg in enumerate(frames):
            link.deliver(topics.frames(DEVICE, "cam"), _envelope(f"f{i}", jpeg))
        stats = _soon(lambda: (s := service.stats()).predictions_published + s.frames_rejected == len(frames) and s,
                      "an answer for every frame")

    predictions = {int(p.frame_id[1:]) for _, p in _predictions(link)}
    refused = {int(r.frame_id[1:]) for r in _errors(link) if r.frame_id}
    assert refused == under and predictions == set(range(len(frames))) - under
    assert all("stage 2's provider is gone" in r.detail for r in _errors(link) if r.frame_id)
    assert stats.frames_received == stats.predictions_published + stats.frames_rejected
    assert stats.predictions_escalated == 0
