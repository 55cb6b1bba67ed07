"""The canary's judgement: pure logic, so tested as such (the processes are tested in test_sync)."""

from __future__ import annotations

from services.sync.canary import Watch, judge
from shared.config import CanarySettings
from shared.schemas import CacheSource, ClassScore, ModelRef, Prediction, Timings

LIMITS = CanarySettings(max_psi=0.5, max_error_rate=0.05, max_latency_ratio=1.5, max_confidence_drop=0.2, min_samples=1)


def _prediction(sha: str, label: str, inference_ms: float) -> Prediction:
    return Prediction(
        device="d", camera="c", frame_id="f", captured_at=None, top=[ClassScore(index=0, label=label, score=0.8)],
        model=ModelRef(name="m", version=1, sha256=sha), provider="CPUExecutionProvider",
        timings=Timings(queued_ms=0, preprocess_ms=1, inference_ms=inference_ms, total_ms=inference_ms + 1,
                        batch_size=1),
        published_at=0.0,
    )


def test_a_models_warm_up_predictions_stay_out_of_its_window():
    watch = Watch(CanarySettings(window=20, warmup=5, min_samples=1))
    for _ in range(20):
        watch.on_prediction(_prediction("old", "cat", 10.0))
    for latency in [40.0] * 5 + [10.0] * 20:  # slow first runs after the switch, then steady
        watch.on_prediction(_prediction("new", "cat", latency))
    assert len(watch.snapshot("new")) == 20
    assert judge(watch.snapshot("old"), watch.snapshot("new"), LIMITS).passed


def test_a_slower_or_shifted_model_fails_with_its_reasons():
    watch = Watch(CanarySettings(window=20, warmup=0, min_samples=1))
    for i in range(20):
        watch.on_prediction(_prediction("old", ["cat", "dog"][i % 2], 10.0))
        watch.on_prediction(_prediction("new", ["car", "boat"][i % 2], 20.0))
    verdict = judge(watch.snapshot("old"), watch.snapshot("new"), LIMITS)
    assert not verdict.passed and len(verdict.reasons) == 2
    assert "PSI" in verdict.reasons[0] and "latency" in verdict.reasons[1]


def test_empty_windows_are_inconclusive_never_passed():
    limits = CanarySettings(max_psi=0.5, max_error_rate=0.05, max_latency_ratio=1.5, max_confidence_drop=0.2,
                            min_samples=5)
    watch = Watch(CanarySettings(window=20, warmup=0, min_samples=1))
    verdict = judge(watch.snapshot("old"), watch.snapshot("new"), limits)
    assert not verdict.passed and not verdict.conclusive
    assert verdict.reasons == ["inconclusive: 0 samples before, 0 after, minimum 5"]


def test_too_few_samples_after_the_switch_is_inconclusive_even_when_they_look_good():
    limits = CanarySettings(max_psi=0.5, max_error_rate=0.05, max_latency_ratio=1.5, max_confidence_drop=0.2,
                            min_samples=10)
    watch = Watch(CanarySettings(window=20, warmup=0, min_samples=1))
    for _ in range(20):
        watch.on_prediction(_prediction("old", "cat", 10.0))
    for _ in range(9):
        watch.on_prediction(_prediction("new", "cat", 10.0))
    verdict = judge(watch.snapshot("old"), watch.snapshot("new"), limits)
    assert not verdict.passed and not verdict.conclusive
    assert "inconclusive: 20 samples before, 9 after, minimum 10" in verdict.reasons
    for _ in range(1):
        watch.on_prediction(_prediction("new", "cat", 10.0))
    assert judge(watch.snapshot("old"), watch.snapshot("new"), limits).passed


def test_the_minimum_may_not_exceed_the_window():
    import pytest
    from pydantic import ValidationError

    from shared.config import SyncSettings

    with pytest.raises(ValidationError, match="exceeds canary_window"):
        SyncSettings(canary_window=10, canary_min_samples=11)


def test_cached_predictions_are_no_evidence_for_the_canary():
    watch = Watch(CanarySettings(window=20, warmup=0, min_samples=1))
    cached = _prediction("new", "cat", 0.0).model_copy(
        update={"cached": True, "cache": CacheSource(frame_id="f0", age_ms=40.0, match="scene")})
    for _ in range(30):
        watch.on_prediction(cached)
    watch.on_prediction(_prediction("new", "cat", 10.0))
    assert len(watch.snapshot("new")) == 1
